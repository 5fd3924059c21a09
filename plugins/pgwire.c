/*
 * pgwire.c -- the PostgreSQL v3 protocol framer shared by the PostgreSQL plugins; the
 * contract is in pgwire.h.
 *
 * The header (4 bytes untyped, 5 typed) is gathered into s->hdr byte by byte across
 * chunks; then the body is either copied into s->body (grown to the largest body gathered,
 * and given back when it was over PGW_KEEP_CAPACITY) or counted off. A message's "whole"
 * flag says whether its first and last bytes are in the same chunk, which lets a plugin
 * act on a chunk that is exactly one message.
 */
#include "pgwire.h"

#include <stdlib.h>
#include <string.h>

#define PGW_KEEP_CAPACITY (64u * 1024u) /* a larger buffer is freed after its message */

long pgw_cstring(const uint8_t *s, size_t n, size_t *off, const uint8_t **str)
{
    if (*off >= n)
        return -1;
    const uint8_t *nul = memchr(s + *off, '\0', n - *off);
    if (nul == NULL)
        return -1;
    *str = s + *off;
    long len = (long)(nul - *str);
    *off += (size_t)len + 1;
    return len;
}

int pgw_at_boundary(const pgw_stream *s)
{
    return !s->in_body && s->hdr_have == 0;
}

void pgw_release(pgw_stream *s)
{
    free(s->body);
    s->body = NULL;
    s->cap = 0;
    s->in_body = 0;
    s->hdr_have = 0;
}

static int reserve(pgw_stream *s)
{
    if (s->cap >= s->body_len)
        return 0;
    uint8_t *b = malloc(s->body_len);
    if (b == NULL)
        return -1;
    free(s->body);
    s->body = b;
    s->cap = s->body_len;
    return 0;
}

/* The header is complete: check the length, decide whether to gather the body. */
static int begin_body(pgw_stream *s, pgw_want_fn want, void *arg)
{
    int untyped = s->untyped;
    uint32_t len = pgw_be32(untyped ? s->hdr : s->hdr + 1);
    if (untyped ? (len < 8 || len > PGW_STARTUP_MAX) : len < 4)
        return -1;
    s->body_len = len - 4;
    s->body_have = 0;
    s->in_body = 1;
    uint8_t type = untyped ? 0 : s->hdr[0];
    s->keep = (untyped || s->body_len <= s->max_body) && want(arg, type, s->body_len);
    s->nomem = s->keep && reserve(s) != 0;
    if (s->nomem)
        s->keep = 0;
    return 0;
}

static int finish(pgw_stream *s, size_t end, pgw_msg_fn on_msg, void *arg)
{
    pgw_msg m = {
        .kind = s->untyped ? PGW_UNTYPED : PGW_TYPED,
        .type = s->untyped ? 0 : s->hdr[0],
        .body = s->keep ? s->body : NULL,
        .len = s->body_len,
        .nomem = s->nomem,
        .whole = s->began_here,
        .start = s->began_at,
        .end = end,
    };
    s->in_body = 0;
    s->hdr_have = 0;
    int rc = on_msg(arg, &m);
    if (s->cap > PGW_KEEP_CAPACITY) {
        free(s->body);
        s->body = NULL;
        s->cap = 0;
    }
    s->keep = s->nomem = 0;
    return rc;
}

int pgw_feed(pgw_stream *s, const uint8_t *data, size_t n, pgw_want_fn want, pgw_msg_fn on_msg,
             void *arg)
{
    size_t off = 0;
    while (off < n) {
        if (s->want_byte && pgw_at_boundary(s)) {
            s->want_byte = 0;
            pgw_msg m = {
                .kind = PGW_BYTE, .type = data[off], .whole = 1, .start = off, .end = off + 1};
            off++;
            if (on_msg(arg, &m) < 0)
                return 1;
            continue;
        }
        size_t left = n - off;
        if (!s->in_body) {
            if (s->hdr_have == 0)
                s->began_here = 1, s->began_at = off;
            size_t hsize = s->untyped ? 4 : 5;
            size_t need = hsize - s->hdr_have;
            size_t take = need < left ? need : left;
            memcpy(s->hdr + s->hdr_have, data + off, take);
            s->hdr_have += take;
            off += take;
            if (take < need)
                break;
            int rc = begin_body(s, want, arg);
            if (rc != 0)
                return rc;
        } else {
            size_t need = s->body_len - s->body_have;
            size_t take = need < left ? need : left;
            if (s->keep)
                memcpy(s->body + s->body_have, data + off, take);
            s->body_have += take;
            off += take;
        }
        if (s->body_have == s->body_len && finish(s, off, on_msg, arg) < 0)
            return 1;
    }
    /* a message that goes on in the next chunk did not begin there */
    s->began_here = 0;
    return 0;
}
