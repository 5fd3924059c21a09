/*
 * host.c -- the services a plugin can call (the spoke_host table).
 *
 * Every service finds its context through the spoke_ctx the plugin passes: ctx->plugin
 * is the loaded plugin, plugin->env the worker's environment (loop, config, queue). The
 * connection services find theirs through spoke_conn, which the chain fills in before a
 * hook runs. Nothing here allocates on the traffic path except buf_set/buf_resize growing
 * a buffer beyond its previous capacity, and respond() queueing bytes.
 *
 * send_to_control checks the host's policy (JSON, UTF-8: spk_host_queue_send), then calls
 * the queue's spk_queue_send() stamped with the calling plugin's ID, the edge ID and the
 * loop's cached time (ev_now: no clock read per call); the queue checks its own limits.
 * Refusals are counted by reason in the worker's status slot (the supervisor's metrics)
 * and logged with the plugin's name, at most REFUSAL_LOGS_PER_SEC a second per worker.
 *
 * signal() hands the signal to the worker's policies first (policy.h: the operator's
 * rules, in Lua); the built-in behaviour here (log, terminate) applies when no policy
 * matched or the one that did failed.
 *
 * The KV services (ABI 1.2) put each plugin's keys under its plugin ID in the store the
 * env holds (kv.h), in the delivery's transaction when hubd set one, else one transaction
 * per call; see the KV section below.
 */
#include "host.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "kv.h"
#include "kv_conf.h"
#include "log.h"
#include "policy.h"
#include "queue.h"
#include "queue_conf.h"
#include "units.h"

#define REFUSAL_LOGS_PER_SEC 10
#define QUEUE_RETRY_S 5

struct spk_timer {
    ev_timer w;
    spk_plugin *plugin;
    spoke_timer_cb cb;
    void *arg;
    int64_t id;
    spk_timer *next;
};

/* ---- log, config, identity ---------------------------------------------------------- */

static void host_log(spoke_ctx *ctx, spoke_log_level level, const char *fmt, ...)
{
    if (level < spk_log_get_level())
        return;
    spk_log_event e = {.level = level, .plugin = "?"};
    if (ctx != NULL && ctx->plugin != NULL && ctx->plugin->name != NULL)
        e.plugin = ctx->plugin->name;
    va_list ap;
    va_start(ap, fmt);
    spk_log_eventv(&e, fmt, ap);
    va_end(ap);
}

static const char *host_config_get(spoke_ctx *ctx, const char *key)
{
    if (ctx == NULL || key == NULL || ctx->plugin->conf == NULL)
        return NULL;
    return spk_plugin_conf_get(ctx->plugin->conf, key);
}

/* config_get_duration / config_get_size: the config file's own parsers (units.h), so a
 * plugin's "10s" means what the host's does. A key that is not set leaves *out alone. */
static int config_get_parsed(spoke_ctx *ctx, const char *key, uint64_t *out,
                             int (*parse)(const char *text, uint64_t *out))
{
    if (ctx == NULL || key == NULL || out == NULL)
        return SPOKE_ERR_INVALID;
    const char *v = host_config_get(ctx, key);
    if (v == NULL)
        return 0;
    return parse(v, out) == 0 ? 0 : SPOKE_ERR_INVALID;
}

static int host_config_get_duration(spoke_ctx *ctx, const char *key, uint64_t *out_ms)
{
    return config_get_parsed(ctx, key, out_ms, spk_parse_duration_ms);
}

static int host_config_get_size(spoke_ctx *ctx, const char *key, uint64_t *out_bytes)
{
    return config_get_parsed(ctx, key, out_bytes, spk_parse_size);
}

static const char *host_edge_id(spoke_ctx *ctx)
{
    const spk_host_env *env = ctx ? ctx->plugin->env : NULL;
    return env && env->edge_id ? env->edge_id : "";
}

static const char *host_edge_namespace(spoke_ctx *ctx)
{
    const spk_host_env *env = ctx ? ctx->plugin->env : NULL;
    return env && env->edge_namespace ? env->edge_namespace : "";
}

/* ---- timers ------------------------------------------------------------------------- */

static void timer_fire(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    spk_timer *t = (spk_timer *)w;
    spk_plugin *p = t->plugin;
    uint64_t t0 = SPK_PLUGIN_HOOK_BEGIN(p, p->slot, SPK_HOOK_TIMER);
    t->cb(p->self, t->arg);
    SPK_PLUGIN_HOOK_END(p, p->slot, SPK_HOOK_TIMER, t0);
}

static int64_t host_every(spoke_ctx *ctx, uint64_t ms, spoke_timer_cb cb, void *arg)
{
    if (ctx == NULL || cb == NULL || ms == 0)
        return SPOKE_ERR_INVALID;
    spk_plugin *p = ctx->plugin;
    if (p->env == NULL || p->env->loop == NULL)
        return SPOKE_ERR_UNSUPPORTED;
    spk_timer *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return SPOKE_ERR_NOMEM;
    static int64_t next_id = 1;
    t->plugin = p;
    t->cb = cb;
    t->arg = arg;
    t->id = next_id++;
    ev_timer_init(&t->w, timer_fire, (double)ms / 1000.0, (double)ms / 1000.0);
    ev_timer_start(p->env->loop, &t->w);
    t->next = p->timers;
    p->timers = t;
    return t->id;
}

static int host_timer_cancel(spoke_ctx *ctx, int64_t id)
{
    if (ctx == NULL)
        return SPOKE_ERR_INVALID;
    spk_plugin *p = ctx->plugin;
    for (spk_timer **tp = &p->timers; *tp != NULL; tp = &(*tp)->next) {
        spk_timer *t = *tp;
        if (t->id != id)
            continue;
        *tp = t->next;
        ev_timer_stop(p->env->loop, &t->w);
        free(t);
        return 0;
    }
    return SPOKE_ERR_INVALID;
}

static void timers_free(spk_plugin *p)
{
    while (p->timers != NULL) {
        spk_timer *t = p->timers;
        p->timers = t->next;
        if (p->env != NULL && p->env->loop != NULL)
            ev_timer_stop(p->env->loop, &t->w);
        free(t);
    }
}

/* ---- unload ------------------------------------------------------------------------
 *
 * The one unload sequence, for the worker, hubd and the tools: fini runs first (it may
 * still cancel its timers or send), stamped like every other hook; then the timers go,
 * so none fires into code about to be unmapped; then dlclose. */

void spk_host_plugin_unload(spk_plugin *p)
{
    if (p == NULL)
        return;
    if (p->initialised && p->table.fini != NULL) {
        uint64_t t = SPK_PLUGIN_HOOK_BEGIN(p, p->slot, SPK_HOOK_FINI);
        p->table.fini(p->self);
        SPK_PLUGIN_HOOK_END(p, p->slot, SPK_HOOK_FINI, t);
    }
    p->initialised = false;
    timers_free(p);
    spk_plugin_close(p);
}

void spk_host_unload(spk_plugin_set *set)
{
    for (size_t i = set->n; i-- > 0;)
        spk_host_plugin_unload(set->v[i]);
    free(set->v);
    set->v = NULL;
    set->n = 0;
}

/* ---- buffers ------------------------------------------------------------------------ */

/* Make sure buf owns at least `len` bytes of storage, keeping the current contents'
 * first min(len, pub.len) bytes. */
static uint8_t *buf_own(spk_buf *b, size_t len)
{
    size_t keep = b->pub.len < len ? b->pub.len : len;
    if (b->own != NULL && b->pub.data == b->own && b->cap >= len)
        return b->own;
    if (b->cap < len || b->own == NULL) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < len) {
            if (cap > SIZE_MAX / 2)
                return NULL;
            cap *= 2;
        }
        uint8_t *n = malloc(cap);
        if (n == NULL)
            return NULL;
        if (keep)
            memcpy(n, b->pub.data, keep);
        free(b->own);
        b->own = n;
        b->cap = cap;
    } else if (keep && b->pub.data != b->own) {
        memmove(b->own, b->pub.data, keep);
    }
    b->pub.data = b->own;
    return b->own;
}

static int host_buf_set(spoke_buf *pub, const void *data, size_t len)
{
    if (pub == NULL || (data == NULL && len > 0))
        return SPOKE_ERR_INVALID;
    spk_buf *b = (spk_buf *)pub;
    /* data may point into the current contents: copy through a fresh block if so. */
    const uint8_t *d = data;
    bool overlaps = b->own && d >= b->own && d < b->own + b->cap;
    if (overlaps || b->cap < len || b->own == NULL) {
        size_t cap = b->cap > len ? b->cap : (len < 256 ? 256 : len);
        uint8_t *n = malloc(cap);
        if (n == NULL)
            return SPOKE_ERR_NOMEM;
        if (len)
            memcpy(n, data, len);
        free(b->own);
        b->own = n;
        b->cap = cap;
    } else if (len) {
        memmove(b->own, data, len);
    }
    b->pub.data = b->own;
    b->pub.len = len;
    return 0;
}

static uint8_t *host_buf_resize(spoke_buf *pub, size_t len)
{
    if (pub == NULL)
        return NULL;
    spk_buf *b = (spk_buf *)pub;
    uint8_t *p = buf_own(b, len ? len : 1);
    if (p == NULL)
        return NULL;
    b->pub.len = len;
    return p;
}

void spk_buf_free(spk_buf *b)
{
    free(b->own);
    b->own = NULL;
    b->cap = 0;
    b->pub.data = NULL;
    b->pub.len = 0;
}

/* ---- connections -------------------------------------------------------------------- */

static uint64_t host_conn_id(const spoke_conn *c) { return c ? c->id : 0; }

static const char *host_conn_peer(const spoke_conn *c) { return c ? c->peer : ""; }

static void **host_conn_data(spoke_conn *c, spoke_ctx *ctx)
{
    if (c == NULL || ctx == NULL || c->pdata == NULL)
        return NULL;
    return &c->pdata[ctx->plugin->index];
}

static int host_respond(spoke_conn *c, const void *data, size_t len)
{
    if (c == NULL || (data == NULL && len > 0))
        return SPOKE_ERR_INVALID;
    return spk_bytes_append(&c->reply, data, len);
}

static const char *kv_find(const spoke_kv *kv, size_t n, const char *key)
{
    for (size_t i = 0; i < n; i++)
        if (kv[i].key != NULL && strcmp(kv[i].key, key) == 0)
            return kv[i].value;
    return NULL;
}

static int signal_builtin(spoke_ctx *ctx, spoke_conn *c, const char *name, const spoke_kv *f,
                          size_t n);

/* A signal goes to the worker's policies first (policy.h); the built-in behaviour below
 * applies when none matched or the one that did failed. */
static int host_signal(spoke_ctx *ctx, spoke_conn *c, const char *name, const spoke_kv *f,
                       size_t n)
{
    if (ctx == NULL || name == NULL || (f == NULL && n > 0))
        return SPOKE_ERR_INVALID;
    spk_host_env *env = ctx->plugin->env;
    if (env != NULL && env->policy != NULL) {
        int rc = spk_policy_signal(env->policy, ctx->plugin, c, name, f, n);
        if (rc != SPK_POLICY_BUILTIN)
            return rc;
    }
    return signal_builtin(ctx, c, name, f, n);
}

/* The host's built-in behaviour for a signal (abi/spoke.h, signal). */
static int signal_builtin(spoke_ctx *ctx, spoke_conn *c, const char *name, const spoke_kv *f,
                          size_t n)
{
    const char *prefix = ctx->plugin->log_prefix;
    char cid[48] = "";
    if (c != NULL)
        snprintf(cid, sizeof(cid), "conn %llu: ", (unsigned long long)c->id);
    if (strcmp(name, "log") == 0) {
        spoke_log_level lvl = SPOKE_LOG_INFO;
        const char *ls = kv_find(f, n, "level");
        if (ls != NULL && spk_log_parse_level(ls, &lvl) != 0 && strcmp(ls, "warning") == 0)
            lvl = SPOKE_LOG_WARN;
        const char *msg = kv_find(f, n, "message");
        /* The fields besides level and message go into a JSON line (log.format). */
        spoke_kv extra[16];
        size_t n_extra = 0;
        for (size_t i = 0; i < n && n_extra < sizeof(extra) / sizeof(extra[0]); i++)
            if (f[i].key != NULL && strcmp(f[i].key, "level") != 0 &&
                strcmp(f[i].key, "message") != 0)
                extra[n_extra++] = f[i];
        spk_log_event e = {.level = lvl, .plugin = ctx->plugin->name ? ctx->plugin->name : "?",
                           .conn = c != NULL ? c->id : 0, .fields = extra,
                           .n_fields = n_extra};
        spk_log_event_f(&e, "%s", msg ? msg : "(no message)");
        return 0;
    }
    if (strcmp(name, "terminate") == 0) {
        const char *why = kv_find(f, n, "reason");
        spk_info("%s%sterminate signal: %s", prefix, cid, why ? why : "(no reason)");
        if (c == NULL)
            return SPOKE_ERR_INVALID;
        c->flags |= SPK_CONN_TERMINATE;
        return 0;
    }
    spk_debug("%s%sunknown signal '%s' ignored", prefix, cid, name);
    return 0;
}

/* ---- send_to_control ---------------------------------------------------------------- */

static int refusal_reason(int err)
{
    switch (err) {
    case SPK_EPAYLOAD_TOO_LARGE: return SPK_QR_PAYLOAD_TOO_LARGE;
    case SPK_ETOO_MANY_METADATA: return SPK_QR_TOO_MANY_METADATA;
    case SPK_EMETADATA_KEY: return SPK_QR_METADATA_KEY;
    case SPK_EMETADATA_VALUE: return SPK_QR_METADATA_VALUE;
    case SPK_ECORRELATION_ID: return SPK_QR_CORRELATION_ID;
    case SPK_ENOT_JSON: return SPK_QR_NOT_JSON;
    case SPK_EQUEUE_FULL: return SPK_QR_QUEUE_FULL;
    case SPK_EINVAL: return SPK_QR_INVALID;
    default: return SPK_QR_UNAVAILABLE;
    }
}

int spk_host_queue_open(spk_host_env *env, spk_errbuf *eb)
{
    env->queue_tried_s = env->loop != NULL ? (uint64_t)ev_now(env->loop) : 0;
    int rc = spk_queue_conf_open(env->cfg, &env->queue, eb);
    if (env->qc != NULL)
        atomic_store_explicit(&env->qc->unavailable, rc != 0, memory_order_relaxed);
    return rc;
}

/* With no queue, try to open it again, at most every QUEUE_RETRY_S seconds. */
int spk_host_queue_retry(spk_host_env *env)
{
    uint64_t now = env->loop != NULL ? (uint64_t)ev_now(env->loop) : 0;
    if (env->cfg == NULL || now < env->queue_tried_s + QUEUE_RETRY_S)
        return SPK_EQUEUE_UNAVAILABLE;
    spk_errbuf eb;
    int rc = spk_host_queue_open(env, &eb);
    if (rc != 0)
        spk_warn("send_to_control: queue still unavailable: %s", eb.msg);
    else
        spk_info("send_to_control: queue %s opened", env->cfg->queue_path);
    return rc;
}

/* Count a refusal and log it with the plugin's name, rate-limited per worker. */
static void refused(spk_host_env *env, const spk_plugin *p, int err, const char *why)
{
    int r = refusal_reason(err);
    if (env->qc != NULL)
        atomic_fetch_add_explicit(&env->qc->refused[r], 1, memory_order_relaxed);
    uint64_t sec = env->loop != NULL ? (uint64_t)ev_now(env->loop) : 0;
    if (sec != env->qlog_sec) {
        if (env->qlog_dropped > 0)
            spk_warn("send_to_control: %llu more refusals not logged in the last second(s)",
                     (unsigned long long)env->qlog_dropped);
        env->qlog_sec = sec;
        env->qlog_n = 0;
        env->qlog_dropped = 0;
    }
    if (env->qlog_n >= REFUSAL_LOGS_PER_SEC) {
        env->qlog_dropped++;
        return;
    }
    env->qlog_n++;
    spk_warn("%ssend_to_control refused (%s, %s): %s", p->log_prefix,
             spk_qrefuse_name(r), spk_strerror(err), why);
}

/* Map an internal result onto the public codes: anything that is not one of the ABI's
 * payload/queue codes (SPK_EIO, SPK_ECORRUPT, SPK_ENOMEM) means the queue is unavailable. */
static int public_status(int err)
{
    if (err == 0 || (err <= SPOKE_ERR_PAYLOAD_TOO_LARGE && err >= SPOKE_ERR_NOT_JSON) ||
        err == SPK_EINVAL)
        return err;
    return SPOKE_ERR_QUEUE_UNAVAILABLE;
}

/* The host's policy on what a plugin sends (spk_host_queue_send). The strings are walked
 * in the order the queue checks its limits, and the walk stops at the first one over its
 * limit (or a NULL), which the queue then reports: so a call that breaks several rules
 * gets the code it got when the queue checked both. */
static int check_policy(const void *payload, size_t len, const char *corr, const spoke_kv *md,
                        size_t n_md, bool json, const char *edge_id, spk_errbuf *eb)
{
    if (json && len <= SPOKE_MAX_PAYLOAD && !spk_json_valid(payload, len))
        return spk_errf(eb, SPK_ENOT_JSON, "send_to_control_json: the text is not one "
                        "well-formed JSON value");
    if ((payload == NULL && len > 0) || (md == NULL && n_md > 0) || len > SPOKE_MAX_PAYLOAD)
        return 0;
    if (corr != NULL) {
        size_t n = strnlen(corr, SPOKE_MAX_CORRELATION_ID + 1);
        if (n > SPOKE_MAX_CORRELATION_ID)
            return 0;
        if (!spk_utf8_valid(corr, n))
            return spk_errf(eb, SPK_EINVAL, "send_to_control: correlation ID is not UTF-8");
    }
    if (n_md > SPOKE_MAX_METADATA)
        return 0;
    for (size_t i = 0; i < n_md; i++) {
        if (md[i].key == NULL || md[i].value == NULL)
            return 0;
        size_t kn = strnlen(md[i].key, SPOKE_MAX_METADATA_KEY + 1);
        if (kn > SPOKE_MAX_METADATA_KEY)
            return 0;
        if (!spk_utf8_valid(md[i].key, kn))
            return spk_errf(eb, SPK_EINVAL, "send_to_control: metadata key %zu is not valid "
                            "UTF-8", i);
        size_t vn = strnlen(md[i].value, SPOKE_MAX_METADATA_VALUE + 1);
        if (vn > SPOKE_MAX_METADATA_VALUE)
            return 0;
        if (!spk_utf8_valid(md[i].value, vn))
            return spk_errf(eb, SPK_EINVAL, "send_to_control: metadata value %zu is not "
                            "valid UTF-8", i);
    }
    if (edge_id != NULL && !spk_utf8_valid(edge_id, strlen(edge_id)))
        return spk_errf(eb, SPK_EINVAL, "send_to_control: edge ID is not UTF-8");
    return 0;
}

int spk_host_queue_send(struct spk_queue *q, uint32_t plugin_id, const char *edge_id,
                        const void *payload, size_t len, const char *correlation_id,
                        const spoke_kv *metadata, size_t n_metadata, bool json,
                        int64_t now_ms, uint64_t *seq, uint64_t *pending, spk_errbuf *eb)
{
    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    int rc = check_policy(payload, len, correlation_id, metadata, n_metadata, json, edge_id,
                          eb);
    if (rc != 0) {
        spk_queue_refused(q, rc);
        return rc;
    }
    return spk_queue_send(q, plugin_id, edge_id, payload, len, correlation_id, metadata,
                          n_metadata, json, now_ms, seq, pending, eb);
}

static int send_common(spoke_ctx *ctx, const void *payload, size_t len, const char *corr,
                       const spoke_kv *md, size_t n_md, uint64_t *pending, bool json)
{
    if (ctx == NULL || ctx->plugin == NULL || ctx->plugin->env == NULL)
        return SPOKE_ERR_INVALID;
    return spk_host_send(ctx->plugin, ctx->plugin->id, payload, len, corr, md, n_md, json,
                         pending);
}

int spk_host_send(spk_plugin *p, uint32_t plugin_id, const void *payload, size_t len,
                  const char *corr, const spoke_kv *md, size_t n_md, bool json,
                  uint64_t *pending)
{
    spk_host_env *env = p->env;
    if (env == NULL)
        return SPOKE_ERR_INVALID;
    /* The control table has no send_to_control (NULL, as the ABI's rule 4 says); this
     * only guards a control env handed the edge table by mistake. */
    if (env->role == SPOKE_ROLE_CONTROL)
        return SPOKE_ERR_UNSUPPORTED;
    spk_errbuf eb;
    if (env->queue == NULL && spk_host_queue_retry(env) != 0) {
        refused(env, p, SPK_EQUEUE_UNAVAILABLE, "the queue could not be opened (see the "
                "worker's warning); retrying every few seconds");
        return SPOKE_ERR_QUEUE_UNAVAILABLE;
    }
    int64_t now_ms = env->loop != NULL ? (int64_t)(ev_now(env->loop) * 1000.0) : -1;
    spk_slot_in_host(p->slot, 1);
    int rc = spk_host_queue_send(env->queue, plugin_id, env->edge_id, payload, len, corr, md,
                                 n_md, json, now_ms, NULL, pending, &eb);
    spk_slot_in_host(p->slot, 0);
    if (rc != 0) {
        refused(env, p, rc, eb.msg);
        return public_status(rc);
    }
    if (env->qc != NULL)
        atomic_fetch_add_explicit(&env->qc->sent, 1, memory_order_relaxed);
    return 0;
}

static int host_send_to_control(spoke_ctx *ctx, const void *payload, size_t len,
                                const char *correlation_id, const spoke_kv *metadata,
                                size_t n_metadata, uint64_t *pending)
{
    return send_common(ctx, payload, len, correlation_id, metadata, n_metadata, pending,
                       false);
}

static int host_send_to_control_json(spoke_ctx *ctx, const char *json, size_t len,
                                     const char *correlation_id, const spoke_kv *metadata,
                                     size_t n_metadata, uint64_t *pending)
{
    return send_common(ctx, json, len, correlation_id, metadata, n_metadata, pending, true);
}

static const char *host_strerror(int status) { return spk_strerror(status); }

/* ---- KV ---------------------------------------------------------------------------------
 *
 * The plugin's ID is its namespace in the store (kv.h). With env->kv_txn set (hubd, during
 * accept_edge_payload) every call works in that transaction, so the plugin's writes share
 * the fate of the batch's dedupe marks; a get then returns LMDB's own pointer, valid until
 * the next write in the transaction or its end, which the ABI's rule (next KV call or end
 * of the hook) covers. Otherwise a write is a one-shot transaction (put1/del1), a scan
 * runs in a read transaction of its own, and a get copies the value out of its read
 * transaction into env->kv_buf, which the next get reuses: the snapshot is released at
 * once, and what the plugin holds stays valid whatever other workers write meanwhile.
 * Arguments are checked here, before the store is looked at, so a plugin's mistake gets
 * the same code whether or not a store is open. */

static const uint8_t kv_empty[1];

int spk_host_kv_open(spk_host_env *env, spk_errbuf *eb)
{
    env->kv_owned = true;
    env->kv_tried_s = env->loop != NULL ? (uint64_t)ev_now(env->loop) : 0;
    return spk_kv_conf_open(env->cfg, env->role, &env->kv, eb);
}

int spk_host_kv_sync(spk_host_env *env, spk_errbuf *eb)
{
    return env->kv != NULL ? spk_kv_sync(env->kv, eb) : 0;
}

void spk_host_kv_close(spk_host_env *env)
{
    if (!env->kv_owned)
        return;
    if (env->kv != NULL) {
        spk_errbuf eb;
        if (spk_kv_sync(env->kv, &eb) != 0)
            spk_error("kv: %s", eb.msg);
        spk_kv_close(env->kv);
    }
    env->kv = NULL;
    env->kv_owned = false;
}

void spk_host_env_fini(spk_host_env *env)
{
    free(env->pm_own);
    env->pm_own = NULL;
    free(env->kv_buf);
    env->kv_buf = NULL;
    env->kv_cap = 0;
}

/* The store, reopened at most every QUEUE_RETRY_S seconds when the env's own open
 * failed; NULL when there is none. */
static spk_kv *kv_store(spk_host_env *env)
{
    if (env->kv != NULL || !env->kv_owned || env->cfg == NULL)
        return env->kv;
    uint64_t now = env->loop != NULL ? (uint64_t)ev_now(env->loop) : 0;
    if (now < env->kv_tried_s + QUEUE_RETRY_S)
        return NULL;
    spk_errbuf eb;
    if (spk_host_kv_open(env, &eb) != 0)
        spk_warn("kv: store still unavailable: %s", eb.msg);
    else
        spk_info("kv: store %s opened", env->cfg->kv_path);
    return env->kv;
}

/* Map a store result onto the ABI's codes. The arguments were checked already, so an
 * SPK_EINVAL from the store is the host's (a transaction in the wrong state): like every
 * code that is not the plugin's doing, it means the store is unavailable. */
static int kv_public(int err)
{
    switch (err) {
    case 0: return 0;
    case SPK_ENOENT: return SPOKE_ERR_NOT_FOUND;
    case SPK_EPAYLOAD_TOO_LARGE: return SPOKE_ERR_PAYLOAD_TOO_LARGE;
    case SPK_ENOMEM: return SPOKE_ERR_NOMEM;
    default: return SPOKE_ERR_KV_UNAVAILABLE;
    }
}

/* The public code of a failed store call; the host's failures are logged with the
 * plugin's name, the first of each second (then how many were not). */
static int kv_failed(spk_host_env *env, const spk_plugin *p, const char *op, int err,
                     const char *why)
{
    int pub = kv_public(err);
    if (pub != SPOKE_ERR_KV_UNAVAILABLE && pub != SPOKE_ERR_NOMEM)
        return pub;
    uint64_t sec = env->loop != NULL ? (uint64_t)ev_now(env->loop) : 0;
    if (sec == env->kvlog_sec && env->kvlog_sec != 0) {
        env->kvlog_dropped++;
        return pub;
    }
    env->kvlog_sec = sec;
    if (env->kvlog_dropped > 0)
        spk_warn("%llu more KV failures not logged in the last second(s)",
                 (unsigned long long)env->kvlog_dropped);
    spk_warn("%skv_%s: %s: %s", p->log_prefix, op, spk_strerror(pub), why);
    env->kvlog_dropped = 0;
    return pub;
}

/* The checks every KV service makes first, in the ABI's order: the caller, the plugin's
 * namespace, the key's length. On success *pp and *envp are set. */
static int kv_enter(spoke_ctx *ctx, const void *key, size_t klen, spk_plugin **pp,
                    spk_host_env **envp)
{
    if (ctx == NULL || ctx->plugin == NULL || ctx->plugin->env == NULL ||
        (key == NULL && klen > 0))
        return SPOKE_ERR_INVALID;
    spk_plugin *p = ctx->plugin;
    if (p->id == 0 || p->env->kv_scanning)
        return SPOKE_ERR_UNSUPPORTED;
    if (klen > SPK_KV_MAX_KEY)
        return SPOKE_ERR_INVALID;
    *pp = p;
    *envp = p->env;
    return 0;
}

static int kv_buf_reserve(spk_host_env *env, size_t n)
{
    if (n <= env->kv_cap)
        return 0;
    size_t cap = env->kv_cap ? env->kv_cap : 256;
    while (cap < n)
        cap *= 2;
    void *b = malloc(cap);
    if (b == NULL)
        return SPK_ENOMEM;
    free(env->kv_buf);
    env->kv_buf = b;
    env->kv_cap = cap;
    return 0;
}

/* A get of its own: copy the value out of a short read transaction. */
static int kv_get_copy(spk_host_env *env, spk_kv *kv, uint32_t ns, const void *key,
                       size_t klen, const void **val, size_t *vlen, spk_errbuf *eb)
{
    spk_kv_txn *t;
    int rc = spk_kv_begin(kv, NULL, false, &t, eb);
    if (rc != 0)
        return rc;
    const void *v;
    size_t n;
    rc = spk_kv_get(t, ns, key, klen, &v, &n, eb);
    if (rc == 0 && (rc = kv_buf_reserve(env, n)) != 0)
        spk_errf(eb, rc, "out of memory copying a value of %zu bytes", n);
    if (rc == 0) {
        if (n > 0)
            memcpy(env->kv_buf, v, n);
        *val = n > 0 ? env->kv_buf : kv_empty;
        *vlen = n;
    }
    spk_kv_abort(t);
    return rc;
}

static int host_kv_get(spoke_ctx *ctx, const void *key, size_t klen, const void **val,
                       size_t *vlen)
{
    if (val == NULL || vlen == NULL)
        return SPOKE_ERR_INVALID;
    *val = NULL;
    *vlen = 0;
    spk_plugin *p;
    spk_host_env *env;
    int rc = kv_enter(ctx, key, klen, &p, &env);
    if (rc != 0)
        return rc;
    spk_errbuf eb;
    if (env->kv_txn != NULL) {
        const void *v;
        size_t n;
        rc = spk_kv_get(env->kv_txn, p->id, key, klen, &v, &n, &eb);
        if (rc == 0) {
            *val = n > 0 ? v : kv_empty;
            *vlen = n;
        }
    } else {
        spk_kv *kv = kv_store(env);
        if (kv == NULL)
            return SPOKE_ERR_KV_UNAVAILABLE;
        rc = kv_get_copy(env, kv, p->id, key, klen, val, vlen, &eb);
    }
    return rc == 0 ? 0 : kv_failed(env, p, "get", rc, eb.msg);
}

static int host_kv_put(spoke_ctx *ctx, const void *key, size_t klen, const void *val,
                       size_t vlen)
{
    if (val == NULL && vlen > 0)
        return SPOKE_ERR_INVALID;
    spk_plugin *p;
    spk_host_env *env;
    int rc = kv_enter(ctx, key, klen, &p, &env);
    if (rc != 0)
        return rc;
    if (vlen > SPK_KV_MAX_VALUE)
        return SPOKE_ERR_PAYLOAD_TOO_LARGE;
    spk_errbuf eb;
    if (env->kv_txn != NULL) {
        rc = spk_kv_put(env->kv_txn, p->id, key, klen, val, vlen, &eb);
    } else {
        spk_kv *kv = kv_store(env);
        if (kv == NULL)
            return SPOKE_ERR_KV_UNAVAILABLE;
        /* A commit may wait for another process's write transaction (and, in hubd, for
         * the disk): not the plugin's time. */
        spk_slot_in_host(p->slot, 1);
        rc = spk_kv_put1(kv, p->id, key, klen, val, vlen, &eb);
        spk_slot_in_host(p->slot, 0);
    }
    return rc == 0 ? 0 : kv_failed(env, p, "put", rc, eb.msg);
}

static int host_kv_del(spoke_ctx *ctx, const void *key, size_t klen)
{
    spk_plugin *p;
    spk_host_env *env;
    int rc = kv_enter(ctx, key, klen, &p, &env);
    if (rc != 0)
        return rc;
    spk_errbuf eb;
    if (env->kv_txn != NULL) {
        rc = spk_kv_del(env->kv_txn, p->id, key, klen, &eb);
    } else {
        spk_kv *kv = kv_store(env);
        if (kv == NULL)
            return SPOKE_ERR_KV_UNAVAILABLE;
        spk_slot_in_host(p->slot, 1);
        rc = spk_kv_del1(kv, p->id, key, klen, &eb);
        spk_slot_in_host(p->slot, 0);
    }
    return rc == 0 ? 0 : kv_failed(env, p, "del", rc, eb.msg);
}

/* Between the store's scan and the plugin's callback: remember a negative answer, so
 * that kv_scan returns the plugin's own code unchanged, whatever its value. */
typedef struct kv_scan_arg {
    spoke_kv_scan_cb cb;
    void *arg;
    int cb_rc;
} kv_scan_arg;

static int kv_scan_each(void *arg, const void *key, size_t klen, const void *val, size_t vlen)
{
    kv_scan_arg *sa = arg;
    int r = sa->cb(sa->arg, key, klen, val, vlen);
    if (r < 0)
        sa->cb_rc = r;
    return r;
}

static int host_kv_scan(spoke_ctx *ctx, const void *prefix, size_t plen, const void *after,
                        size_t alen, size_t max, spoke_kv_scan_cb cb, void *arg)
{
    if (cb == NULL || (after == NULL && alen > 0))
        return SPOKE_ERR_INVALID;
    spk_plugin *p;
    spk_host_env *env;
    int rc = kv_enter(ctx, prefix, plen, &p, &env);
    if (rc != 0)
        return rc;
    if (alen > SPK_KV_MAX_KEY)
        return SPOKE_ERR_INVALID;
    spk_errbuf eb;
    kv_scan_arg sa = {cb, arg, 0};
    spk_kv_txn *t = env->kv_txn;
    if (t == NULL) {
        spk_kv *kv = kv_store(env);
        if (kv == NULL)
            return SPOKE_ERR_KV_UNAVAILABLE;
        if ((rc = spk_kv_begin(kv, NULL, false, &t, &eb)) != 0)
            return kv_failed(env, p, "scan", rc, eb.msg);
    }
    env->kv_scanning = true;
    rc = spk_kv_scan(t, p->id, prefix, plen, after, alen, max, kv_scan_each, &sa, NULL, NULL,
                     &eb);
    env->kv_scanning = false;
    if (t != env->kv_txn)
        spk_kv_abort(t);
    if (rc == 0 || (sa.cb_rc != 0 && rc == sa.cb_rc))
        return rc;
    return kv_failed(env, p, "scan", rc, eb.msg);
}

/* ---- metrics (ABI 1.4) ------------------------------------------------------------------
 *
 * Registration and series lookup are metrics.c's (they append to the worker's status slot,
 * where the supervisor reads them); a spoke_metric is a series in that slot, so an update
 * is a relaxed load and store of its value: one writer, the worker's loop. */

static spk_pmetrics *env_pm(spk_host_env *env)
{
    if (env->pm != NULL)
        return env->pm;
    if (env->pm_own == NULL)
        env->pm_own = calloc(1, sizeof(*env->pm_own));
    return env->pm_own;
}

static int host_metric_register(spoke_ctx *ctx, spoke_metric_type type, const char *name,
                                const char *help, const char *const *label_names,
                                size_t n_labels, const double *buckets, size_t n_buckets)
{
    if (ctx == NULL || ctx->plugin == NULL || ctx->plugin->env == NULL)
        return SPOKE_ERR_INVALID;
    spk_plugin *p = ctx->plugin;
    spk_pmetrics *pm = env_pm(p->env);
    if (pm == NULL)
        return SPOKE_ERR_NOMEM;
    spk_errbuf eb;
    int rc = spk_pm_register(pm, p->index, (int)type, name, help, label_names, n_labels,
                             buckets, n_buckets, &eb);
    if (rc < 0) {
        spk_warn("%s%s", p->log_prefix, eb.msg);
        return rc == SPK_ENOMEM ? SPOKE_ERR_NOMEM : SPOKE_ERR_INVALID;
    }
    return rc;
}

static spoke_metric *host_metric_series(spoke_ctx *ctx, int id, const char *const *values,
                                        size_t n_values)
{
    if (ctx == NULL || ctx->plugin == NULL || ctx->plugin->env == NULL)
        return NULL;
    spk_plugin *p = ctx->plugin;
    spk_pmetrics *pm = env_pm(p->env);
    if (pm == NULL)
        return NULL;
    spk_errbuf eb;
    spk_pm_series *s = spk_pm_series_get(pm, p->index, id, values, n_values, &eb);
    if (s == NULL)
        spk_warn("%s%s", p->log_prefix, eb.msg);
    return (spoke_metric *)s;
}

static inline double pm_load(_Atomic uint64_t *v)
{
    uint64_t u = atomic_load_explicit(v, memory_order_relaxed);
    double d;
    memcpy(&d, &u, sizeof(d));
    return d;
}

static inline void pm_store(_Atomic uint64_t *v, double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof(u));
    atomic_store_explicit(v, u, memory_order_relaxed);
}

static void host_metric_add(spoke_metric *m, double v)
{
    spk_pm_series *s = (spk_pm_series *)m;
    if (s == NULL || s->type == SPK_PM_HISTOGRAM || (s->type == SPK_PM_COUNTER && !(v >= 0)))
        return;
    pm_store(&s->v[0], pm_load(&s->v[0]) + v);
}

static void host_metric_set(spoke_metric *m, double v)
{
    spk_pm_series *s = (spk_pm_series *)m;
    if (s != NULL && s->type == SPK_PM_GAUGE)
        pm_store(&s->v[0], v);
}

static void host_metric_observe(spoke_metric *m, double v)
{
    spk_pm_series *s = (spk_pm_series *)m;
    if (s == NULL || s->type != SPK_PM_HISTOGRAM)
        return;
    unsigned b = 0;
    while (b + 1 < s->n_buckets && !(v <= s->bounds[b]))
        b++;
    spk_stat_inc(&s->v[b], 1);
    spk_stat_inc(&s->v[SPK_PM_BUCKETS], 1);
    pm_store(&s->v[SPK_PM_BUCKETS + 1], pm_load(&s->v[SPK_PM_BUCKETS + 1]) + v);
}

/* One table per role. A service a role does not offer is NULL in its table (the ABI's
 * rule 4): the control role has no connections, buffers or queue to the control plane.
 * Both roles have the KV services. */
#define HOST_SERVICES_ALL_ROLES                                                            \
    .abi_major = SPOKE_ABI_MAJOR, .abi_minor = SPOKE_ABI_MINOR,                            \
    .struct_size = sizeof(spoke_host), .log = host_log, .config_get = host_config_get,     \
    .edge_id = host_edge_id, .edge_namespace = host_edge_namespace, .every = host_every,   \
    .timer_cancel = host_timer_cancel, .signal = host_signal, .strerror = host_strerror,   \
    .config_get_duration = host_config_get_duration, .config_get_size = host_config_get_size,\
    .kv_get = host_kv_get, .kv_put = host_kv_put, .kv_del = host_kv_del,                   \
    .kv_scan = host_kv_scan, .metric_register = host_metric_register,                       \
    .metric_series = host_metric_series, .metric_add = host_metric_add,                     \
    .metric_set = host_metric_set, .metric_observe = host_metric_observe

static const spoke_host edge_table = {
    HOST_SERVICES_ALL_ROLES,
    .buf_set = host_buf_set,
    .buf_resize = host_buf_resize,
    .conn_id = host_conn_id,
    .conn_peer = host_conn_peer,
    .conn_data = host_conn_data,
    .respond = host_respond,
    .send_to_control = host_send_to_control,
    .send_to_control_json = host_send_to_control_json,
};

static const spoke_host control_table = {
    HOST_SERVICES_ALL_ROLES,
};

const spoke_host *spk_host_table(void) { return &edge_table; }

const spoke_host *spk_host_table_for(spoke_role role)
{
    return role == SPOKE_ROLE_CONTROL ? &control_table : &edge_table;
}

void spk_host_env_init(spk_host_env *env, struct ev_loop *loop, const spk_config *cfg,
                       spoke_role role)
{
    memset(env, 0, sizeof(*env));
    env->loop = loop;
    env->cfg = cfg;
    env->role = role;
    env->edge_id = cfg && cfg->edge_id ? cfg->edge_id : "";
    env->edge_namespace = cfg && cfg->edge_namespace ? cfg->edge_namespace : "";
}

size_t spk_host_health_round(spk_plugin_set *set, spk_slot *slot, unsigned *fails,
                             unsigned limit)
{
    for (size_t i = 0; i < set->n; i++) {
        spk_plugin *p = set->v[i];
        if (p->table.health == NULL)
            continue;
        uint64_t t = SPK_PLUGIN_HOOK_BEGIN(p, slot, SPK_HOOK_HEALTH);
        int rc = p->table.health(p->self);
        SPK_PLUGIN_HOOK_END(p, slot, SPK_HOOK_HEALTH, t);
        if (rc != 0)
            spk_plugin_hook_error(p, SPK_HOOK_HEALTH);
        if (rc == 0) {
            fails[i] = 0;
            continue;
        }
        fails[i]++;
        spk_warn("plugin %s: health check failed (%d), %u of %u in a row", p->name, rc, fails[i],
                 limit);
        if (fails[i] >= limit) {
            spk_error("plugin %s: failed %u health checks in a row; treating it as crashed",
                      p->name, fails[i]);
            return i + 1;
        }
    }
    return 0;
}
