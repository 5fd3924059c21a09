/*
 * metrics_http.h -- the /metrics endpoint: libmicrohttpd driven from a libev loop.
 *
 * The daemon runs without a thread of its own (MHD_USE_EPOLL, no internal polling
 * thread): its epoll descriptor is watched by an ev_io, MHD_run() does what is ready
 * without blocking, and an ev_timer follows MHD_get_timeout() for its connection
 * timeouts. Every socket is non-blocking, so a client that sends its request a byte at a
 * time, or never reads the answer, or just holds a connection open, costs the loop
 * nothing but a descriptor: the loop (the supervisor's, which also runs the watchdog
 * and the admin socket) never waits on one. Idle connections are closed after
 * SPK_METRICS_HTTP_IDLE_S; at most SPK_METRICS_HTTP_CONNS are held at once.
 *
 * GET (or HEAD) /metrics answers the text `build` writes (Prometheus text format 0.0.4),
 * rewritten as OpenMetrics 1.0.0 when the request's Accept header names
 * application/openmetrics-text. Any other path is 404, any other method 405.
 */
#ifndef SPK_METRICS_HTTP_H
#define SPK_METRICS_HTTP_H

#include <ev.h>

#include "err.h"
#include "metrics.h"

#define SPK_METRICS_HTTP_IDLE_S 10
#define SPK_METRICS_HTTP_CONNS 512

typedef struct spk_metrics_http spk_metrics_http;

/* Writes the Prometheus text of one scrape into out (called on the loop). */
typedef void (*spk_metrics_build_fn)(void *arg, spk_mbuf *out);

/* Serve /metrics on `listen_fd` (a bound, listening TCP or Unix socket; borrowed: the
 * caller closes it after spk_metrics_http_stop) from `loop`. Returns 0 and *out, or
 * SPK_EIO / SPK_ENOMEM with the reason in eb. */
int spk_metrics_http_start(struct ev_loop *loop, int listen_fd, spk_metrics_build_fn build,
                           void *arg, spk_metrics_http **out, spk_errbuf *eb);

/* Stop serving, close every client connection and free h. NULL is allowed. */
void spk_metrics_http_stop(spk_metrics_http *h);

/* Requests answered since start (for tests and the status report). */
unsigned long long spk_metrics_http_served(const spk_metrics_http *h);

#endif
