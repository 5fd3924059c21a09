/*
 * bench_crash -- edge plugin "bench-crash" for spoke-bench crash: a client chunk starting
 * with "CRASH" makes it write through a NULL pointer (SIGSEGV) inside
 * on_traffic_from_client, as a buggy plugin would; every other chunk passes unchanged.
 * With config `fail_init: true` its init fails instead, so a reload naming it that way is
 * refused (the soak's failing reloads).
 */
#include <string.h>

#include "spoke.h"

static const spoke_host *host;

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    (void)self;
    const char *v = host->config_get(ctx, "fail_init");
    if (v != NULL && strcmp(v, "true") == 0) {
        host->log(ctx, SPOKE_LOG_WARN, "bench-crash: init fails (fail_init: true)");
        return -1;
    }
    return 0;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)self;
    (void)conn;
    if (buf->len >= 5 && memcmp(buf->data, "CRASH", 5) == 0) {
        volatile int *volatile p = NULL;
        *p = 42;
    }
    return SPOKE_CONTINUE;
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "bench-crash",
    .version = "1.0.0",
    .description = "segfaults on a chunk starting with CRASH (spoke-bench crash)",
    .init = init,
    .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
