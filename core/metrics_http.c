/*
 * metrics_http.c -- the /metrics endpoint on libmicrohttpd, driven by libev (see
 * metrics_http.h).
 *
 * Why libmicrohttpd and not a responder of our own: it parses HTTP/1.0 and 1.1 requests
 * that arrive in any number of pieces, handles keep-alive, HEAD, pipelining, header limits
 * and timeouts, and it runs on an external loop without a thread. What spoke adds is the
 * wiring: the daemon's epoll descriptor in an ev_io, MHD_run() when it is readable, and a
 * timer at MHD_get_timeout() (the daemon's idle timeouts, and work it has left when it
 * returns 0).
 */
#include "metrics_http.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <microhttpd.h>

#define PROM_TYPE "text/plain; version=0.0.4; charset=utf-8"
#define OPENMETRICS_TYPE "application/openmetrics-text; version=1.0.0; charset=utf-8"

struct spk_metrics_http {
    struct ev_loop *loop;
    struct MHD_Daemon *d;
    ev_io io;
    ev_timer timer;
    spk_metrics_build_fn build;
    void *arg;
    unsigned long long served;
};

static void reschedule(spk_metrics_http *h)
{
    MHD_UNSIGNED_LONG_LONG ms;
    ev_timer_stop(h->loop, &h->timer);
    if (MHD_get_timeout(h->d, &ms) == MHD_YES) {
        ev_timer_set(&h->timer, (double)ms / 1000.0, 0);
        ev_timer_start(h->loop, &h->timer);
    }
}

static void run(spk_metrics_http *h)
{
    MHD_run(h->d); /* non-blocking: the daemon has no thread and waits on nothing */
    reschedule(h);
}

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    run(w->data);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    run(w->data);
}

static bool wants_openmetrics(struct MHD_Connection *c)
{
    const char *accept = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Accept");
    return accept != NULL && strcasestr(accept, "application/openmetrics-text") != NULL;
}

static enum MHD_Result answer(struct MHD_Connection *c, unsigned status, const char *type,
                              char *body, size_t len)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, body, body ? MHD_RESPMEM_MUST_FREE
                                                        : MHD_RESPMEM_PERSISTENT);
    if (r == NULL) {
        free(body);
        return MHD_NO; /* out of memory: the daemon closes the connection */
    }
    if (type != NULL)
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    enum MHD_Result rc = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version,
                                  const char *upload, size_t *upload_size, void **req)
{
    (void)version;
    (void)upload;
    spk_metrics_http *h = cls;
    if (*req == NULL) {
        /* The headers are in; answer once the (empty) body is too. */
        *req = h;
        return MHD_YES;
    }
    if (*upload_size != 0) {
        *upload_size = 0; /* a body we do not want: discard it */
        return MHD_YES;
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return answer(c, MHD_HTTP_METHOD_NOT_ALLOWED, NULL, NULL, 0);
    if (strcmp(url, "/metrics") != 0)
        return answer(c, MHD_HTTP_NOT_FOUND, NULL, NULL, 0);
    spk_mbuf text = {0};
    h->build(h->arg, &text);
    h->served++;
    if (text.failed) {
        free(text.p);
        return answer(c, MHD_HTTP_INTERNAL_SERVER_ERROR, NULL, NULL, 0);
    }
    if (!wants_openmetrics(c))
        return answer(c, MHD_HTTP_OK, PROM_TYPE, text.p, text.len);
    spk_mbuf om = {0};
    spk_metrics_to_openmetrics(text.p ? text.p : "", text.len, &om);
    free(text.p);
    if (om.failed) {
        free(om.p);
        return answer(c, MHD_HTTP_INTERNAL_SERVER_ERROR, NULL, NULL, 0);
    }
    return answer(c, MHD_HTTP_OK, OPENMETRICS_TYPE, om.p, om.len);
}

int spk_metrics_http_start(struct ev_loop *loop, int listen_fd, spk_metrics_build_fn build,
                           void *arg, spk_metrics_http **out, spk_errbuf *eb)
{
    spk_metrics_http *h = calloc(1, sizeof(*h));
    if (h == NULL)
        return spk_errf(eb, SPK_ENOMEM, "metrics endpoint: out of memory");
    h->loop = loop;
    h->build = build;
    h->arg = arg;
    int fl = fcntl(listen_fd, F_GETFL);
    if (fl >= 0)
        fcntl(listen_fd, F_SETFL, fl | O_NONBLOCK);
    h->d = MHD_start_daemon(MHD_USE_EPOLL, 0, NULL, NULL, on_request, h,
                            MHD_OPTION_LISTEN_SOCKET, listen_fd,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)SPK_METRICS_HTTP_IDLE_S,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)SPK_METRICS_HTTP_CONNS,
                            MHD_OPTION_END);
    if (h->d == NULL) {
        free(h);
        return spk_errf(eb, SPK_EIO, "metrics endpoint: libmicrohttpd could not start on the "
                        "metrics.listen socket");
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_EPOLL_FD);
    if (info == NULL) {
        MHD_stop_daemon(h->d);
        free(h);
        return spk_errf(eb, SPK_EIO, "metrics endpoint: libmicrohttpd has no epoll descriptor");
    }
    ev_io_init(&h->io, on_io, info->epoll_fd, EV_READ);
    h->io.data = h;
    ev_io_start(loop, &h->io);
    ev_timer_init(&h->timer, on_timer, 0, 0);
    h->timer.data = h;
    reschedule(h);
    *out = h;
    return 0;
}

void spk_metrics_http_stop(spk_metrics_http *h)
{
    if (h == NULL)
        return;
    ev_io_stop(h->loop, &h->io);
    ev_timer_stop(h->loop, &h->timer);
    /* The listening socket is the caller's: take it back before the daemon closes it. */
    MHD_quiesce_daemon(h->d);
    MHD_stop_daemon(h->d);
    free(h);
}

unsigned long long spk_metrics_http_served(const spk_metrics_http *h)
{
    return h ? h->served : 0;
}
