/*
 * t_args -- test plugin "t-args": init logs what it was handed, in order, as one line:
 *     args=[a|b|c] env=[K=V|X=Y] config=[k1=v1|k2.sub=v2]
 * then the edge identity as "edge=ID ns=NS"; on_config_loaded logs "t-args: config loaded".
 */
#include <stdio.h>

#include "spoke.h"

static const spoke_host *host;
static spoke_ctx *plugin_ctx;

/* Append to a fixed line; a line that does not fit is cut, which is fine for a test. */
typedef struct line {
    char s[4096];
    size_t n;
} line;

static void put(line *l, const char *a, const char *b, const char *c)
{
    if (l->n >= sizeof(l->s))
        return;
    int w = snprintf(l->s + l->n, sizeof(l->s) - l->n, "%s%s%s", a, b, c);
    if (w > 0)
        l->n += (size_t)w;
}

static void put_list(line *l, const char *label, const char *const *v, size_t n)
{
    put(l, l->n ? " " : "", label, "=[");
    for (size_t i = 0; i < n; i++)
        put(l, i ? "|" : "", v[i] ? v[i] : "(null)", "");
    put(l, "]", "", "");
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)self;
    plugin_ctx = ctx;
    static line l; /* 4 KiB: not on the stack */
    l.n = 0;
    l.s[0] = '\0';
    put_list(&l, "args", args->args, args->n_args);
    put_list(&l, "env", args->env, args->n_env);
    put(&l, " ", "config", "=[");
    for (size_t i = 0; i < args->n_config; i++) {
        put(&l, i ? "|" : "", args->config[i].key, "=");
        put(&l, args->config[i].value, "", "");
    }
    put(&l, "]", "", "");
    host->log(ctx, SPOKE_LOG_INFO, "%s", l.s);
    host->log(ctx, SPOKE_LOG_INFO, "edge=%s ns=%s", host->edge_id(ctx), host->edge_namespace(ctx));
    return 0;
}

static void config_loaded(void *self)
{
    (void)self;
    host->log(plugin_ctx, SPOKE_LOG_INFO, "t-args: config loaded");
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER, .name = "t-args",
    .version = "1.0.0",  .description = "logs its args, env, config and edge identity",
    .init = init,        .on_config_loaded = config_loaded,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
