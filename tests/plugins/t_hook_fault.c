/*
 * t_hook_fault -- test plugin "t-hook-fault": misbehaves in the lifecycle hooks the host
 * calls outside traffic, so that tests can check the crash or hang is blamed on it.
 *
 *   crash_in_config_loaded_if: PATH   on_config_loaded writes through a NULL pointer
 *                                     (SIGSEGV) when the file PATH exists
 *   hang_in_fini: true                fini blocks for 30 s
 *
 * Traffic passes unchanged.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "spoke.h"

static const spoke_host *host;

typedef struct state {
    char crash_if[1024];
    int hang_in_fini;
} state;

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    state *st = calloc(1, sizeof(*st));
    if (st == NULL)
        return SPOKE_ERR_NOMEM;
    const char *v = host->config_get(ctx, "crash_in_config_loaded_if");
    if (v != NULL && strlen(v) < sizeof(st->crash_if))
        strcpy(st->crash_if, v);
    v = host->config_get(ctx, "hang_in_fini");
    st->hang_in_fini = v != NULL && strcmp(v, "true") == 0;
    *self = st;
    return 0;
}

static void on_config_loaded(void *self)
{
    state *st = self;
    if (st->crash_if[0] != '\0' && access(st->crash_if, F_OK) == 0) {
        volatile int *volatile p = NULL;
        *p = 42;
    }
}

static void fini(void *self)
{
    state *st = self;
    if (st->hang_in_fini) {
        struct timespec ts = {30, 0};
        while (nanosleep(&ts, &ts) != 0)
            ;
    }
    free(st);
}

static const spoke_plugin t_hook_fault = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-hook-fault",
    .version = "1.0.0",
    .description = "crashes in on_config_loaded or hangs in fini on request",
    .init = init,
    .fini = fini,
    .on_config_loaded = on_config_loaded,
};

SPOKE_PLUGIN_ENTRY(t_hook_fault, host)
