/*
 * t_lifecycle -- test plugin: appends what the host calls to the file named by config
 * `mark`, one line each: "init NAME send_to_control=yes|no" (whether the host table it
 * was handed offers send_to_control) and "fini NAME". With config `fail: 1`, init
 * fails with SPOKE_ERR_INVALID after writing its line (and keeps nothing), so a test can
 * see whether the host calls fini after a failed init (it must not).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spoke.h"

static const spoke_host *host;

typedef struct lc {
    char mark[512];
    char name[80];
} lc;

static void mark(const char *path, const char *what, const char *name, const char *extra)
{
    FILE *f = fopen(path, "a");
    if (f == NULL)
        return;
    fprintf(f, "%s %s%s\n", what, name, extra);
    fclose(f);
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    const char *path = host->config_get(ctx, "mark");
    const char *fail = host->config_get(ctx, "fail");
    if (path == NULL)
        return SPOKE_ERR_INVALID;
    mark(path, "init", args->name,
         SPOKE_HOST_HAS(host, send_to_control) ? " send_to_control=yes" : " send_to_control=no");
    if (fail != NULL && strcmp(fail, "1") == 0)
        return SPOKE_ERR_INVALID;
    lc *l = calloc(1, sizeof(*l));
    if (l == NULL)
        return SPOKE_ERR_NOMEM;
    snprintf(l->mark, sizeof(l->mark), "%s", path);
    snprintf(l->name, sizeof(l->name), "%s", args->name);
    *self = l;
    return 0;
}

static void fini(void *self)
{
    lc *l = self;
    if (l == NULL)
        return;
    mark(l->mark, "fini", l->name, "");
    free(l);
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER, .name = "t-lifecycle", .version = "1.0.0", .init = init, .fini = fini,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
