/*
 * t_crash -- test plugin "t-crash": a client chunk starting with "CRASH" makes it write
 * through a NULL pointer (SIGSEGV) inside on_traffic_from_client. Everything else passes.
 * With config `crash_in_init: true`, init crashes instead.
 */
#include <string.h>

#include "spoke.h"

static const spoke_host *host;

static void boom(void)
{
    volatile int *volatile p = NULL;
    *p = 42;
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    (void)self;
    const char *v = host->config_get(ctx, "crash_in_init");
    if (v != NULL && strcmp(v, "true") == 0)
        boom();
    return 0;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)self;
    (void)conn;
    if (buf->len >= 5 && memcmp(buf->data, "CRASH", 5) == 0)
        boom();
    return SPOKE_CONTINUE;
}

static const spoke_plugin t_crash = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-crash",
    .version = "1.0.0",
    .description = "segfaults on CRASH",
    .init = init,
    .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(t_crash, host)
