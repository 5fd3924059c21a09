/*
 * grpc_client.h -- unary gRPC calls over HTTP/2 with libcurl's multi interface, driven by
 * a libev loop (curl_multi_socket_action). The uplink is its one user.
 *
 * URLS. "http://host:port" speaks HTTP/2 with prior knowledge (h2c); "https://host:port"
 * speaks TLS with ALPN "h2", verifying the server against opts.ca_file (or the system's
 * CAs), and presents opts.cert_file/opts.key_file for mutual TLS when both are set.
 *
 * CONNECTIONS. Over TLS one connection is kept and reused across calls. Over h2c every
 * call opens its own connection: libcurl 7.88 (Debian 12) fails every request after the
 * first on a reused prior-knowledge connection with CURLE_HTTP2 (curl issue 10634, fixed
 * in 8.0.0), so reuse is only turned on for h2c when the running libcurl is 8.0 or newer.
 * spk_grpc_client_stats() counts connections opened, so tests and the bench can see it.
 *
 * STATUS. A call's outcome is always a gRPC status: the server's grpc-status (from
 * trailers, or from the headers of a Trailers-Only answer), or, when the transport failed,
 * UNAVAILABLE (could not connect, reset, an HTTP status other than 200, see
 * PROTOCOL-HTTP2.md's mapping), DEADLINE_EXCEEDED (the call's timeout passed) or
 * INTERNAL (a 200 answer with no grpc-status: libcurl 7.88 can report a reset stream as a
 * complete transfer, so a missing status is a failure, never a success).
 *
 * Threads: one. The loop, the client and every callback run on the caller's thread.
 */
#ifndef SPK_GRPC_CLIENT_H
#define SPK_GRPC_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "grpc.h"

struct ev_loop;
typedef struct spk_grpc_client spk_grpc_client;

typedef struct spk_grpc_client_opts {
    const char *url;          /* required: "http://host:port" or "https://host:port" */
    const char *ca_file;      /* https: PEM CAs to verify the server; NULL: the system's */
    const char *cert_file;    /* https: client certificate (PEM) for mutual TLS, or NULL */
    const char *key_file;     /* its private key (PEM); set both or neither */
    const char *token;        /* sent as "authorization: Bearer <token>"; NULL: none */
    const char *user_agent;   /* NULL: "spoke/<version>" */
    size_t max_response;      /* the largest response message accepted (default 4 MiB) */
    uint64_t connect_timeout_ms; /* default 5000 */
} spk_grpc_client_opts;

/* The outcome of one call, handed to its callback. Borrowed for the callback's duration. */
typedef struct spk_grpc_result {
    int status;               /* spk_grpc_code */
    const char *message;      /* grpc-message decoded, or what failed; never NULL */
    const uint8_t *msg;       /* the response message (status OK only), else NULL */
    size_t msg_len;
    long http_status;         /* 0 when no response arrived */
    double seconds;           /* from the call's start to its end */
    bool new_connection;      /* the call opened a connection (rather than reusing one) */
} spk_grpc_result;

typedef void (*spk_grpc_done)(void *arg, const spk_grpc_result *r);

/* Create a client on `loop`. Copies every string of opts. Returns 0, SPK_EINVAL (bad URL,
 * cert without key), SPK_ENOMEM or SPK_EIO (libcurl refused an option), with a reason in
 * eb. Free with spk_grpc_client_free(). */
int spk_grpc_client_new(struct ev_loop *loop, const spk_grpc_client_opts *opts,
                        spk_grpc_client **out, spk_errbuf *eb);

/* Cancel every call in flight (their callbacks are not called), close connections, free.
 * NULL is allowed. */
void spk_grpc_client_free(spk_grpc_client *c);

/* Start a unary call of `path` ("/package.Service/Method"). The request message is the
 * `msg_len` bytes at buf + SPK_GRPC_PREFIX; the client writes the 5-byte prefix into
 * buf[0..5), so the caller builds the message once, in place. `buf` is borrowed until
 * `done` is called. `timeout_ms` (>= 1) bounds the whole call and is sent as
 * grpc-timeout. `done` is called exactly once, from the loop, never from inside this
 * function. Returns 0, or SPK_ENOMEM / SPK_EIO with a reason (then `done` is not called). */
int spk_grpc_client_call(spk_grpc_client *c, const char *path, uint8_t *buf, size_t msg_len,
                         uint64_t timeout_ms, spk_grpc_done done, void *arg, spk_errbuf *eb);

/* Calls in flight. */
size_t spk_grpc_client_inflight(const spk_grpc_client *c);

typedef struct spk_grpc_client_stats {
    uint64_t calls;           /* calls finished, whatever their status */
    uint64_t connections;     /* connections opened */
} spk_grpc_client_stats;

void spk_grpc_client_stats_get(const spk_grpc_client *c, spk_grpc_client_stats *st);

#endif
