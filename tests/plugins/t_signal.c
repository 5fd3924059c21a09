/*
 * t_signal -- test plugin "t-signal": emits signals the host must act on.
 *
 *  - a client chunk starting with "LOG": signal "log" (level=warn, message="t-signal saw
 *    LOG", plus fields "detail" and "pid" for log.format: json); the chunk goes on unchanged;
 *  - a client chunk starting with "TERM": responds "TERMINATED\n" and signals "terminate"
 *    (reason="asked to"), yet returns SPOKE_CONTINUE: the host must stop the chain and
 *    close the connection because of the signal alone.
 */
#include <string.h>

#include "spoke.h"

static const spoke_host *host;
static spoke_ctx *plugin_ctx;

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    (void)self;
    plugin_ctx = ctx;
    return 0;
}

static int starts_with(const spoke_buf *buf, const char *word)
{
    size_t n = strlen(word);
    return buf->len >= n && memcmp(buf->data, word, n) == 0;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)self;
    if (starts_with(buf, "LOG")) {
        /* Beside level and message: a field that needs JSON escaping, and one named like
         * a key every JSON log line has (log.format: json renames it "field.pid"). */
        const spoke_kv f[] = {{"level", "warn"},
                              {"message", "t-signal saw LOG"},
                              {"detail", "quote \" backslash \\ tab \t caf\xc3\xa9"},
                              {"pid", "not the pid"}};
        host->signal(plugin_ctx, conn, "log", f, 4);
    } else if (starts_with(buf, "TERM")) {
        const spoke_kv f[] = {{"reason", "asked to"}};
        host->respond(conn, "TERMINATED\n", 11);
        host->signal(plugin_ctx, conn, "terminate", f, 1);
    }
    return SPOKE_CONTINUE;
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER, .name = "t-signal",
    .version = "1.0.0",  .description = "emits log and terminate signals",
    .init = init,        .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
