/*
 * t_metrics -- test plugin "t-metrics": the metric services (ABI 1.4) and the merger.
 *
 * In init it registers t_chunks_total{dir} (counter), t_open_conns (gauge) and
 * t_chunk_bytes (histogram, bounds 16, 256, 4096), and tries to register a metric named
 * "bad-name" (which the host must refuse, logging why). Each client chunk adds 1 to
 * t_chunks_total{dir="in"} and observes its length; on_open/on_close move the gauge.
 *
 * With config `register: false` it registers nothing (several instances may then load).
 * With config `socket: PATH` it also serves its own Prometheus text on a Unix socket at
 * PATH, from a 10 ms timer (non-blocking accept, read the request, answer, close):
 * t_own_requests_total{kind="scrape"} counts the scrapes it answered. Config `mode`:
 * "ok" (default), "garbage" (answers text that is not Prometheus's) or "slow" (accepts
 * and never answers).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "spoke.h"

static const spoke_host *host;

#define MAX_PENDING 64

typedef struct state {
    spoke_ctx *ctx;
    spoke_metric *chunks, *open, *bytes;
    int lfd;
    int pending[MAX_PENDING];
    size_t n_pending;
    char mode[16];
    char path[108];
    unsigned long long answered;
} state;

static void answer(state *st, int fd)
{
    char resp[512];
    int n;
    if (strcmp(st->mode, "garbage") == 0)
        n = snprintf(resp, sizeof(resp), "HTTP/1.0 200 OK\r\n\r\nthis is {not prometheus\n");
    else
        n = snprintf(resp, sizeof(resp),
                     "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"
                     "# HELP t_own_requests_total Scrapes this plugin answered.\n"
                     "# TYPE t_own_requests_total counter\n"
                     "t_own_requests_total{kind=\"scrape\"} %llu 1700000000000\n",
                     ++st->answered);
    if (send(fd, resp, (size_t)n, MSG_NOSIGNAL) < 0)
        host->log(st->ctx, SPOKE_LOG_WARN, "send: %s", strerror(errno));
    shutdown(fd, SHUT_WR);
}

/* The socket's loop, on the worker's loop: accept, read each request, answer it. */
static void serve(void *self, void *arg)
{
    (void)arg;
    state *st = self;
    for (;;) {
        if (st->n_pending == MAX_PENDING)
            break;
        int fd = accept4(st->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            break;
        st->pending[st->n_pending++] = fd;
    }
    if (strcmp(st->mode, "slow") == 0)
        return;
    for (size_t i = 0; i < st->n_pending;) {
        char buf[1024];
        ssize_t n = recv(st->pending[i], buf, sizeof(buf), 0);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            i++;
            continue;
        }
        if (n > 0)
            answer(st, st->pending[i]);
        close(st->pending[i]);
        st->pending[i] = st->pending[--st->n_pending];
    }
}

static int open_socket(state *st, const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(a.sun_path))
        return SPOKE_ERR_INVALID;
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
    snprintf(st->path, sizeof(st->path), "%s", path);
    unlink(path);
    st->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (st->lfd < 0 || bind(st->lfd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        listen(st->lfd, 64) != 0) {
        host->log(st->ctx, SPOKE_LOG_ERROR, "socket %s: %s", path, strerror(errno));
        return SPOKE_ERR_INVALID;
    }
    int64_t t = host->every(st->ctx, 10, serve, NULL);
    return t > 0 ? 0 : (int)t;
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    if (!SPOKE_HOST_HAS(host, metric_register))
        return SPOKE_ERR_UNSUPPORTED;
    state *st = calloc(1, sizeof(*st));
    if (st == NULL)
        return SPOKE_ERR_NOMEM;
    st->ctx = ctx;
    st->lfd = -1;
    const char *reg = host->config_get(ctx, "register");
    if (reg != NULL && strcmp(reg, "false") == 0)
        goto socket;
    static const char *const dir[] = {"dir"};
    static const double bounds[] = {16, 256, 4096};
    int c = host->metric_register(ctx, SPOKE_METRIC_COUNTER, "t_chunks_total",
                                  "Client chunks seen.", dir, 1, NULL, 0);
    int g = host->metric_register(ctx, SPOKE_METRIC_GAUGE, "t_open_conns",
                                  "Connections open now.", NULL, 0, NULL, 0);
    int h = host->metric_register(ctx, SPOKE_METRIC_HISTOGRAM, "t_chunk_bytes",
                                  "Sizes of client chunks.", NULL, 0, bounds, 3);
    int bad = host->metric_register(ctx, SPOKE_METRIC_GAUGE, "bad-name", NULL, NULL, 0,
                                    NULL, 0);
    if (c < 0 || g < 0 || h < 0 || bad != SPOKE_ERR_INVALID) {
        free(st);
        return SPOKE_ERR_INVALID;
    }
    static const char *const in[] = {"in"};
    st->chunks = host->metric_series(ctx, c, in, 1);
    st->open = host->metric_series(ctx, g, NULL, 0);
    st->bytes = host->metric_series(ctx, h, NULL, 0);
    if (st->chunks == NULL || st->open == NULL || st->bytes == NULL) {
        free(st);
        return SPOKE_ERR_INVALID;
    }
socket:;
    const char *mode = host->config_get(ctx, "mode");
    snprintf(st->mode, sizeof(st->mode), "%s", mode ? mode : "ok");
    const char *path = host->config_get(ctx, "socket");
    if (path != NULL) {
        int rc = open_socket(st, path);
        if (rc != 0) {
            if (st->lfd >= 0)
                close(st->lfd);
            free(st);
            return rc;
        }
    }
    *self = st;
    return 0;
}

static void fini(void *self)
{
    state *st = self;
    for (size_t i = 0; i < st->n_pending; i++)
        close(st->pending[i]);
    if (st->lfd >= 0) {
        close(st->lfd);
        unlink(st->path);
    }
    free(st);
}

/* The metric services ignore a NULL series: an instance that registered nothing. */
static spoke_verdict on_open(void *self, spoke_conn *conn)
{
    (void)conn;
    host->metric_add(((state *)self)->open, 1);
    return SPOKE_CONTINUE;
}

static void on_close(void *self, spoke_conn *conn)
{
    (void)conn;
    host->metric_add(((state *)self)->open, -1);
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)conn;
    state *st = self;
    host->metric_add(st->chunks, 1);
    host->metric_observe(st->bytes, (double)buf->len);
    return SPOKE_CONTINUE;
}

static const spoke_plugin t_metrics = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-metrics",
    .version = "1.0.0",
    .description = "registers metrics and serves its own",
    .init = init,
    .fini = fini,
    .on_open = on_open,
    .on_close = on_close,
    .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(t_metrics, host)
