/*
 * grpc_server.h -- hubd's gRPC server: HTTP/2 sessions (nghttp2) on a libev loop, over
 * cleartext (h2c with prior knowledge) or TLS with ALPN "h2" (OpenSSL), for unary calls.
 *
 * A worker creates one server on its loop and hands it its listening socket (or accepted
 * connections). For every request that arrived whole and well-formed (POST, a gRPC
 * content-type, one uncompressed message within opts.max_message) the server calls
 * opts.handler with a call; the handler (or code it hands the call to, later on the same
 * loop: hubd answers batches after their group commit) answers it exactly once with
 * spk_grpc_call_respond() or spk_grpc_call_fail(). A call whose connection went away
 * before the answer is still answered (the answer is then dropped) so that ownership
 * never depends on the peer: the server frees a call when it is answered.
 *
 * Malformed requests never reach the handler; they get the status PROTOCOL-HTTP2.md asks
 * for, as a Trailers-Only answer (each also carries grpc-status and grpc-message, as
 * grpc-go's do): a wrong or missing content-type is HTTP 415 (INVALID_ARGUMENT), a method
 * other than POST HTTP 405 (INTERNAL), a header list over the limit, or a message over
 * the limit, RESOURCE_EXHAUSTED, a truncated or extra message or a malformed
 * grpc-timeout INVALID_ARGUMENT, a compressed message UNIMPLEMENTED. A refusal is sent
 * as soon as it is known (an over-limit message after its 5-byte prefix); when the
 * client is still sending, a RST_STREAM(NO_ERROR) follows the answer (RFC 9113 8.1).
 * Answers never carry content-length (libcurl 7.88 delivers trailers only then).
 *
 * LIMITS, so that a hostile or broken peer can neither crash the server nor make it
 * allocate without bound: SETTINGS_MAX_CONCURRENT_STREAMS (opts.max_streams), the bytes
 * of one request's header list (counted as they arrive: nghttp2 1.52 does not enforce
 * it), the message size, the connections per server, and these deadlines, each of which
 * closes the whole connection (GOAWAY, then close): the TLS handshake and the client's
 * preface and first SETTINGS within request_timeout_ms of the accept; each request whole
 * within request_timeout_ms of its first HEADERS (slow-loris); answers that make no
 * progress for request_timeout_ms (a full socket, or a peer that grants no flow-control
 * window); and idle_timeout_ms with no stream and no call. Bytes buffered for sending
 * are bounded per connection (reading pauses past 64 KiB). Calls still with the handler
 * whose stream was reset count against max_streams until answered (new streams get
 * RST_STREAM(REFUSED_STREAM) past it), so opening and resetting streams cannot outrun
 * the handler; nghttp2's own stream-reset rate limit (Debian's 1.52 fix for rapid
 * reset) answers a flood with GOAWAY(INTERNAL_ERROR). A peer that half-closes (EOF) is
 * closed at once; gRPC clients never do that.
 * Memory per connection is therefore bounded by about max_streams x (max_message + the
 * answer's size); the server counts the request bytes it holds (spk_grpc_server_stats).
 *
 * The handler runs inside the server's processing of a connection's input: it may answer
 * at once or later, and may answer calls of other connections, but must not free the
 * server. The server does not enforce the client's grpc-timeout (the handler reads it
 * with spk_grpc_call_timeout_ms) nor require `te: trailers` (nghttp2 already refuses any
 * other te value).
 *
 * Threads: one. Never use a server across fork(). TLS writes go through OpenSSL's
 * socket BIO (write(2)), so the process must ignore SIGPIPE, as spoked and hubd do.
 */
#ifndef SPK_GRPC_SERVER_H
#define SPK_GRPC_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "err.h"
#include "grpc.h"

struct ev_loop;
typedef struct ssl_ctx_st SSL_CTX;

typedef struct spk_grpc_server spk_grpc_server;
typedef struct spk_grpc_call spk_grpc_call;

/* Called once per well-formed request. `call` is owned by the server until it is answered. */
typedef void (*spk_grpc_handler)(void *arg, spk_grpc_call *call);

typedef struct spk_grpc_server_opts {
    spk_grpc_handler handler;     /* required */
    void *arg;
    SSL_CTX *tls;                 /* NULL: cleartext h2c. Borrowed: outlives the server.
                                     spk_grpc_tls_server_ctx() makes a suitable one. */
    size_t max_message;           /* request message limit (default 16 MiB) */
    uint32_t max_streams;         /* concurrent streams per connection (default 100) */
    size_t max_header_list;       /* bytes of one request's header names and values, as
                                     HPACK counts them (+32 each) (default 16 KiB) */
    size_t max_connections;       /* open connections; more are closed at accept (1024) */
    uint64_t request_timeout_ms;  /* a stream's request must arrive whole within (10 s) */
    uint64_t idle_timeout_ms;     /* a connection with no open stream is closed (5 min) */
} spk_grpc_server_opts;

void spk_grpc_server_opts_init(spk_grpc_server_opts *o);

/* Create a server on `loop`. Returns 0, SPK_EINVAL (no handler, a zero limit, or
 * max_message of 4 GiB or more), SPK_ENOMEM. Free with spk_grpc_server_free() once every
 * call it handed out has been answered. max_header_list is also announced to peers as
 * SETTINGS_MAX_HEADER_LIST_SIZE. */
int spk_grpc_server_new(struct ev_loop *loop, const spk_grpc_server_opts *opts,
                        spk_grpc_server **out, spk_errbuf *eb);

/* Close every connection at once and free the server. Calls the handler holds must be
 * answered before this (answering one after it is a use after free); calls whose
 * connection closed are answered as usual, the answer dropped. NULL is allowed. */
void spk_grpc_server_free(spk_grpc_server *s);

/* Accept connections on `fd` (a listening socket, made non-blocking here; borrowed, not
 * closed by the server) until spk_grpc_server_stop_accepting(). At the open-files limit
 * accepting pauses briefly instead of spinning. Returns 0 or SPK_EIO. */
int spk_grpc_server_listen(spk_grpc_server *s, int fd, spk_errbuf *eb);

/* Serve one already accepted connection; the server owns `fd` from now on (also on
 * failure). `peer` may be NULL. Returns 0, SPK_EBUSY (max_connections), SPK_ENOMEM. */
int spk_grpc_server_adopt(spk_grpc_server *s, int fd, const struct sockaddr *peer,
                          socklen_t peer_len, spk_errbuf *eb);

/* Stop accepting; send GOAWAY(NO_ERROR, last stream processed) on every connection, so
 * that peers open no new stream (a stream opened anyway is refused), and close each
 * connection once its streams are answered and sent. For a drain: the caller waits for
 * spk_grpc_server_stats' connections to reach 0, then frees. */
void spk_grpc_server_shutdown(spk_grpc_server *s);

typedef struct spk_grpc_server_stats {
    uint64_t connections;         /* open now */
    uint64_t accepted;            /* connections accepted in total */
    uint64_t refused;             /* closed at accept (max_connections), or for a failed
                                     TLS handshake (no client certificate, no ALPN h2) */
    uint64_t calls;               /* handed to the handler */
    uint64_t rejected;            /* requests answered with an error by the server itself,
                                     and streams refused (REFUSED_STREAM) */
    uint64_t timeouts;            /* connections closed by one of the deadlines */
    uint64_t protocol_errors;     /* connections closed for an HTTP/2 protocol error (a bad
                                     preface, a malformed frame, a flood) */
    uint64_t bytes_held;          /* request bytes (headers and bodies) held now */
} spk_grpc_server_stats;

void spk_grpc_server_stats_get(const spk_grpc_server *s, spk_grpc_server_stats *st);

/* ---- one call ---------------------------------------------------------------------------
 * Accessors return data borrowed from the call, valid until it is answered, also when
 * its connection has gone meanwhile. */

/* ":path", e.g. "/spoke.control.v1.EdgeControl/SendPluginControlBatch". */
const char *spk_grpc_call_path(const spk_grpc_call *c);

/* The request message (without its 5-byte prefix). */
const uint8_t *spk_grpc_call_message(const spk_grpc_call *c, size_t *len);

/* A request header by its lower-case name ("authorization"), or NULL; the first one when
 * it came more than once. Pseudo-headers are not listed here; request trailers neither. */
const char *spk_grpc_call_header(const spk_grpc_call *c, const char *name);

/* The deadline the client sent as grpc-timeout, in ms from when the request arrived, or
 * 0 when it sent none. */
uint64_t spk_grpc_call_timeout_ms(const spk_grpc_call *c);

/* The peer's address as text ("127.0.0.1:53211", "[::1]:4000", "unix"). */
const char *spk_grpc_call_peer(const spk_grpc_call *c);

/* Over TLS with a client certificate that verified against the context's CAs: the names
 * it carries, the subject's CN first, then its DNS and URI subject alternative names.
 * *n = 0 when there is no verified client certificate. */
const char *const *spk_grpc_call_tls_names(const spk_grpc_call *c, size_t *n);

/* Answer OK with a response message (copied; len may be 0). Frees the call. */
void spk_grpc_call_respond(spk_grpc_call *c, const void *msg, size_t len);

/* Answer with an error status (code != OK; OK is sent as UNKNOWN) and a message for the
 * peer (at most 1023 bytes, percent-encoded into grpc-message), as Trailers-Only. Frees
 * the call. Answering a call twice is a broken invariant (abort). */
void spk_grpc_call_fail(spk_grpc_call *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- TLS ----------------------------------------------------------------------------- */

/* An SSL_CTX for spk_grpc_server_opts.tls: TLS 1.2+, ALPN "h2" only, the server's
 * certificate chain and key (PEM files), and, when client_ca is not NULL, client
 * certificates requested and verified against it (required when require_client_cert).
 * Returns 0, SPK_EINVAL (a file that does not load, with OpenSSL's reason) or SPK_ENOMEM;
 * free with SSL_CTX_free(). */
int spk_grpc_tls_server_ctx(const char *cert_file, const char *key_file, const char *client_ca,
                            bool require_client_cert, SSL_CTX **out, spk_errbuf *eb);

#endif
