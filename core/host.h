/*
 * host.h -- the services table (spoke_host) the host hands to plugins, and the per-worker
 * environment those services act in.
 *
 * There is one spk_host_env per process that runs plugins (a worker, or hubd). Plugins
 * reach it through their spoke_ctx (ctx->plugin->env). The table itself is static and
 * constant: spk_host_table() returns it.
 */
#ifndef SPK_HOST_H
#define SPK_HOST_H

#include <ev.h>

#include "chain.h"
#include "config.h"
#include "loader.h"
#include "spoke.h"

struct spk_queue; /* queue/queue.h */

struct spk_host_env {
    struct ev_loop *loop;      /* the process's loop (timers run on it) */
    const spk_config *cfg;     /* borrowed */
    spoke_role role;
    const spk_chain *chain;    /* for stamping the watchdog slot around timer callbacks */
    spk_slot *slot;            /* the worker's watchdog slot; NULL when unsupervised */
    struct spk_queue *queue;   /* send_to_control's queue; NULL: service not offered */
    const char *edge_id;       /* borrowed from cfg, never NULL */
    const char *edge_namespace;
};

/* The host services table; static, valid for the life of the process. */
const spoke_host *spk_host_table(void);

/* Initialise env for `loop` and `cfg` (both borrowed). */
void spk_host_env_init(spk_host_env *env, struct ev_loop *loop, const spk_config *cfg,
                       spoke_role role);

/* Stop and free every timer of plugin p (called before fini/dlclose). */
void spk_host_timers_free(spk_plugin *p);

#endif
