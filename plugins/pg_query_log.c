/*
 * pg-query-log -- logs the SQL that PostgreSQL clients send, by decoding the frontend
 * protocol (v3) in client traffic. It never changes traffic.
 *
 * Per connection it logs, at info level:
 *
 *     conn 7: session user=alice database=shop        (from the startup message)
 *     conn 7: query: SELECT 42 AS answer              ('Q', simple query)
 *     conn 7: parse: name=s1 query: SELECT $1::int    ('P', extended protocol; the
 *                                                      unnamed statement has name=)
 *
 * Control characters, backslashes and bytes that are not UTF-8 in the logged text are
 * escaped (\n, \t, \\, \xNN), so one message is always one log line. A text longer
 * than 3000 bytes (a name: 200) is cut and ends in "... (N bytes)", N being its length.
 *
 * How the stream is decoded: a connection starts with untyped messages (int32 length,
 * int32 code): the startup message, or an SSLRequest, GSSENCRequest or CancelRequest.
 * The host does not terminate TLS, so after an SSLRequest (GSSENCRequest) the plugin
 * watches the server's one-byte answer in on_traffic_from_server: 'N' means the client
 * goes on in plaintext with its startup message; 'S' ('G') means the rest is encrypted,
 * and the plugin logs that once and stops decoding the connection. After the startup
 * message come typed messages (byte type, int32 length). 'Q' and 'P' are gathered into a
 * per-connection buffer, whatever the chunking (one message over many chunks, many
 * messages in one chunk); every other message is skipped by its length without being
 * copied. A message longer than `max_message` is skipped too, and a line says so. A
 * stream that does not parse (a bad length, an unknown protocol version, TLS without
 * SSLRequest) is logged once and then left alone.
 *
 * Config:
 *   max_message   the largest Query/Parse message logged, a size as the config file
 *                 writes one: "65536", "64KiB", "1MiB" (default 1MiB; at most 1GiB),
 *                 read with the host's config_get_size.
 *
 * Per-connection state (host->conn_data): NULL before the first client byte, then a
 * pgconn, or the address of `off_mark` once the connection is not decoded any more.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spoke.h"

#define PG_STARTUP_MAX         10000u /* PostgreSQL's MAX_STARTUP_PACKET_LENGTH */
#define PG_CODE_CANCEL         80877102u
#define PG_CODE_SSL            80877103u
#define PG_CODE_GSSENC         80877104u
#define PG_DEFAULT_MAX_MESSAGE (1024u * 1024u)
#define PG_MAX_MAX_MESSAGE     (1024u * 1024u * 1024u)
#define PG_KEEP_CAPACITY       (64u * 1024u) /* a larger buffer is freed after its message */
/* Longest text logged for a query, and for a name: the host cuts log lines at about 4 KiB,
 * so the plugin cuts first and says how long the whole text was. */
#define PG_LOG_SQL_MAX  3000u
#define PG_LOG_NAME_MAX 200u

static const spoke_host *host;

typedef struct pglog {
    spoke_ctx *ctx;
    size_t max_message;
} pglog;

enum phase { PH_STARTUP, PH_TYPED, PH_OFF };

/* An encryption request waiting for the server's one-byte answer. */
enum pending { PEND_NONE, PEND_SSL, PEND_GSS };

typedef struct pgconn {
    uint64_t id;
    enum phase phase;
    enum pending pending;
    uint8_t hdr[5]; /* startup: int32 length; typed: type byte, int32 length */
    size_t hdr_have;
    int in_body;     /* the header is complete; body bytes are coming */
    int keep;        /* the body is gathered in `body` (else skipped) */
    size_t body_len; /* the message's length minus its own 4 bytes */
    size_t body_have;
    uint8_t *body;
    size_t cap;
} pgconn;

static char off_mark;

/* ---- config ------------------------------------------------------------------------- */

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    if (!SPOKE_HOST_HAS(host, config_get_size)) {
        host->log(ctx, SPOKE_LOG_ERROR, "this host lacks config_get_size (spoke ABI 1.1)");
        return SPOKE_ERR_UNSUPPORTED;
    }
    /* The host reads the size as it reads the config file's own (units.h). */
    uint64_t max = PG_DEFAULT_MAX_MESSAGE;
    if (host->config_get_size(ctx, "max_message", &max) != 0 || max == 0 ||
        max > PG_MAX_MAX_MESSAGE) {
        const char *mm = host->config_get(ctx, "max_message");
        host->log(ctx, SPOKE_LOG_ERROR,
                  "max_message: '%s' is not a size between 1 and 1GiB (e.g. 65536, 1MiB)",
                  mm ? mm : "");
        return SPOKE_ERR_INVALID;
    }
    pglog *pl = calloc(1, sizeof(*pl));
    if (pl == NULL)
        return SPOKE_ERR_NOMEM;
    pl->ctx = ctx;
    pl->max_message = (size_t)max;
    *self = pl;
    return 0;
}

static void fini(void *self)
{
    free(self);
}

/* ---- logging text safely ------------------------------------------------------------ */

/* Length of the valid UTF-8 sequence at s[0..n), or 0 if there is none. */
static size_t utf8_len(const uint8_t *s, size_t n)
{
    size_t len;
    uint32_t min;
    if (s[0] >= 0xc2 && s[0] <= 0xdf)
        len = 2, min = 0x80;
    else if (s[0] >= 0xe0 && s[0] <= 0xef)
        len = 3, min = 0x800;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4)
        len = 4, min = 0x10000;
    else
        return 0;
    if (n < len)
        return 0;
    uint32_t cp = s[0] & (0x7fu >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3fu);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

/* Append the printable form of s[i] (one byte, or one UTF-8 character) to o; return the
 * number of input bytes it took, and in *w the number of output bytes it wrote (<= 4). */
static size_t escape_one(const uint8_t *s, size_t n, char *o, size_t *w)
{
    static const char hex[] = "0123456789abcdef";
    uint8_t b = s[0];
    size_t u = b >= 0x80 ? utf8_len(s, n) : 0;
    if (u > 0) {
        memcpy(o, s, u);
        *w = u;
        return u;
    }
    if (b >= 0x20 && b < 0x7f && b != '\\') {
        o[0] = (char)b;
        *w = 1;
        return 1;
    }
    o[0] = '\\';
    if (b == '\n' || b == '\t' || b == '\r' || b == '\\') {
        o[1] = b == '\n' ? 'n' : b == '\t' ? 't' : b == '\r' ? 'r' : '\\';
        *w = 2;
        return 1;
    }
    o[1] = 'x';
    o[2] = hex[b >> 4];
    o[3] = hex[b & 15];
    *w = 4;
    return 1;
}

/* A NUL-terminated, printable copy of s[0..n) (see the top comment) of at most `limit`
 * bytes; a text cut short ends in "... (N bytes)". NULL when memory ran out. */
static char *escape(const uint8_t *s, size_t n, size_t limit)
{
    char *out = malloc(limit + 48);
    if (out == NULL)
        return NULL;
    size_t o = 0, i = 0;
    while (i < n) {
        char tmp[4];
        size_t w;
        size_t took = escape_one(s + i, n - i, tmp, &w);
        if (o + w > limit)
            break;
        memcpy(out + o, tmp, w);
        o += w;
        i += took;
    }
    if (i < n)
        o += (size_t)snprintf(out + o, 48, "... (%zu bytes)", n);
    out[o] = '\0';
    return out;
}

/* The C string at s[*off..n): its length (without the NUL), advancing *off past the NUL.
 * Returns -1 when there is no NUL before n. */
static long cstring(const uint8_t *s, size_t n, size_t *off, const uint8_t **str)
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

/* ---- decoded messages --------------------------------------------------------------- */

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void stop(const pglog *pl, pgconn *c, const char *why)
{
    host->log(pl->ctx, SPOKE_LOG_INFO, "conn %llu: %s; not decoding this connection",
              (unsigned long long)c->id, why);
    c->phase = PH_OFF;
}

static void log_session(const pglog *pl, const pgconn *c, const uint8_t *user, long ulen,
                        const uint8_t *db, long dlen)
{
    char *u = escape(user ? user : (const uint8_t *)"", user ? (size_t)ulen : 0, PG_LOG_NAME_MAX);
    char *d = db ? escape(db, (size_t)dlen, PG_LOG_NAME_MAX) : NULL;
    if (u != NULL)
        host->log(pl->ctx, SPOKE_LOG_INFO, "conn %llu: session user=%s database=%s",
                  (unsigned long long)c->id, u, d ? d : u);
    free(u);
    free(d);
}

/* A startup-phase message: body = int32 code, then (protocol 3) key\0value\0 ... \0. */
static void on_startup(const pglog *pl, pgconn *c, const uint8_t *b, size_t n)
{
    uint32_t code = be32(b);
    if (code == PG_CODE_SSL || code == PG_CODE_GSSENC) {
        c->pending = code == PG_CODE_SSL ? PEND_SSL : PEND_GSS;
        return;
    }
    if (code == PG_CODE_CANCEL) {
        stop(pl, c, "cancel request");
        return;
    }
    if (code >> 16 != 3) {
        stop(pl, c, "unsupported protocol version");
        return;
    }
    const uint8_t *user = NULL, *db = NULL;
    long ulen = 0, dlen = 0;
    size_t off = 4;
    for (;;) {
        const uint8_t *k, *v;
        long klen = cstring(b, n, &off, &k);
        if (klen <= 0)
            break; /* the terminating empty key, or a malformed list: use what we have */
        long vlen = cstring(b, n, &off, &v);
        if (vlen < 0)
            break;
        if (klen == 4 && memcmp(k, "user", 4) == 0)
            user = v, ulen = vlen;
        else if (klen == 8 && memcmp(k, "database", 8) == 0)
            db = v, dlen = vlen;
    }
    log_session(pl, c, user, ulen, db, dlen);
    c->phase = PH_TYPED;
}

/* 'Q': query\0 */
static void on_query(const pglog *pl, const pgconn *c, const uint8_t *b, size_t n)
{
    const uint8_t *nul = memchr(b, '\0', n);
    char *sql = escape(b, nul ? (size_t)(nul - b) : n, PG_LOG_SQL_MAX);
    if (sql == NULL) {
        host->log(pl->ctx, SPOKE_LOG_WARN,
                  "conn %llu: query of %zu bytes not logged: out of memory",
                  (unsigned long long)c->id, n);
        return;
    }
    host->log(pl->ctx, SPOKE_LOG_INFO, "conn %llu: query: %s", (unsigned long long)c->id, sql);
    free(sql);
}

/* 'P': name\0 query\0 int16 nparams, int32 oids... */
static void on_parse(const pglog *pl, const pgconn *c, const uint8_t *b, size_t n)
{
    size_t off = 0;
    const uint8_t *name = NULL, *query = NULL;
    long nlen = cstring(b, n, &off, &name);
    long qlen = nlen < 0 ? -1 : cstring(b, n, &off, &query);
    if (qlen < 0) {
        host->log(pl->ctx, SPOKE_LOG_WARN, "conn %llu: malformed Parse message skipped",
                  (unsigned long long)c->id);
        return;
    }
    char *nm = escape(name, (size_t)nlen, PG_LOG_NAME_MAX);
    char *sql = escape(query, (size_t)qlen, PG_LOG_SQL_MAX);
    if (nm != NULL && sql != NULL)
        host->log(pl->ctx, SPOKE_LOG_INFO, "conn %llu: parse: name=%s query: %s",
                  (unsigned long long)c->id, nm, sql);
    else
        host->log(pl->ctx, SPOKE_LOG_WARN,
                  "conn %llu: Parse of %zu bytes not logged: out of memory",
                  (unsigned long long)c->id, n);
    free(nm);
    free(sql);
}

/* ---- reassembly --------------------------------------------------------------------- */

static size_t header_size(const pgconn *c)
{
    return c->phase == PH_STARTUP ? 4 : 5;
}

/* Make room for a body of c->body_len bytes. Returns 0 or -1. */
static int reserve(pgconn *c)
{
    if (c->cap >= c->body_len)
        return 0;
    uint8_t *n = malloc(c->body_len);
    if (n == NULL)
        return -1;
    free(c->body);
    c->body = n;
    c->cap = c->body_len;
    return 0;
}

/* The header is complete: check the length and decide whether to gather or skip the
 * body. Returns 0, or -1 when the connection is not decoded any more. */
static int begin_body(const pglog *pl, pgconn *c)
{
    int startup = c->phase == PH_STARTUP;
    uint32_t len = be32(startup ? c->hdr : c->hdr + 1);
    if (startup && (len < 8 || len > PG_STARTUP_MAX)) {
        stop(pl, c,
             "the first bytes are not a PostgreSQL startup message (TLS without "
             "SSLRequest?)");
        return -1;
    }
    if (!startup && len < 4) {
        stop(pl, c, "bad message length: lost track of the protocol");
        return -1;
    }
    c->body_len = len - 4;
    c->body_have = 0;
    c->in_body = 1;
    int wanted = !startup && (c->hdr[0] == 'Q' || c->hdr[0] == 'P');
    /* max_message bounds what is logged, not the startup message (at most
     * PG_STARTUP_MAX), which must be read to decode the rest of the connection. */
    c->keep = startup || (wanted && c->body_len <= pl->max_message);
    if (!c->keep && wanted)
        host->log(pl->ctx, SPOKE_LOG_INFO,
                  "conn %llu: %s of %zu bytes not logged (over "
                  "max_message %zu)",
                  (unsigned long long)c->id, c->hdr[0] == 'Q' ? "query" : "parse", c->body_len,
                  pl->max_message);
    if (c->keep && reserve(c) != 0) {
        host->log(pl->ctx, SPOKE_LOG_WARN,
                  "conn %llu: message of %zu bytes not logged: "
                  "out of memory",
                  (unsigned long long)c->id, c->body_len);
        c->keep = 0;
    }
    return 0;
}

static void finish_message(const pglog *pl, pgconn *c)
{
    if (c->keep && c->phase == PH_STARTUP)
        on_startup(pl, c, c->body, c->body_len);
    else if (c->keep && c->hdr[0] == 'Q')
        on_query(pl, c, c->body, c->body_len);
    else if (c->keep && c->hdr[0] == 'P')
        on_parse(pl, c, c->body, c->body_len);
    c->in_body = 0;
    c->keep = 0;
    c->hdr_have = 0;
    if (c->cap > PG_KEEP_CAPACITY) {
        free(c->body);
        c->body = NULL;
        c->cap = 0;
    }
}

/* Feed client bytes to the decoder, as many messages or as few bytes as they hold. */
static void feed(const pglog *pl, pgconn *c, const uint8_t *data, size_t n)
{
    size_t off = 0;
    while (off < n && c->phase != PH_OFF) {
        size_t left = n - off;
        if (!c->in_body) {
            size_t need = header_size(c) - c->hdr_have;
            size_t take = need < left ? need : left;
            memcpy(c->hdr + c->hdr_have, data + off, take);
            c->hdr_have += take;
            off += take;
            if (take < need || begin_body(pl, c) != 0)
                continue;
        } else {
            size_t need = c->body_len - c->body_have;
            size_t take = need < left ? need : left;
            if (c->keep)
                memcpy(c->body + c->body_have, data + off, take);
            c->body_have += take;
            off += take;
        }
        if (c->body_have == c->body_len)
            finish_message(pl, c);
    }
}

/* ---- hooks -------------------------------------------------------------------------- */

static void conn_free(pgconn *c)
{
    free(c->body);
    free(c);
}

/* Forget a connection that is not decoded any more. */
static void turn_off(void **slot)
{
    if (*slot != NULL && *slot != &off_mark)
        conn_free(*slot);
    *slot = &off_mark;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    const pglog *pl = self;
    void **slot = host->conn_data(conn, pl->ctx);
    if (slot == NULL || *slot == &off_mark || buf->len == 0)
        return SPOKE_CONTINUE;
    pgconn *c = *slot;
    if (c == NULL) {
        c = calloc(1, sizeof(*c));
        if (c == NULL) {
            host->log(pl->ctx, SPOKE_LOG_WARN, "conn %llu: out of memory; not decoding",
                      (unsigned long long)host->conn_id(conn));
            *slot = &off_mark;
            return SPOKE_CONTINUE;
        }
        c->id = host->conn_id(conn);
        *slot = c;
    }
    feed(pl, c, buf->data, buf->len);
    if (c->phase == PH_OFF)
        turn_off(slot);
    return SPOKE_CONTINUE;
}

/* Only the answer to an SSLRequest/GSSENCRequest matters here: one byte. */
static spoke_verdict from_server(void *self, spoke_conn *conn, spoke_buf *buf)
{
    const pglog *pl = self;
    void **slot = host->conn_data(conn, pl->ctx);
    if (slot == NULL || *slot == NULL || *slot == &off_mark || buf->len == 0)
        return SPOKE_CONTINUE;
    pgconn *c = *slot;
    if (c->pending == PEND_NONE)
        return SPOKE_CONTINUE;
    enum pending asked = c->pending;
    c->pending = PEND_NONE;
    if (asked == PEND_SSL && buf->data[0] == 'S') {
        stop(pl, c, "the server accepted SSLRequest, the session is TLS");
        turn_off(slot);
    } else if (asked == PEND_GSS && buf->data[0] == 'G') {
        stop(pl, c, "the server accepted GSSENCRequest, the session is encrypted");
        turn_off(slot);
    }
    return SPOKE_CONTINUE;
}

static void on_close(void *self, spoke_conn *conn)
{
    const pglog *pl = self;
    void **slot = host->conn_data(conn, pl->ctx);
    if (slot == NULL)
        return;
    turn_off(slot);
    *slot = NULL;
}

static const spoke_plugin pg_query_log = {
    SPOKE_PLUGIN_HEADER,
    .name = "pg-query-log",
    .version = "1.0.0",
    .description = "logs the SQL of PostgreSQL simple queries and Parse messages",
    .init = init,
    .fini = fini,
    .on_close = on_close,
    .on_traffic_from_client = from_client,
    .on_traffic_from_server = from_server,
};

SPOKE_PLUGIN_ENTRY(pg_query_log, host)
