/*
 * t_sleep -- test plugin "t-sleep": a client chunk starting with "SLEEP" blocks the hook for
 * 30 s (far past any hook_timeout); "NAP" blocks it for 100 ms. Everything else passes.
 * With config `hang_in_init: true`, init blocks for 30 s (a plugin that never starts).
 */
#include <string.h>
#include <time.h>

#include "spoke.h"

static const spoke_host *host;

static void nap(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    (void)self;
    const char *v = host->config_get(ctx, "hang_in_init");
    if (v != NULL && strcmp(v, "true") == 0)
        nap(30000);
    return 0;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)self;
    (void)conn;
    if (buf->len >= 5 && memcmp(buf->data, "SLEEP", 5) == 0)
        nap(30000);
    else if (buf->len >= 3 && memcmp(buf->data, "NAP", 3) == 0)
        nap(100);
    return SPOKE_CONTINUE;
}

static const spoke_plugin t_sleep = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-sleep",
    .version = "1.0.0",
    .init = init,
    .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(t_sleep, host)
