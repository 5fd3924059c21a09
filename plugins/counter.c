/*
 * counter -- counts connections and bytes, and logs the totals periodically.
 *
 * It counts connections opened and open now, and bytes in each of the four directions
 * the host shows a plugin: read from the client, sent to the server, read from the
 * server, sent to the client. (The "to" counts are taken after every plugin ran, so they
 * differ from the "from" counts when a plugin rewrites, answers or drops traffic.) Every
 * `interval` it logs one line
 *
 *     connections opened=12 open=3 bytes from_client=5120 to_server=5120 from_server=...
 *
 * and fini logs the same totals once more, prefixed with "final:". It never changes
 * traffic.
 *
 * Config:
 *   interval   how often to log: a duration as the config file writes one, "500ms",
 *              "10s", "1m", "1h" (default 10s; 1ms..24h), read with the host's
 *              config_get_duration.
 *
 * Counts are per worker process: each worker loads its own copy of the plugin. A
 * connection counts as open from on_open to on_close; on_close runs for every connection
 * but on_open does not when an earlier plugin refused the connection in its own on_open,
 * so the plugin marks the connections it counted (through conn_data) and only those
 * leave the "open" count.
 */
#include <inttypes.h>
#include <stdlib.h>

#include "spoke.h"

#define COUNTER_DEFAULT_INTERVAL_MS 10000u
#define COUNTER_MAX_INTERVAL_MS     (24u * 3600u * 1000u)

static const spoke_host *host;

typedef struct counter {
    spoke_ctx *ctx;
    uint64_t opened;
    uint64_t open_now;
    uint64_t from_client;
    uint64_t to_server;
    uint64_t from_server;
    uint64_t to_client;
} counter;

/* The conn_data value of a connection counted in on_open. Only its address matters. */
static char counted_mark;

static void log_totals(const counter *c, const char *prefix)
{
    host->log(c->ctx, SPOKE_LOG_INFO,
              "%sconnections opened=%" PRIu64 " open=%" PRIu64 " bytes from_client=%" PRIu64
              " to_server=%" PRIu64 " from_server=%" PRIu64 " to_client=%" PRIu64,
              prefix, c->opened, c->open_now, c->from_client, c->to_server, c->from_server,
              c->to_client);
}

static void on_timer(void *self, void *arg)
{
    (void)arg;
    log_totals(self, "");
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    if (!SPOKE_HOST_HAS(host, config_get_duration)) {
        host->log(ctx, SPOKE_LOG_ERROR, "this host lacks config_get_duration (spoke ABI 1.1)");
        return SPOKE_ERR_UNSUPPORTED;
    }
    /* The host reads the duration as it reads the config file's own (units.h). */
    uint64_t ms = COUNTER_DEFAULT_INTERVAL_MS;
    if (host->config_get_duration(ctx, "interval", &ms) != 0 || ms == 0 ||
        ms > COUNTER_MAX_INTERVAL_MS) {
        const char *iv = host->config_get(ctx, "interval");
        host->log(ctx, SPOKE_LOG_ERROR,
                  "interval: '%s' is not a duration between 1ms and 24h (e.g. 500ms, 10s)",
                  iv ? iv : "");
        return SPOKE_ERR_INVALID;
    }
    counter *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return SPOKE_ERR_NOMEM;
    c->ctx = ctx;
    *self = c;
    /* A host without timers (e.g. a tool that only runs init) still gets the final line. */
    int64_t id = host->every(ctx, ms, on_timer, NULL);
    if (id < 0)
        host->log(ctx, SPOKE_LOG_WARN, "no periodic report: every() failed: %s",
                  host->strerror((int)id));
    return 0;
}

static void fini(void *self)
{
    counter *c = self;
    if (c == NULL)
        return;
    log_totals(c, "final: ");
    free(c);
}

static spoke_verdict on_open(void *self, spoke_conn *conn)
{
    counter *c = self;
    void **slot = host->conn_data(conn, c->ctx);
    c->opened++;
    if (slot != NULL) {
        *slot = &counted_mark;
        c->open_now++;
    }
    return SPOKE_CONTINUE;
}

static void on_close(void *self, spoke_conn *conn)
{
    counter *c = self;
    void **slot = host->conn_data(conn, c->ctx);
    if (slot != NULL && *slot == &counted_mark) {
        *slot = NULL;
        c->open_now--;
    }
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)conn;
    ((counter *)self)->from_client += buf->len;
    return SPOKE_CONTINUE;
}

static spoke_verdict to_server(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)conn;
    ((counter *)self)->to_server += buf->len;
    return SPOKE_CONTINUE;
}

static spoke_verdict from_server(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)conn;
    ((counter *)self)->from_server += buf->len;
    return SPOKE_CONTINUE;
}

static spoke_verdict to_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)conn;
    ((counter *)self)->to_client += buf->len;
    return SPOKE_CONTINUE;
}

static const spoke_plugin counter_plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "counter",
    .version = "1.0.0",
    .description = "counts connections and bytes per direction, logs them periodically",
    .init = init,
    .fini = fini,
    .on_open = on_open,
    .on_close = on_close,
    .on_traffic_from_client = from_client,
    .on_traffic_to_server = to_server,
    .on_traffic_from_server = from_server,
    .on_traffic_to_client = to_client,
};

SPOKE_PLUGIN_ENTRY(counter_plugin, host)
