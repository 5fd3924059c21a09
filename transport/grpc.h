/*
 * grpc.h -- gRPC over HTTP/2, the parts both sides share: message framing, status codes,
 * grpc-timeout and grpc-message encoding (grpc/grpc doc/PROTOCOL-HTTP2.md).
 *
 * A gRPC message on an HTTP/2 stream is a 5-byte prefix (a compressed flag byte, then the
 * message length as a 4-byte big-endian integer) followed by that many bytes of protobuf.
 * spoke's calls are unary: each direction carries exactly one message. The status of a
 * call travels in trailers (`grpc-status`, a decimal code, and `grpc-message`, percent-
 * encoded text); a call that fails before any message is answered "Trailers-Only": one
 * HEADERS frame with :status 200, content-type and the two status fields, ending the
 * stream. The uplink client (grpc_client.c, libcurl) and hubd's server (grpc_server.c,
 * nghttp2) both use this file, so the two ends agree by construction.
 *
 * Nothing here allocates except spk_grpc_body_append(), whose buffer grows to at most the
 * message limit given at init; nothing here does I/O.
 */
#ifndef SPK_GRPC_H
#define SPK_GRPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

/* gRPC status codes (doc/statuscodes.md). Values are the wire's. */
typedef enum spk_grpc_code {
    SPK_GRPC_OK = 0,
    SPK_GRPC_CANCELLED = 1,
    SPK_GRPC_UNKNOWN = 2,
    SPK_GRPC_INVALID_ARGUMENT = 3,
    SPK_GRPC_DEADLINE_EXCEEDED = 4,
    SPK_GRPC_NOT_FOUND = 5,
    SPK_GRPC_ALREADY_EXISTS = 6,
    SPK_GRPC_PERMISSION_DENIED = 7,
    SPK_GRPC_RESOURCE_EXHAUSTED = 8,
    SPK_GRPC_FAILED_PRECONDITION = 9,
    SPK_GRPC_ABORTED = 10,
    SPK_GRPC_OUT_OF_RANGE = 11,
    SPK_GRPC_UNIMPLEMENTED = 12,
    SPK_GRPC_INTERNAL = 13,
    SPK_GRPC_UNAVAILABLE = 14,
    SPK_GRPC_DATA_LOSS = 15,
    SPK_GRPC_UNAUTHENTICATED = 16,
} spk_grpc_code;

/* "INVALID_ARGUMENT", ...; "UNKNOWN_CODE" for a value outside 0..16. Never NULL. */
const char *spk_grpc_code_name(int code);

/* Whether a failed call is worth retrying as it is: UNAVAILABLE, DEADLINE_EXCEEDED,
 * RESOURCE_EXHAUSTED (the server was busy), ABORTED, INTERNAL and UNKNOWN are; the rest
 * (bad request, auth, unimplemented) need something else to change first. The uplink
 * retries both kinds with backoff, but logs the second kind as an error. */
bool spk_grpc_code_transient(int code);

#define SPK_GRPC_PREFIX 5u
#define SPK_GRPC_CONTENT_TYPE "application/grpc"

/* Write the 5-byte prefix of an uncompressed message of `len` bytes (len < 4 GiB). */
void spk_grpc_prefix(uint8_t out[SPK_GRPC_PREFIX], uint32_t len);

/* Whether a content-type header value names gRPC: "application/grpc" alone or followed
 * by '+' (a subtype such as "+proto") or ';' (parameters). */
bool spk_grpc_content_type_ok(const char *value, size_t len);

/* The request or response body of a unary call, reassembled from the DATA it arrives in.
 * A body over `max_msg` message bytes is refused as soon as its prefix says so, before
 * the bytes arrive. Init with spk_grpc_body_init(); free with spk_grpc_body_free(). */
typedef struct spk_grpc_body {
    uint8_t *buf;      /* owned; the prefix and the message as received so far */
    size_t len;        /* bytes in buf */
    size_t cap;        /* bytes allocated */
    size_t max_msg;    /* the largest message accepted */
} spk_grpc_body;

void spk_grpc_body_init(spk_grpc_body *b, size_t max_msg);
void spk_grpc_body_free(spk_grpc_body *b);

/* Add received bytes. Returns SPK_GRPC_OK, or with a reason in eb:
 *   RESOURCE_EXHAUSTED  the prefix declares a message over max_msg
 *   INVALID_ARGUMENT    bytes past the end of the first message (a unary call carries one)
 *   UNIMPLEMENTED       the compressed flag is set (no grpc-encoding is offered)
 *   INTERNAL            out of memory
 * After an error the body is unchanged and should be dropped. */
spk_grpc_code spk_grpc_body_append(spk_grpc_body *b, const void *data, size_t n,
                                   spk_errbuf *eb);

/* The stream ended: check that exactly one whole message arrived and point *msg (borrowed
 * from b, valid until b is freed) at its bytes. Returns SPK_GRPC_OK, or
 * INVALID_ARGUMENT (no message, or a truncated prefix or message) with a reason in eb. */
spk_grpc_code spk_grpc_body_finish(const spk_grpc_body *b, const uint8_t **msg, size_t *len,
                                   spk_errbuf *eb);

/* grpc-timeout: "TimeoutValue TimeoutUnit", at most 8 ASCII digits then one of H M S m u n.
 * Parse to milliseconds, rounded up (so 1u is 1 ms, never 0). Returns 0, or SPK_EINVAL. */
int spk_grpc_timeout_parse(const char *value, size_t len, uint64_t *ms);

/* Format `ms` (>= 1) as a grpc-timeout value into buf (at least 16 bytes): milliseconds
 * when they fit in 8 digits, else whole seconds, rounded up. Returns buf. */
char *spk_grpc_timeout_format(uint64_t ms, char *buf, size_t cap);

/* Percent-encode `n` bytes of a status message for grpc-message: every byte outside
 * 0x20..0x7E, and '%', becomes %XX. Writes at most cap - 1 bytes plus a NUL (cutting the
 * message, never an escape, when it does not fit) and returns the length written. */
size_t spk_grpc_message_encode(const char *msg, size_t n, char *out, size_t cap);

/* Decode a grpc-message value into out (cap >= 1): %XX sequences become their byte; a '%'
 * not followed by two hex digits is kept as it is (the spec asks receivers to be lenient).
 * NUL-terminates; returns the length written. */
size_t spk_grpc_message_decode(const char *value, size_t n, char *out, size_t cap);

#endif
