/*
 * pgwire.h -- frames one direction of a PostgreSQL v3 protocol stream into messages,
 * whatever the chunking (one message over many chunks, many messages in one chunk). It is
 * compiled into the PostgreSQL plugins that need it (pg-query-log, pg-cache); its symbols
 * are hidden in each .so.
 *
 * A stream is a sequence of:
 *   untyped messages  int32 length, body (the client's startup phase: StartupMessage,
 *                     SSLRequest, GSSENCRequest, CancelRequest; the body begins with the
 *                     int32 code);
 *   one-byte answers  the server's 'S'/'N' ('G'/'N') to an SSLRequest (GSSENCRequest);
 *   typed messages    byte type, int32 length, body (everything else).
 * The stream's owner says which comes next: `untyped` while the client is in its startup
 * phase (set it when the stream begins, clear it once the StartupMessage was seen), and
 * `want_byte` on the server's stream right after the client sent an encryption request.
 *
 * For each message the framer asks want(arg, type, len) whether the body is needed; a body
 * it is not asked for is skipped without being copied. Typed bodies longer than max_body
 * are never gathered (untyped ones are at most PGW_STARTUP_MAX). Then on_msg(arg, msg) is called
 * with the message (body NULL when it was not gathered).
 */
#ifndef PGWIRE_H
#define PGWIRE_H

#include <stddef.h>
#include <stdint.h>

#define PGW_STARTUP_MAX 10000u /* PostgreSQL's MAX_STARTUP_PACKET_LENGTH */
#define PGW_CODE_CANCEL 80877102u
#define PGW_CODE_SSL    80877103u
#define PGW_CODE_GSSENC 80877104u
#define PGW_PROTO_3     196608u /* 3.0 */

enum pgw_kind { PGW_TYPED, PGW_UNTYPED, PGW_BYTE };

typedef struct pgw_msg {
    enum pgw_kind kind;
    uint8_t type;        /* typed: the type byte; a one-byte answer: that byte; else 0 */
    const uint8_t *body; /* the body after the length word, or NULL when not gathered */
    size_t len;          /* the body's length */
    int nomem;           /* the body was wanted but memory ran out (body is NULL) */
    int whole;           /* the whole message (header included) was in the current chunk */
    size_t start;        /* when whole: offset of its first byte in the current chunk */
    size_t end;          /* offset in the current chunk just past the message */
} pgw_msg;

/* Return non-zero to have the body of a message of `type` (0 when untyped) and `len`
 * body bytes gathered. */
typedef int (*pgw_want_fn)(void *arg, uint8_t type, size_t len);
/* A complete message; return 0 to go on, < 0 to stop feeding this chunk. */
typedef int (*pgw_msg_fn)(void *arg, const pgw_msg *m);

typedef struct pgw_stream {
    int untyped;     /* the next message is untyped (see above); the owner sets it */
    int want_byte;   /* the next byte is a one-byte answer; the owner sets it */
    size_t max_body; /* bodies gathered at most this long */
    /* reassembly, the framer's own */
    uint8_t hdr[5];
    size_t hdr_have;
    int in_body;
    int keep;
    int nomem;
    int began_here; /* the current message's first byte is in the current chunk */
    size_t body_len, body_have, began_at;
    uint8_t *body;
    size_t cap;
} pgw_stream;

/* Feed chunk data[0..n). Returns 0 when every byte was consumed, 1 when on_msg stopped
 * it, -1 when the stream does not parse (a length out of range: lost track of the
 * protocol, or TLS where a startup message was expected; the stream should not be fed
 * again). A body that memory could not be found for is not gathered (msg.nomem). */
int pgw_feed(pgw_stream *s, const uint8_t *data, size_t n, pgw_want_fn want, pgw_msg_fn on_msg,
             void *arg);

/* Whether the stream is between messages (no partial header or body). */
int pgw_at_boundary(const pgw_stream *s);

/* Free what the stream holds; it may be fed again afterwards (from a boundary). */
void pgw_release(pgw_stream *s);

/* Big-endian 32-bit read. */
static inline uint32_t pgw_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The C string at s[*off..n): its length (without the NUL), *str its start, *off moved
 * past the NUL. -1 when there is no NUL before n. */
long pgw_cstring(const uint8_t *s, size_t n, size_t *off, const uint8_t **str);

#endif
