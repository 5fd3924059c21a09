/*
 * host.c -- the services a plugin can call (the spoke_host table).
 *
 * Every service finds its context through the spoke_ctx the plugin passes: ctx->plugin
 * is the loaded plugin, plugin->env the worker's environment (loop, config, queue). The
 * connection services find theirs through spoke_conn, which the chain fills in before a
 * hook runs. Nothing here allocates on the traffic path except buf_set/buf_resize growing
 * a buffer beyond its previous capacity, and respond() queueing bytes.
 */
#include "host.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

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
    va_list ap;
    va_start(ap, fmt);
    spk_logv(level, ctx && ctx->plugin ? ctx->plugin->log_prefix : "plugin ?: ", fmt, ap);
    va_end(ap);
}

static const char *host_config_get(spoke_ctx *ctx, const char *key)
{
    if (ctx == NULL || key == NULL || ctx->plugin->conf == NULL)
        return NULL;
    const spk_plugin_conf *pc = ctx->plugin->conf;
    for (size_t i = 0; i < pc->n_config; i++)
        if (strcmp(pc->config[i].key, key) == 0)
            return pc->config[i].value;
    return NULL;
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
    const spk_chain *ch = p->env ? p->env->chain : NULL;
    if (ch != NULL) {
        atomic_store_explicit(&ch->slot->plugin, p->index + 1, memory_order_relaxed);
        atomic_store_explicit(&ch->slot->hook, SPK_HOOK_TIMER, memory_order_relaxed);
        spk_slot_bump(ch->slot);
    }
    t->cb(p->self, t->arg);
    if (ch != NULL)
        atomic_store_explicit(&ch->slot->plugin, 0, memory_order_relaxed);
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

void spk_host_timers_free(spk_plugin *p)
{
    while (p->timers != NULL) {
        spk_timer *t = p->timers;
        p->timers = t->next;
        if (p->env != NULL && p->env->loop != NULL)
            ev_timer_stop(p->env->loop, &t->w);
        free(t);
    }
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

static int host_signal(spoke_ctx *ctx, spoke_conn *c, const char *name, const spoke_kv *f,
                       size_t n)
{
    if (ctx == NULL || name == NULL || (f == NULL && n > 0))
        return SPOKE_ERR_INVALID;
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
        spk_log(lvl, "%s%s%s", prefix, cid, msg ? msg : "(no message)");
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

static const char *host_strerror(int status) { return spk_strerror(status); }

static const spoke_host host_table = {
    .abi_major = SPOKE_ABI_MAJOR,
    .abi_minor = SPOKE_ABI_MINOR,
    .struct_size = sizeof(spoke_host),
    .log = host_log,
    .config_get = host_config_get,
    .edge_id = host_edge_id,
    .edge_namespace = host_edge_namespace,
    .every = host_every,
    .timer_cancel = host_timer_cancel,
    .buf_set = host_buf_set,
    .buf_resize = host_buf_resize,
    .conn_id = host_conn_id,
    .conn_peer = host_conn_peer,
    .conn_data = host_conn_data,
    .respond = host_respond,
    .signal = host_signal,
    .send_to_control = NULL, /* offered once the queue is wired in (issue 5) */
    .send_to_control_json = NULL,
    .strerror = host_strerror,
};

const spoke_host *spk_host_table(void) { return &host_table; }

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
