/*
 * proxy.h -- the TCP/Unix proxy of one worker: accepts clients on listening sockets it is
 * given, connects each to the upstream, and streams bytes both ways through the plugin
 * chain, on one libev loop.
 *
 * Per connection and direction at most `listen.high_watermark` bytes wait to be written
 * to a slow peer; past that the proxy stops reading from the other side until the
 * backlog drains (backpressure: memory stays bounded whatever the peers do). A FIN from
 * one side is passed on as a half-close once that direction's pending bytes are written;
 * the connection ends when both directions have ended, or on an error.
 *
 * The listening sockets are borrowed: the caller (the supervisor, or spoked in single
 * process mode) owns and closes them.
 */
#ifndef SPK_PROXY_H
#define SPK_PROXY_H

#include <ev.h>
#include <stdatomic.h>
#include <stddef.h>

#include "chain.h"
#include "config.h"
#include "err.h"

typedef struct spk_proxy spk_proxy;

/* Create a proxy on `loop` for the listening, non-blocking sockets `fds[0..n)` and `cfg`
 * (both borrowed, they must outlive the proxy), running `chain` (borrowed) on the traffic.
 * Resolves listen.upstream now. The proxy does not accept until spk_proxy_start_accepting().
 * Returns 0 or an error with the reason in eb; the caller frees *out with spk_proxy_free(). */
int spk_proxy_new(struct ev_loop *loop, const spk_config *cfg, const int *fds, size_t n,
                  const spk_chain *chain, spk_proxy **out, spk_errbuf *eb);

/* Start accepting on the listening sockets. Idempotent. */
void spk_proxy_start_accepting(spk_proxy *px);

/* Stop accepting new connections (open ones carry on). Idempotent. */
void spk_proxy_stop_accepting(spk_proxy *px);

/* Number of open client connections, and of all accepted since creation. */
size_t spk_proxy_active(const spk_proxy *px);
uint64_t spk_proxy_accepted(const spk_proxy *px);
/* Where the proxy stores its totals (connections accepted; bytes read from the clients
 * and from the upstream) as they change (relaxed stores; a worker's status
 * slot, so a worker killed with kill -9 has published every connection and byte). The
 * struct and what it points to must outlive px. */
typedef struct spk_proxy_counters {
    _Atomic uint64_t *accepted, *bytes_from_client, *bytes_from_server;
} spk_proxy_counters;
void spk_proxy_publish(spk_proxy *px, spk_proxy_counters *pub);

/* Close every connection at once (on_close hooks run) and stop accepting. */
void spk_proxy_close_all(spk_proxy *px);

/* Close all connections and free the proxy. NULL is allowed. */
void spk_proxy_free(spk_proxy *px);

#endif
