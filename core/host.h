/*
 * host.h -- the services table (spoke_host) the host hands to plugins, and the per-worker
 * environment those services act in.
 *
 * There is one spk_host_env per process that runs plugins (a worker, or hubd). Plugins
 * reach it through their spoke_ctx (ctx->plugin->env). The tables themselves are static
 * and constant, one per role: spk_host_table_for() returns them.
 */
#ifndef SPK_HOST_H
#define SPK_HOST_H

#include <ev.h>

#include "chain.h"
#include "config.h"
#include "loader.h"
#include "spoke.h"
#include "status.h"

struct spk_queue;  /* queue/queue.h */
struct spk_kv;     /* kv.h */
struct spk_kv_txn; /* kv.h */

struct spk_host_env {
    struct ev_loop *loop;      /* the process's loop (timers run on it) */
    const spk_config *cfg;     /* borrowed */
    spoke_role role;
    struct spk_queue *queue;   /* send_to_control's queue; NULL: the queue could not be
                                  opened, and the service answers QUEUE_UNAVAILABLE */
    spk_queue_counters *qc;    /* where send_to_control counts (the worker's status slot,
                                  or a private struct); NULL: not counted */
    uint64_t queue_tried_s;    /* loop time (s) of the last attempt to open the queue */
    uint64_t qlog_sec;         /* rate limit of refusal logs: the current second ... */
    unsigned qlog_n;           /* ... and how many were logged in it */
    uint64_t qlog_dropped;     /* refusals not logged since the last one that was */
    const char *edge_id;       /* borrowed from cfg, never NULL */
    const char *edge_namespace;

    /* The KV services (ABI 1.2; see kv_get in abi/spoke.h). */
    struct spk_kv *kv;         /* the store this process opened for them; NULL: none, and
                                  they answer KV_UNAVAILABLE. Borrowed: its opener closes
                                  it (spk_host_kv_open/close for the edge; hubd sets its
                                  own store, the one that holds its dedupe marks, before
                                  the plugins' init) */
    struct spk_kv_txn *kv_txn; /* CONTROL ROLE: while hubd runs accept_edge_payload for a
                                  delivery it sets this to that delivery's (nested) write
                                  transaction, and clears it when the hook returns; while
                                  it is set, every KV call of this env's plugins reads and
                                  writes in it, never committing or aborting it (after a
                                  KV_UNAVAILABLE from a write, such as a full map, it is
                                  failed and must be aborted: kv.h, ERRORS). NULL (timers,
                                  init, the edge role): each call is its own transaction
                                  on `kv`. hubd must not hold a top-level write
                                  transaction of `kv` while kv_txn is NULL and plugin code
                                  may run (timers): their writes would find it taken and
                                  answer KV_UNAVAILABLE (SPK_EBUSY) */
    bool kv_owned;             /* kv was opened by spk_host_kv_open(): a failed open is
                                  retried every few seconds by the services */
    bool kv_scanning;          /* a kv_scan callback runs: KV calls answer UNSUPPORTED */
    uint64_t kv_tried_s;       /* loop time (s) of the last attempt to open kv */
    void *kv_buf;              /* kv_get's copy of a value when kv_txn is NULL, reused by
                                  the next get (so the ABI's lifetime rule holds); freed
                                  by spk_host_env_fini() */
    size_t kv_cap;
    uint64_t kvlog_sec;        /* rate limit of KV failure logs: the current second ... */
    uint64_t kvlog_dropped;    /* ... and failures not logged since the last one that was */

    /* The metric services (ABI 1.4; metrics.h). */
    spk_pmetrics *pm;          /* where the plugins' metrics live: the worker's status slot
                                  (borrowed); NULL: a table of the env's own, allocated at
                                  the first registration (pm_own), that nobody serves */
    spk_pmetrics *pm_own;      /* freed by spk_host_env_fini() */
    struct spk_policy *policy; /* the worker's policy engine (policy.h); NULL: no policies,
                                  every signal gets the built-in behaviour. Owned by the
                                  worker, which frees it after the plugins' fini */
};

/* The host services table of `role`; static, valid for the life of the process. In the
 * control role's table the edge-only services (buffers, connections, send_to_control)
 * are NULL, as abi/spoke.h's rule 4 says. Pass the table of the env's role to the loader. */
const spoke_host *spk_host_table_for(spoke_role role);

/* The edge role's table: spk_host_table_for(SPOKE_ROLE_EDGE). */
const spoke_host *spk_host_table(void);

/* Initialise env for `loop` and `cfg` (both borrowed). */
void spk_host_env_init(spk_host_env *env, struct ev_loop *loop, const spk_config *cfg,
                       spoke_role role);

/* Open env->queue from env->cfg's queue.* keys (spk_queue_conf_open; see queue/queue.h for
 * the codes) and flag the worker's counters unavailable when it fails. Call it in the process
 * that will use the queue, after fork. Close with spk_queue_close(env->queue). */
int spk_host_queue_open(spk_host_env *env, spk_errbuf *eb);

/* With env->queue NULL: retry spk_host_queue_open() if the last attempt is a few seconds
 * old (logged). Returns 0 once the queue is open, else SPK_EQUEUE_UNAVAILABLE or the open
 * error. send_to_control calls it; the queue stays optional for serving traffic. */
int spk_host_queue_retry(spk_host_env *env);

/* Free what the services allocated in env (kv_get's buffer, up to 1 MiB): every process
 * that ran plugins with an env calls it once they are unloaded (the edge worker, hubd's
 * workers). Closes neither env->queue nor env->kv: their openers do. env may be
 * initialised again afterwards. */
void spk_host_env_fini(spk_host_env *env);

/* Open env->kv from env->cfg's kv.* keys (spk_kv_conf_open, with env->role's durability;
 * see kv.h for the codes) and mark it the env's own (kv_owned): when the open fails, the
 * KV services retry it every few seconds and answer KV_UNAVAILABLE meanwhile. Call it in
 * the process that will use the store, after fork, before the plugins' init. The edge
 * worker uses it; hubd may too, or set env->kv to a store it opened itself. */
int spk_host_kv_open(spk_host_env *env, spk_errbuf *eb);

/* Flush env->kv (spk_kv_sync; the edge store is opened without a flush per commit), for
 * the worker's kv.sync timer. Returns 0 (also with no store) or spk_kv_sync()'s code. */
int spk_host_kv_sync(spk_host_env *env, spk_errbuf *eb);

/* After the plugins' fini: flush and close a store spk_host_kv_open() opened, and forget
 * it (env->kv = NULL). A store the env does not own is left alone. */
void spk_host_kv_close(spk_host_env *env);

/* Unload one plugin: fini if it is initialised (stamped in its slot, so a crash or hang
 * in fini is blamed on it), its timers stopped and freed, then spk_plugin_close()
 * (dlclose, free). NULL is allowed. */
void spk_host_plugin_unload(spk_plugin *p);

/* The unload sequence of a set, loaded or initialised (also after a failed
 * spk_plugin_set_init()): spk_host_plugin_unload() of each plugin in reverse chain order,
 * then the set's array is freed and the set left empty. */
void spk_host_unload(spk_plugin_set *set);

/* One round of health checks: each plugin's health hook (stamped in `slot`), counting
 * failures in a row in fails[i] (one per plugin, zeroed by the caller at start). Returns
 * the chain index + 1 of the first plugin that reached `limit` failures in a row (it is
 * to be treated as crashed), or 0. */
size_t spk_host_health_round(spk_plugin_set *set, spk_slot *slot, unsigned *fails,
                             unsigned limit);

/* send_to_control below the plugin's context: the host's own policy (send_to_control_json:
 * one well-formed JSON value, else SPK_ENOT_JSON; every string UTF-8, else SPK_EINVAL),
 * then spk_queue_send() (the queue's limits; arguments and codes as there). A refusal by
 * the policy is counted in q's stats too (spk_queue_refused). Codes are those the queue
 * alone gave before the policy moved here, also when a call breaks several rules. */
struct spk_queue;
int spk_host_queue_send(struct spk_queue *q, uint32_t plugin_id, const char *edge_id,
                        const void *payload, size_t len, const char *correlation_id,
                        const spoke_kv *metadata, size_t n_metadata, bool json,
                        int64_t now_ms, uint64_t *seq, uint64_t *pending, spk_errbuf *eb);

/* send_to_control on behalf of plugin p, addressed to the control plugin `plugin_id`: the
 * one path of the send_to_control services (the queue retried when it is not open, the
 * send stamped in p's slot as host time, refusals counted and logged with p's name,
 * acceptances counted). The policy engine's send_to_control action uses it too. Returns 0
 * or a public spoke_status. */
int spk_host_send(spk_plugin *p, uint32_t plugin_id, const void *payload, size_t len,
                  const char *correlation_id, const spoke_kv *metadata, size_t n_metadata,
                  bool json, uint64_t *pending);

#endif
