/*
 * grpc_server.c -- hubd's gRPC server: nghttp2 server sessions on libev (grpc_server.h).
 *
 * One `struct conn` per accepted socket: the socket's ev_io, one ev_timer for every
 * deadline of the connection, an optional SSL (driven non-blocking by the same ev_io),
 * an nghttp2 server session, and a bounded output buffer. Bytes read (or decrypted) go to
 * nghttp2_session_mem_recv(); frames nghttp2 wants to send come from
 * nghttp2_session_mem_send() into the output buffer, which is written (or encrypted)
 * as the socket allows. While the output buffer holds more than OUT_HIGH bytes the
 * connection is not read, so a peer that does not read its answers stops being served
 * instead of making us buffer without bound.
 *
 * One `spk_grpc_call` per request stream, created in on_begin_headers and attached to
 * the nghttp2 stream as its user data. Headers are counted (name + value + 32 each, as
 * HPACK's SETTINGS_MAX_HEADER_LIST_SIZE does) and kept in one arena; the body goes to an
 * spk_grpc_body. When the request ended (END_STREAM) and is well-formed the call goes to
 * the handler. A call the server itself refuses is answered Trailers-Only at once, with a
 * RST_STREAM(NO_ERROR) after the answer when the client was still sending (as grpc-go
 * does), so an over-limit message is refused after its 5-byte prefix.
 *
 * Ownership: the nghttp2 stream owns its call until the handler gets it; from then on
 * the handler does, until it answers. A stream that closes (reset, connection gone)
 * while its call is with the handler leaves the call "orphaned" (call->stream_open is
 * false, or call->conn is NULL once the connection is gone); answering an orphan just
 * frees it. Orphans still count against their connection's max_streams, so a client
 * that opens and resets streams cannot pile up calls faster than the handler answers.
 *
 * Reentrancy: nghttp2 forbids mem_send from its own callbacks, and a connection must not
 * be freed while nghttp2 is inside it. So callbacks only mark things (c->dead); the
 * functions that drive I/O (conn_drive) flush and close after mem_recv returned. An
 * answer given outside any callback (the async path) flushes at once.
 *
 * Deadlines, all on the connection's one timer (conn_arm): the TLS handshake and the
 * client preface + first SETTINGS within request_timeout_ms of the accept; each stream's
 * request whole within request_timeout_ms of its first HEADERS; no stream for
 * idle_timeout_ms; and output that makes no progress for request_timeout_ms. Any of
 * them closes the connection with GOAWAY.
 *
 * What nghttp2 1.52 (Debian 12) taught, relied on below:
 *  - Queuing a RST_STREAM marks the stream closing at once, and an answer queued before
 *    it is then dropped unsent: the RST_STREAM(NO_ERROR) after an early answer is
 *    submitted from on_frame_send, once the answer's HEADERS went out. (grpc 1.51's
 *    client reports a RST_STREAM(NO_ERROR) that comes without trailers as INTERNAL.)
 *  - mem_send must not be called from a callback; submit_* may (submit_trailer also from
 *    the data source's read callback). nghttp2_session_del calls no stream-close
 *    callback, so conn_close frees the calls itself.
 *  - SETTINGS_MAX_HEADER_LIST_SIZE is only announced, not enforced: on_header counts.
 *    on_header still runs for every field of a refused list (an HPACK bomb of 7 KB on
 *    the wire decodes to 12 MB of fields: CPU, no memory).
 *  - The rapid-reset limit (burst 1000 resets, then 33/s) answers GOAWAY(INTERNAL_ERROR);
 *    a reset of a stream that is already closed does not count. The CONTINUATION limit
 *    makes mem_recv fail (no GOAWAY is sent). Both live in the default options, which
 *    is why the session is made without an nghttp2_option.
 */
#include "grpc_server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define DEFAULT_MAX_MESSAGE (16u * 1024 * 1024)
#define DEFAULT_MAX_STREAMS 100u
#define DEFAULT_MAX_HEADER_LIST (16u * 1024)
#define DEFAULT_MAX_CONNECTIONS 1024u
#define DEFAULT_REQUEST_TIMEOUT_MS 10000u
#define DEFAULT_IDLE_TIMEOUT_MS 300000u

#define OUT_HIGH (64u * 1024)      /* stop reading and stop asking nghttp2 past this */
#define READ_CHUNK (16u * 1024)
#define READ_ROUNDS 16             /* reads per event and connection, for fairness */
#define STREAM_WINDOW (1u << 20)   /* per-stream receive window we announce */
#define CONN_WINDOW (4u << 20)     /* connection receive window */
#define MAX_TLS_NAMES 32u
#define EMFILE_PAUSE 0.05

/* ---- shared peer identity ---------------------------------------------------------------
 * The peer's address and certificate names, shared by a connection and its calls by
 * reference count, because a call may outlive its connection (orphans). */
struct peer {
    unsigned refs;
    char addr[64];
    size_t nnames;
    char *names[MAX_TLS_NAMES];
};

static struct peer *peer_ref(struct peer *p)
{
    p->refs++;
    return p;
}

static void peer_unref(struct peer *p)
{
    if (p == NULL || --p->refs > 0)
        return;
    for (size_t i = 0; i < p->nnames; i++)
        free(p->names[i]);
    free(p);
}

enum call_state {
    CALL_READING,   /* the request is arriving */
    CALL_REFUSED,   /* answered by the server; rest of the request ignored */
    CALL_HANDLER,   /* with the handler */
    CALL_ANSWERED,  /* answer submitted; nghttp2 is sending it */
};

struct conn;

struct spk_grpc_call {
    struct spk_grpc_call *prev, *next; /* in conn->calls */
    spk_grpc_server *s;
    struct conn *conn;                 /* NULL once the connection is gone */
    struct peer *peer;                 /* referenced */
    int32_t stream_id;
    bool stream_open;                  /* nghttp2 has not closed the stream */
    bool request_ended;                /* END_STREAM received */
    bool rst_after_answer;             /* answered early: RST_STREAM(NO_ERROR) once sent */
    enum call_state state;
    ev_tstamp opened;

    /* headers */
    size_t header_bytes;               /* as counted for the limit */
    bool header_overflow;
    bool method_post;
    bool have_method;
    bool ct_seen, ct_ok;
    bool timeout_bad;
    uint64_t timeout_ms;
    char *arena;                       /* "name\0value\0" pairs; the first pair is :path */
    size_t arena_len, arena_cap;
    size_t path_off;                   /* offset of :path's value, or SIZE_MAX */

    spk_grpc_body body;
    const uint8_t *msg;
    size_t msg_len;

    /* the answer */
    uint8_t *resp;
    size_t resp_len, resp_off;
};

struct conn {
    struct conn *prev, *next;          /* in s->conns */
    spk_grpc_server *s;
    int fd;
    ev_io io;
    ev_timer timer;
    SSL *ssl;
    bool handshaken;                   /* TLS done (always true for h2c) */
    bool preface_done;                 /* the client's first SETTINGS arrived */
    bool in_recv;                      /* inside nghttp2_session_mem_recv */
    bool goaway_by_us;                 /* a GOAWAY we asked for (timeouts, shutdown) */
    bool eof;                          /* the peer closed its side */
    nghttp2_session *h2;
    struct peer *peer;
    ev_tstamp accepted;
    ev_tstamp idle_since;              /* when the last stream closed (or accepted) */
    ev_tstamp write_progress;          /* last time output moved to the socket */
    ev_tstamp answer_progress;         /* last time nghttp2 framed part of an answer */
    size_t ssl_retry_len;              /* SSL_write must be repeated with this length */

    uint8_t *out;                      /* output: out[out_off .. out_off + out_len) */
    size_t out_off, out_len, out_cap;

    spk_grpc_call *calls, *calls_tail; /* every call of this connection, also orphans */
    size_t ncalls;
    size_t nstreams;                   /* calls whose stream is open */
    size_t nanswers;                   /* calls REFUSED or ANSWERED: output to come */
};

struct spk_grpc_server {
    struct ev_loop *loop;
    spk_grpc_server_opts o;
    int listen_fd;
    ev_io lio;
    ev_timer pause;                    /* accepting paused after EMFILE */
    bool listening, shutting_down;
    struct conn *conns;
    size_t nconns;
    size_t outstanding;                /* calls with the handler */
    nghttp2_session_callbacks *cbs;
    spk_grpc_server_stats st;
};

static void conn_close(struct conn *c);
static void conn_drive(struct conn *c);
static void conn_arm(struct conn *c);
static void call_free(spk_grpc_call *call);

void spk_grpc_server_opts_init(spk_grpc_server_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->max_message = DEFAULT_MAX_MESSAGE;
    o->max_streams = DEFAULT_MAX_STREAMS;
    o->max_header_list = DEFAULT_MAX_HEADER_LIST;
    o->max_connections = DEFAULT_MAX_CONNECTIONS;
    o->request_timeout_ms = DEFAULT_REQUEST_TIMEOUT_MS;
    o->idle_timeout_ms = DEFAULT_IDLE_TIMEOUT_MS;
}

/* ---- calls -------------------------------------------------------------------------------- */

static spk_grpc_call *call_new(struct conn *c, int32_t stream_id)
{
    spk_grpc_call *call = calloc(1, sizeof(*call));
    if (call == NULL)
        return NULL;
    call->s = c->s;
    call->conn = c;
    call->peer = peer_ref(c->peer);
    call->stream_id = stream_id;
    call->stream_open = true;
    call->state = CALL_READING;
    call->opened = ev_now(c->s->loop);
    call->path_off = SIZE_MAX;
    spk_grpc_body_init(&call->body, c->s->o.max_message);
    call->prev = c->calls_tail;
    if (c->calls_tail != NULL)
        c->calls_tail->next = call;
    else
        c->calls = call;
    c->calls_tail = call;
    c->ncalls++;
    c->nstreams++;
    return call;
}

static void call_unlink(spk_grpc_call *call)
{
    struct conn *c = call->conn;
    if (c == NULL)
        return;
    if (call->prev != NULL)
        call->prev->next = call->next;
    else
        c->calls = call->next;
    if (call->next != NULL)
        call->next->prev = call->prev;
    else
        c->calls_tail = call->prev;
    call->prev = call->next = NULL;
    c->ncalls--;
    call->conn = NULL;
}

/* A call now has an answer to send; the connection's output deadline runs from the
 * first one. */
static void call_set_answering(spk_grpc_call *call, enum call_state st)
{
    struct conn *c = call->conn;
    call->state = st;
    if (c->nanswers++ == 0)
        c->answer_progress = ev_now(c->s->loop);
}

static void call_free(spk_grpc_call *call)
{
    spk_grpc_server *s = call->s;
    s->st.bytes_held -= call->body.len + call->arena_len;
    if (call->conn != NULL && (call->state == CALL_ANSWERED || call->state == CALL_REFUSED))
        call->conn->nanswers--;
    call_unlink(call);
    spk_grpc_body_free(&call->body);
    free(call->arena);
    free(call->resp);
    peer_unref(call->peer);
    free(call);
}

/* Keep a header as "name\0value\0" in the call's arena. The arena is bounded by the
 * header list limit, checked before this. */
static int call_keep_header(spk_grpc_call *call, const uint8_t *name, size_t nlen,
                            const uint8_t *value, size_t vlen, size_t *value_off)
{
    size_t need = call->arena_len + nlen + vlen + 2;
    if (need > call->arena_cap) {
        size_t cap = call->arena_cap != 0 ? call->arena_cap : 512;
        while (cap < need)
            cap *= 2;
        char *na = realloc(call->arena, cap);
        if (na == NULL)
            return -1;
        call->arena = na;
        call->arena_cap = cap;
    }
    char *p = call->arena + call->arena_len;
    memcpy(p, name, nlen);
    p[nlen] = '\0';
    memcpy(p + nlen + 1, value, vlen);
    p[nlen + 1 + vlen] = '\0';
    if (value_off != NULL)
        *value_off = call->arena_len + nlen + 1;
    call->arena_len = need;
    call->s->st.bytes_held += nlen + vlen + 2;
    return 0;
}

/* ---- output ------------------------------------------------------------------------------ */

static int out_append(struct conn *c, const uint8_t *data, size_t n)
{
    if (c->out_len == 0) {
        c->out_off = 0;
        c->write_progress = ev_now(c->s->loop);
    }
    if (c->out_off + c->out_len + n > c->out_cap && c->out_off > 0 && c->ssl_retry_len == 0) {
        memmove(c->out, c->out + c->out_off, c->out_len);
        c->out_off = 0;
    }
    if (c->out_off + c->out_len + n > c->out_cap) {
        size_t cap = c->out_cap != 0 ? c->out_cap : 16384;
        while (cap < c->out_off + c->out_len + n)
            cap *= 2;
        uint8_t *nb = realloc(c->out, cap);
        if (nb == NULL)
            return -1;
        c->out = nb;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_off + c->out_len, data, n);
    c->out_len += n;
    return 0;
}

/* Move frames from nghttp2 into the output buffer, up to OUT_HIGH. */
static int conn_pull(struct conn *c)
{
    while (c->out_len < OUT_HIGH) {
        const uint8_t *data;
        ssize_t n = nghttp2_session_mem_send(c->h2, &data);
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        if (out_append(c, data, (size_t)n) != 0)
            return -1;
    }
    return 0;
}

/* Write what the socket takes. Returns 0, or -1 when the connection is broken. */
static int conn_write(struct conn *c)
{
    while (c->out_len > 0) {
        ssize_t n;
        if (c->ssl != NULL) {
            size_t len = c->ssl_retry_len != 0 ? c->ssl_retry_len : c->out_len;
            if (len > INT32_MAX)
                len = INT32_MAX;
            ERR_clear_error();
            int r = SSL_write(c->ssl, c->out + c->out_off, (int)len);
            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                    c->ssl_retry_len = len;
                    return 0;
                }
                return -1;
            }
            c->ssl_retry_len = 0;
            n = r;
        } else {
            n = send(c->fd, c->out + c->out_off, c->out_len, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    return 0;
                if (errno == EINTR)
                    continue;
                return -1;
            }
        }
        c->out_off += (size_t)n;
        c->out_len -= (size_t)n;
        c->write_progress = ev_now(c->s->loop);
    }
    c->out_off = 0;
    return 0;
}

/* Pull and write until nghttp2 has nothing more or the socket is full. */
static int conn_flush(struct conn *c)
{
    for (;;) {
        if (conn_pull(c) != 0)
            return -1;
        size_t before = c->out_len;
        if (conn_write(c) != 0)
            return -1;
        if (c->out_len > 0 || before == 0)
            return 0;
    }
}

static void conn_update_io(struct conn *c)
{
    int ev = 0;
    bool can_read = c->out_len < OUT_HIGH && !c->eof;
    if (!c->handshaken || can_read)
        ev |= EV_READ;
    if (c->out_len > 0 || (c->ssl != NULL && SSL_want_write(c->ssl)))
        ev |= EV_WRITE;
    /* (libev keeps a flag of its own in io.events) */
    if (ev != (c->io.events & (EV_READ | EV_WRITE)) || !ev_is_active(&c->io)) {
        ev_io_stop(c->s->loop, &c->io);
        ev_io_set(&c->io, c->fd, ev);
        if (ev != 0)
            ev_io_start(c->s->loop, &c->io);
    }
    /* What OpenSSL already decrypted fires no event of the socket: feed one (after the
     * restart above, which would clear it). */
    if (can_read && c->handshaken && c->ssl != NULL && SSL_pending(c->ssl) > 0)
        ev_feed_event(c->s->loop, &c->io, EV_READ);
}

/* ---- answers ------------------------------------------------------------------------------ */

#define NV(n, v) { (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE }

/* Trailers-Only: one HEADERS with the status, ending the stream. */
static void submit_status(spk_grpc_call *call, const char *http_status, int code,
                          const char *msg)
{
    struct conn *c = call->conn;
    char codebuf[12], enc[2048];
    snprintf(codebuf, sizeof(codebuf), "%d", code);
    spk_grpc_message_encode(msg, strlen(msg), enc, sizeof(enc));
    nghttp2_nv nva[] = {
        NV(":status", http_status),
        NV("content-type", SPK_GRPC_CONTENT_TYPE),
        NV("grpc-status", codebuf),
        NV("grpc-message", enc),
    };
    size_t n = enc[0] != '\0' ? 4 : 3;
    nghttp2_submit_response(c->h2, call->stream_id, nva, n, NULL);
    /* Not now: nghttp2 marks a stream closing as soon as a RST_STREAM is queued for it,
     * and drops the answer queued before. on_frame_send submits it. */
    call->rst_after_answer = !call->request_ended;
}

/* The server refuses a request itself (never reaches the handler). */
static void call_refuse(spk_grpc_call *call, const char *http_status, int code,
                        const char *msg)
{
    call_set_answering(call, CALL_REFUSED);
    call->s->st.rejected++;
    submit_status(call, http_status, code, msg);
    /* The request bytes are no use any more. */
    call->s->st.bytes_held -= call->body.len;
    spk_grpc_body_free(&call->body);
}

static ssize_t on_data_read(nghttp2_session *h2, int32_t stream_id, uint8_t *buf,
                            size_t length, uint32_t *data_flags, nghttp2_data_source *src,
                            void *user)
{
    spk_grpc_call *call = src->ptr;
    size_t left = call->resp_len - call->resp_off;
    size_t n = left < length ? left : length;
    memcpy(buf, call->resp + call->resp_off, n);
    call->resp_off += n;
    if (call->resp_off == call->resp_len) {
        *data_flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
        nghttp2_nv trailers[] = { NV("grpc-status", "0") };
        if (nghttp2_submit_trailer(h2, stream_id, trailers, 1) != 0)
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        free(call->resp);
        call->resp = NULL;
        call->resp_len = call->resp_off = 0;
    }
    return (ssize_t)n;
}

static void conn_settle(struct conn *c);

/* After an answer given outside nghttp2's callbacks, send it now. Only sends: reading
 * here could run the handler again from inside its own answer. */
static void conn_kick(struct conn *c)
{
    if (c == NULL || c->in_recv)
        return;
    if (conn_flush(c) != 0) {
        conn_close(c);
        return;
    }
    conn_settle(c);
}

static bool call_take_answer(spk_grpc_call *call)
{
    if (call->state != CALL_HANDLER)
        abort(); /* answered twice, or never handed out: a broken invariant */
    call->s->outstanding--;
    if (call->conn == NULL || !call->stream_open) {
        struct conn *c = call->conn;
        call_free(call);
        if (c != NULL)
            conn_arm(c); /* it may be idle now */
        return false;
    }
    call_set_answering(call, CALL_ANSWERED);
    return true;
}

/* The request is no longer needed once its answer is made (the answer may be made of
 * it: an echo). */
static void call_drop_request(spk_grpc_call *call)
{
    call->s->st.bytes_held -= call->body.len;
    spk_grpc_body_free(&call->body);
    call->msg = NULL;
    call->msg_len = 0;
}

void spk_grpc_call_respond(spk_grpc_call *call, const void *msg, size_t len)
{
    if (!call_take_answer(call))
        return;
    struct conn *c = call->conn;
    if (len > UINT32_MAX || (call->resp = malloc(SPK_GRPC_PREFIX + len)) == NULL) {
        call->state = CALL_HANDLER; /* reuse the error path */
        call->s->outstanding++;
        spk_grpc_call_fail(call, SPK_GRPC_INTERNAL, "out of memory for a %zu-byte answer",
                           len);
        return;
    }
    spk_grpc_prefix(call->resp, (uint32_t)len);
    if (len > 0)
        memcpy(call->resp + SPK_GRPC_PREFIX, msg, len);
    call->resp_len = SPK_GRPC_PREFIX + len;
    call->resp_off = 0;
    call_drop_request(call);
    nghttp2_nv nva[] = {
        NV(":status", "200"),
        NV("content-type", SPK_GRPC_CONTENT_TYPE),
    };
    nghttp2_data_provider dp = { .source.ptr = call, .read_callback = on_data_read };
    if (nghttp2_submit_response(c->h2, call->stream_id, nva, 2, &dp) != 0)
        nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, call->stream_id,
                                  NGHTTP2_INTERNAL_ERROR);
    conn_kick(c);
}

void spk_grpc_call_fail(spk_grpc_call *call, int code, const char *fmt, ...)
{
    if (!call_take_answer(call))
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    call_drop_request(call);
    if (code == SPK_GRPC_OK)
        code = SPK_GRPC_UNKNOWN;
    struct conn *c = call->conn;
    submit_status(call, "200", code, msg);
    conn_kick(c);
}

/* ---- accessors ----------------------------------------------------------------------------- */

const char *spk_grpc_call_path(const spk_grpc_call *c)
{
    return c->path_off != SIZE_MAX ? c->arena + c->path_off : "";
}

const uint8_t *spk_grpc_call_message(const spk_grpc_call *c, size_t *len)
{
    *len = c->msg_len;
    return c->msg != NULL ? c->msg : (const uint8_t *)"";
}

const char *spk_grpc_call_header(const spk_grpc_call *c, const char *name)
{
    size_t off = 0;
    while (off < c->arena_len) {
        const char *n = c->arena + off;
        size_t nl = strlen(n);
        const char *v = n + nl + 1;
        if (n[0] != ':' && strcmp(n, name) == 0)
            return v;
        off += nl + strlen(v) + 2;
    }
    return NULL;
}

uint64_t spk_grpc_call_timeout_ms(const spk_grpc_call *c)
{
    return c->timeout_ms;
}

const char *spk_grpc_call_peer(const spk_grpc_call *c)
{
    return c->peer->addr;
}

const char *const *spk_grpc_call_tls_names(const spk_grpc_call *c, size_t *n)
{
    *n = c->peer->nnames;
    return (const char *const *)c->peer->names;
}

/* ---- nghttp2 callbacks --------------------------------------------------------------------- */

static spk_grpc_call *stream_call(nghttp2_session *h2, int32_t id)
{
    return nghttp2_session_get_stream_user_data(h2, id);
}

static int on_begin_headers(nghttp2_session *h2, const nghttp2_frame *frame, void *user)
{
    struct conn *c = user;
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    /* Orphaned calls count too: opening and resetting streams must not outrun the handler. */
    if (c->ncalls >= c->s->o.max_streams || c->s->shutting_down) {
        nghttp2_submit_rst_stream(h2, NGHTTP2_FLAG_NONE, frame->hd.stream_id,
                                  NGHTTP2_REFUSED_STREAM);
        c->s->st.rejected++;
        return 0;
    }
    spk_grpc_call *call = call_new(c, frame->hd.stream_id);
    if (call == NULL)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* nghttp2 resets the stream */
    nghttp2_session_set_stream_user_data(h2, frame->hd.stream_id, call);
    conn_arm(c);
    return 0;
}

static bool hdr_is(const uint8_t *name, size_t nlen, const char *lit)
{
    size_t l = strlen(lit);
    return nlen == l && memcmp(name, lit, l) == 0;
}

static int on_header(nghttp2_session *h2, const nghttp2_frame *frame, const uint8_t *name,
                     size_t nlen, const uint8_t *value, size_t vlen, uint8_t flags, void *user)
{
    spk_grpc_call *call = stream_call(h2, frame->hd.stream_id);
    if (call == NULL || call->state != CALL_READING || call->header_overflow)
        return 0;
    call->header_bytes += nlen + vlen + 32;
    if (call->header_bytes > call->s->o.max_header_list) {
        /* Keep nothing more; refused when the header block ends (on_frame_recv). */
        call->header_overflow = true;
        return 0;
    }
    if (frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0; /* request trailers: counted, not kept */
    if (hdr_is(name, nlen, ":method")) {
        call->have_method = true;
        call->method_post = vlen == 4 && memcmp(value, "POST", 4) == 0;
        return 0;
    }
    if (hdr_is(name, nlen, ":path")) {
        if (call_keep_header(call, name, nlen, value, vlen, &call->path_off) != 0)
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        return 0;
    }
    if (nlen > 0 && name[0] == ':')
        return 0; /* :scheme, :authority: checked by nghttp2, not needed */
    if (hdr_is(name, nlen, "content-type")) {
        call->ct_seen = true;
        call->ct_ok = spk_grpc_content_type_ok((const char *)value, vlen);
    } else if (hdr_is(name, nlen, "grpc-timeout")) {
        if (spk_grpc_timeout_parse((const char *)value, vlen, &call->timeout_ms) != 0)
            call->timeout_bad = true;
    }
    if (call_keep_header(call, name, nlen, value, vlen, NULL) != 0)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    return 0;
}

/* The request's header block ended: refuse what no handler should see. */
static void check_request_headers(spk_grpc_call *call)
{
    char msg[128];
    if (call->header_overflow) {
        snprintf(msg, sizeof(msg), "the request's header list is over %zu bytes",
                 call->s->o.max_header_list);
        call_refuse(call, "200", SPK_GRPC_RESOURCE_EXHAUSTED, msg);
    } else if (!call->method_post) {
        call_refuse(call, "405", SPK_GRPC_INTERNAL, "gRPC requires the POST method");
    } else if (!call->ct_ok) {
        /* PROTOCOL-HTTP2.md: 415, so that no HTTP client takes the error for a success. */
        call_refuse(call, "415", SPK_GRPC_INVALID_ARGUMENT,
                    call->ct_seen ? "content-type is not application/grpc"
                                  : "no content-type");
    } else if (call->timeout_bad) {
        call_refuse(call, "200", SPK_GRPC_INVALID_ARGUMENT, "malformed grpc-timeout");
    }
}

static void request_complete(struct conn *c, spk_grpc_call *call)
{
    spk_errbuf eb;
    spk_grpc_code code = spk_grpc_body_finish(&call->body, &call->msg, &call->msg_len, &eb);
    if (code != SPK_GRPC_OK) {
        call_refuse(call, "200", code, eb.msg);
        return;
    }
    call->state = CALL_HANDLER;
    c->s->outstanding++;
    c->s->st.calls++;
    c->s->o.handler(c->s->o.arg, call);
}

static int on_frame_recv(nghttp2_session *h2, const nghttp2_frame *frame, void *user)
{
    struct conn *c = user;
    if (frame->hd.type == NGHTTP2_SETTINGS && !(frame->hd.flags & NGHTTP2_FLAG_ACK)) {
        if (!c->preface_done) {
            c->preface_done = true;
            conn_arm(c);
        }
        return 0;
    }
    if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA)
        return 0;
    spk_grpc_call *call = stream_call(h2, frame->hd.stream_id);
    if (call == NULL)
        return 0;
    bool end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    if (end)
        call->request_ended = true;
    if (call->state != CALL_READING)
        return 0;
    if (frame->hd.type == NGHTTP2_HEADERS) {
        if (frame->headers.cat == NGHTTP2_HCAT_REQUEST || call->header_overflow)
            check_request_headers(call);
        if (call->state != CALL_READING)
            return 0;
    }
    if (end) {
        request_complete(c, call);
        conn_arm(c);
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *h2, uint8_t flags, int32_t stream_id,
                         const uint8_t *data, size_t len, void *user)
{
    spk_grpc_call *call = stream_call(h2, stream_id);
    if (call == NULL || call->state != CALL_READING || len == 0)
        return 0;
    spk_errbuf eb;
    size_t before = call->body.len;
    spk_grpc_code code = spk_grpc_body_append(&call->body, data, len, &eb);
    /* Counted by what the body kept: an append that fails may still have kept the
     * prefix (grpc.c, "more than one message" after a prefix completed in the chunk). */
    call->s->st.bytes_held += call->body.len - before;
    if (code != SPK_GRPC_OK)
        call_refuse(call, "200", code, eb.msg);
    return 0;
}

static int on_stream_close(nghttp2_session *h2, int32_t stream_id, uint32_t error_code,
                           void *user)
{
    struct conn *c = user;
    spk_grpc_call *call = stream_call(h2, stream_id);
    if (call == NULL)
        return 0;
    nghttp2_session_set_stream_user_data(h2, stream_id, NULL);
    call->stream_open = false;
    c->nstreams--;
    if (c->nstreams == 0)
        c->idle_since = ev_now(c->s->loop);
    if (call->state != CALL_HANDLER)
        call_free(call); /* else the handler's answer frees it */
    conn_arm(c);
    return 0;
}

static int on_frame_send(nghttp2_session *h2, const nghttp2_frame *frame, void *user)
{
    struct conn *c = user;
    if (frame->hd.stream_id != 0 &&
        (frame->hd.type == NGHTTP2_DATA || frame->hd.type == NGHTTP2_HEADERS))
        c->answer_progress = ev_now(c->s->loop);
    if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR &&
        !c->goaway_by_us)
        c->s->st.protocol_errors++;
    if (frame->hd.type == NGHTTP2_HEADERS && (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        /* An answer given before the request ended: ask the client to stop sending
         * (RFC 9113 8.1), as grpc-go does. */
        spk_grpc_call *call = stream_call(h2, frame->hd.stream_id);
        if (call != NULL && call->rst_after_answer && !call->request_ended)
            nghttp2_submit_rst_stream(h2, NGHTTP2_FLAG_NONE, frame->hd.stream_id,
                                      NGHTTP2_NO_ERROR);
    }
    return 0;
}

static int make_callbacks(nghttp2_session_callbacks **out)
{
    nghttp2_session_callbacks *cbs;
    if (nghttp2_session_callbacks_new(&cbs) != 0)
        return -1;
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    *out = cbs;
    return 0;
}

/* ---- connections -------------------------------------------------------------------------- */

/* GOAWAY, a best-effort flush, close. */
static void conn_goaway_close(struct conn *c, uint32_t code)
{
    c->goaway_by_us = true;
    if (c->h2 != NULL && c->handshaken) {
        nghttp2_session_terminate_session(c->h2, code);
        if (conn_pull(c) == 0)
            conn_write(c);
    }
    conn_close(c);
}

static void conn_close(struct conn *c)
{
    spk_grpc_server *s = c->s;
    ev_io_stop(s->loop, &c->io);
    ev_timer_stop(s->loop, &c->timer);
    /* Calls with the handler become orphans; the others go now. nghttp2_session_del
     * calls no stream-close callback. */
    spk_grpc_call *call = c->calls;
    while (call != NULL) {
        spk_grpc_call *next = call->next;
        if (call->state == CALL_HANDLER) {
            call->stream_open = false;
            call_unlink(call);
        } else {
            call_free(call);
        }
        call = next;
    }
    if (c->h2 != NULL)
        nghttp2_session_del(c->h2);
    if (c->ssl != NULL)
        SSL_free(c->ssl);
    close(c->fd);
    peer_unref(c->peer);
    free(c->out);
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    s->nconns--;
    s->st.connections = s->nconns;
    free(c);
}

/* The connection's next deadline, or 0 when it has none. */
static ev_tstamp conn_deadline(const struct conn *c)
{
    const spk_grpc_server_opts *o = &c->s->o;
    ev_tstamp req = (ev_tstamp)o->request_timeout_ms / 1000.0;
    ev_tstamp d = 0;
    if (!c->handshaken || !c->preface_done)
        return c->accepted + req;
    /* Answers that do not move: a full socket, or a peer that grants no window (its
     * PINGs and other small talk do not count as progress). */
    if (c->out_len > 0)
        d = c->write_progress + req;
    if (c->nanswers > 0 && (d == 0 || c->answer_progress + req < d))
        d = c->answer_progress + req;
    for (const spk_grpc_call *call = c->calls; call != NULL; call = call->next) {
        if (call->state == CALL_READING) {
            ev_tstamp t = call->opened + req;
            if (d == 0 || t < d)
                d = t;
            break; /* the list is in opening order: the first is the oldest */
        }
    }
    if (c->nstreams == 0 && c->ncalls == 0) {
        ev_tstamp t = c->idle_since + (ev_tstamp)o->idle_timeout_ms / 1000.0;
        if (d == 0 || t < d)
            d = t;
    }
    return d;
}

static void conn_arm(struct conn *c)
{
    ev_tstamp d = conn_deadline(c);
    ev_timer_stop(c->s->loop, &c->timer);
    if (d == 0)
        return;
    ev_tstamp after = d - ev_now(c->s->loop);
    ev_timer_set(&c->timer, after > 0 ? after : 0, 0);
    ev_timer_start(c->s->loop, &c->timer);
}

static void on_conn_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct conn *c = w->data;
    ev_tstamp d = conn_deadline(c);
    if (d != 0 && d <= ev_now(loop) + 0.001) {
        c->s->st.timeouts++;
        conn_goaway_close(c, NGHTTP2_NO_ERROR);
        return;
    }
    conn_arm(c);
}

static int conn_start_h2(struct conn *c)
{
    const spk_grpc_server_opts *o = &c->s->o;
    /* nghttp2's default options: they carry Debian's rapid-reset and CONTINUATION-flood
     * limits (stream reset rate limit, max continuations). */
    if (nghttp2_session_server_new(&c->h2, c->s->cbs, c) != 0)
        return -1;
    nghttp2_settings_entry iv[] = {
        { NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, o->max_streams },
        { NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW },
        { NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE,
          o->max_header_list > UINT32_MAX ? UINT32_MAX : (uint32_t)o->max_header_list },
    };
    if (nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, iv, sizeof(iv) / sizeof(iv[0])) != 0)
        return -1;
    if (nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0, CONN_WINDOW) != 0)
        return -1;
    return 0;
}

/* The verified client certificate's names: the subject's CN, then DNS and URI SANs. */
static void peer_take_names(struct peer *p, SSL *ssl)
{
    X509 *cert = SSL_get1_peer_certificate(ssl);
    if (cert == NULL)
        return;
    if (SSL_get_verify_result(ssl) != X509_V_OK)
        goto done;
    X509_NAME *subj = X509_get_subject_name(cert);
    int idx = subj != NULL ? X509_NAME_get_index_by_NID(subj, NID_commonName, -1) : -1;
    if (idx >= 0) {
        ASN1_STRING *d = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subj, idx));
        unsigned char *utf8 = NULL;
        int len = ASN1_STRING_to_UTF8(&utf8, d);
        if (len > 0 && memchr(utf8, '\0', (size_t)len) == NULL)
            p->names[p->nnames++] = strndup((char *)utf8, (size_t)len);
        OPENSSL_free(utf8);
    }
    GENERAL_NAMES *sans = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    for (int i = 0; sans != NULL && i < sk_GENERAL_NAME_num(sans); i++) {
        const GENERAL_NAME *g = sk_GENERAL_NAME_value(sans, i);
        const ASN1_IA5STRING *v;
        if (g->type == GEN_DNS)
            v = g->d.dNSName;
        else if (g->type == GEN_URI)
            v = g->d.uniformResourceIdentifier;
        else
            continue;
        const unsigned char *b = ASN1_STRING_get0_data(v);
        int len = ASN1_STRING_length(v);
        if (len <= 0 || memchr(b, '\0', (size_t)len) != NULL || p->nnames >= MAX_TLS_NAMES)
            continue;
        p->names[p->nnames] = strndup((const char *)b, (size_t)len);
        if (p->names[p->nnames] != NULL)
            p->nnames++;
    }
    GENERAL_NAMES_free(sans);
done:
    /* a NULL left by a failed strndup is dropped */
    for (size_t i = 0; i < p->nnames; i++)
        if (p->names[i] == NULL)
            p->names[i--] = p->names[--p->nnames];
    X509_free(cert);
}

/* Drive the TLS handshake. Returns 1 done, 0 in progress, -1 failed. */
static int conn_handshake(struct conn *c)
{
    ERR_clear_error();
    int r = SSL_accept(c->ssl);
    if (r <= 0) {
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
            return 0;
        return -1;
    }
    const unsigned char *alpn = NULL;
    unsigned alen = 0;
    SSL_get0_alpn_selected(c->ssl, &alpn, &alen);
    if (alen != 2 || memcmp(alpn, "h2", 2) != 0)
        return -1; /* a client that did not offer ALPN at all */
    peer_take_names(c->peer, c->ssl);
    c->handshaken = true;
    return 1;
}

/* Read what there is and feed it to nghttp2. Returns -1 when the connection must go. */
static int conn_read(struct conn *c)
{
    uint8_t buf[READ_CHUNK];
    for (int round = 0; c->out_len < OUT_HIGH && !c->eof; round++) {
        if (round == READ_ROUNDS) {
            /* Enough for one event: let the other connections have the loop. What is
             * left in the kernel fires again; what OpenSSL holds, conn_update_io feeds. */
            return 0;
        }
        ssize_t n;
        if (c->ssl != NULL) {
            ERR_clear_error();
            int r = SSL_read(c->ssl, buf, sizeof(buf));
            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
                    return 0;
                if (e == SSL_ERROR_ZERO_RETURN) {
                    c->eof = true;
                    return 0;
                }
                return -1;
            }
            n = r;
        } else {
            n = recv(c->fd, buf, sizeof(buf), 0);
            if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    return 0;
                if (errno == EINTR)
                    continue;
                return -1;
            }
            if (n == 0) {
                c->eof = true;
                return 0;
            }
        }
        c->in_recv = true;
        ssize_t used = nghttp2_session_mem_recv(c->h2, buf, (size_t)n);
        c->in_recv = false;
        if (used < 0) {
            /* Bad client magic, a flood, or a callback failure: nghttp2 may have queued a
             * GOAWAY; send it if we can. */
            c->s->st.protocol_errors++;
            c->goaway_by_us = true;
            if (conn_pull(c) == 0)
                conn_write(c);
            return -1;
        }
        /* Answers and acks go out as they are made, so out_len bounds nghttp2's queue. */
        if (conn_flush(c) != 0)
            return -1;
    }
    return 0;
}

/* Everything a connection does after an event: handshake, read, send, close. May free c. */
static void conn_drive(struct conn *c)
{
    if (!c->handshaken) {
        int r = conn_handshake(c);
        if (r < 0) {
            c->s->st.refused++;
            conn_close(c);
            return;
        }
        if (r == 0) {
            conn_update_io(c);
            return;
        }
        conn_arm(c);
    }
    if (conn_flush(c) != 0 || conn_read(c) != 0) {
        conn_close(c);
        return;
    }
    conn_settle(c);
}

/* After I/O: close a connection that is done, else set what to wait for. May free c. */
static void conn_settle(struct conn *c)
{
    if (c->eof) {
        /* The peer will not read answers either (a half-close is not gRPC's way). */
        conn_close(c);
        return;
    }
    if (!nghttp2_session_want_read(c->h2) && !nghttp2_session_want_write(c->h2) &&
        c->out_len == 0) {
        conn_close(c);
        return;
    }
    conn_update_io(c);
    conn_arm(c);
}

static void on_conn_io(struct ev_loop *loop, ev_io *w, int revents)
{
    conn_drive(w->data);
}

int spk_grpc_server_adopt(spk_grpc_server *s, int fd, const struct sockaddr *peer,
                          socklen_t peer_len, spk_errbuf *eb)
{
    if (s->nconns >= s->o.max_connections || s->shutting_down) {
        close(fd);
        s->st.refused++;
        return spk_errf(eb, SPK_EBUSY, "%zu connections open, the limit", s->nconns);
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        close(fd);
        return spk_errf(eb, SPK_EIO, "fcntl: %s", strerror(errno));
    }
    /* An answer goes out as several writes (HEADERS, DATA, trailers): without NODELAY,
     * Nagle holds the later ones until the peer's delayed ACK, ~40 ms a call. Fails
     * harmlessly on a Unix socket. */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct conn *c = calloc(1, sizeof(*c));
    struct peer *p = calloc(1, sizeof(*p));
    if (c == NULL || p == NULL) {
        free(c);
        free(p);
        close(fd);
        return spk_errf(eb, SPK_ENOMEM, "out of memory for a connection");
    }
    p->refs = 1;
    snprintf(p->addr, sizeof(p->addr), "unknown");
    if (peer != NULL && peer->sa_family == AF_INET && peer_len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)peer;
        char a[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &in->sin_addr, a, sizeof(a));
        snprintf(p->addr, sizeof(p->addr), "%s:%u", a, ntohs(in->sin_port));
    } else if (peer != NULL && peer->sa_family == AF_INET6 &&
               peer_len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)peer;
        char a[INET6_ADDRSTRLEN];
        inet_ntop(AF_INET6, &in6->sin6_addr, a, sizeof(a));
        snprintf(p->addr, sizeof(p->addr), "[%s]:%u", a, ntohs(in6->sin6_port));
    } else if (peer != NULL && peer->sa_family == AF_UNIX) {
        snprintf(p->addr, sizeof(p->addr), "unix");
    }
    c->s = s;
    c->fd = fd;
    c->peer = p;
    c->accepted = c->idle_since = c->write_progress = c->answer_progress = ev_now(s->loop);
    c->handshaken = s->o.tls == NULL;
    ev_io_init(&c->io, on_conn_io, fd, EV_READ);
    c->io.data = c;
    ev_timer_init(&c->timer, on_conn_timer, 0, 0);
    c->timer.data = c;
    c->next = s->conns;
    if (s->conns != NULL)
        s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    s->st.connections = s->nconns;
    s->st.accepted++;
    if (conn_start_h2(c) != 0)
        goto nomem;
    if (s->o.tls != NULL) {
        c->ssl = SSL_new(s->o.tls);
        if (c->ssl == NULL || SSL_set_fd(c->ssl, fd) != 1)
            goto nomem;
        SSL_set_mode(c->ssl, SSL_MODE_ENABLE_PARTIAL_WRITE |
                                 SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
        SSL_set_accept_state(c->ssl);
    }
    ev_io_start(s->loop, &c->io);
    conn_arm(c);
    return 0;
nomem:
    conn_close(c);
    return spk_errf(eb, SPK_ENOMEM, "out of memory for a connection");
}

/* ---- listening ---------------------------------------------------------------------------- */

static void on_pause_over(struct ev_loop *loop, ev_timer *w, int revents)
{
    spk_grpc_server *s = w->data;
    if (s->listening)
        ev_io_start(loop, &s->lio);
}

static void on_accept(struct ev_loop *loop, ev_io *w, int revents)
{
    spk_grpc_server *s = w->data;
    for (int i = 0; i < 64; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int fd = accept4(s->listen_fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* Out of descriptors: let some close instead of spinning on the event. */
                ev_io_stop(loop, &s->lio);
                ev_timer_set(&s->pause, EMFILE_PAUSE, 0);
                ev_timer_start(loop, &s->pause);
            }
            return; /* EAGAIN, ECONNABORTED, EINTR...: wait for the next event */
        }
        spk_grpc_server_adopt(s, fd, (struct sockaddr *)&ss, sl, NULL);
        if (!s->listening)
            return;
    }
}

int spk_grpc_server_listen(spk_grpc_server *s, int fd, spk_errbuf *eb)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return spk_errf(eb, SPK_EIO, "fcntl on the listening socket: %s", strerror(errno));
    if (s->listening)
        ev_io_stop(s->loop, &s->lio);
    s->listen_fd = fd;
    ev_io_init(&s->lio, on_accept, fd, EV_READ);
    s->lio.data = s;
    ev_io_start(s->loop, &s->lio);
    s->listening = true;
    return 0;
}

static void stop_accepting(spk_grpc_server *s)
{
    if (!s->listening)
        return;
    ev_io_stop(s->loop, &s->lio);
    ev_timer_stop(s->loop, &s->pause);
    s->listening = false;
}

/* ---- the server --------------------------------------------------------------------------- */

int spk_grpc_server_new(struct ev_loop *loop, const spk_grpc_server_opts *opts,
                        spk_grpc_server **out, spk_errbuf *eb)
{
    if (loop == NULL || opts == NULL || opts->handler == NULL || opts->max_streams == 0 ||
        opts->max_message == 0 || opts->max_message > UINT32_MAX ||
        opts->request_timeout_ms == 0 || opts->idle_timeout_ms == 0 ||
        opts->max_connections == 0)
        return spk_errf(eb, SPK_EINVAL, "gRPC server: a handler and non-zero limits are "
                        "required (max_message under 4 GiB)");
    spk_grpc_server *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return spk_errf(eb, SPK_ENOMEM, "out of memory for the gRPC server");
    s->loop = loop;
    s->o = *opts;
    s->listen_fd = -1;
    ev_timer_init(&s->pause, on_pause_over, 0, 0);
    s->pause.data = s;
    if (make_callbacks(&s->cbs) != 0) {
        free(s);
        return spk_errf(eb, SPK_ENOMEM, "out of memory for nghttp2's callbacks");
    }
    *out = s;
    return 0;
}

void spk_grpc_server_free(spk_grpc_server *s)
{
    if (s == NULL)
        return;
    stop_accepting(s);
    while (s->conns != NULL)
        conn_close(s->conns);
    nghttp2_session_callbacks_del(s->cbs);
    free(s);
}

void spk_grpc_server_shutdown(spk_grpc_server *s)
{
    stop_accepting(s);
    s->shutting_down = true;
    struct conn *c = s->conns;
    while (c != NULL) {
        struct conn *next = c->next;
        if (c->handshaken) {
            c->goaway_by_us = true;
            nghttp2_submit_goaway(c->h2, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(c->h2),
                                  NGHTTP2_NO_ERROR, NULL, 0);
            /* Send only: reading could run the handler, which could close another
             * connection of this list. */
            conn_kick(c); /* may close c */
        } else {
            conn_close(c);
        }
        c = next;
    }
}

void spk_grpc_server_stats_get(const spk_grpc_server *s, spk_grpc_server_stats *st)
{
    *st = s->st;
    st->connections = s->nconns;
}

/* ---- TLS ---------------------------------------------------------------------------------- */

static int on_alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                          const unsigned char *in, unsigned inlen, void *arg)
{
    static const unsigned char h2[] = "\x02h2";
    unsigned char *sel;
    if (SSL_select_next_proto(&sel, outlen, h2, sizeof(h2) - 1, in, inlen) !=
        OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_ALERT_FATAL; /* no h2 offered: refuse the handshake */
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

static int tls_fail(SSL_CTX *ctx, spk_errbuf *eb, int err, const char *what, const char *file)
{
    char reason[256] = "";
    unsigned long e = ERR_peek_last_error();
    if (e != 0)
        ERR_error_string_n(e, reason, sizeof(reason));
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return spk_errf(eb, err, "TLS: %s %s: %s", what, file != NULL ? file : "",
                    reason[0] != '\0' ? reason : "failed");
}

int spk_grpc_tls_server_ctx(const char *cert_file, const char *key_file, const char *client_ca,
                            bool require_client_cert, SSL_CTX **out, spk_errbuf *eb)
{
    if (cert_file == NULL || key_file == NULL)
        return spk_errf(eb, SPK_EINVAL, "TLS: a certificate and a key file are required");
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL)
        return tls_fail(NULL, eb, SPK_ENOMEM, "SSL_CTX_new", NULL);
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    /* RFC 9113 9.2.2: TLS 1.2 with HTTP/2 needs an ephemeral key exchange and an AEAD. */
    if (SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20") != 1)
        return tls_fail(ctx, eb, SPK_EINVAL, "cipher list", NULL);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1)
        return tls_fail(ctx, eb, SPK_EINVAL, "certificate chain", cert_file);
    if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1)
        return tls_fail(ctx, eb, SPK_EINVAL, "private key", key_file);
    if (SSL_CTX_check_private_key(ctx) != 1)
        return tls_fail(ctx, eb, SPK_EINVAL, "key does not match the certificate", key_file);
    if (client_ca != NULL) {
        if (SSL_CTX_load_verify_locations(ctx, client_ca, NULL) != 1)
            return tls_fail(ctx, eb, SPK_EINVAL, "client CA", client_ca);
        STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(client_ca);
        if (names == NULL)
            return tls_fail(ctx, eb, SPK_EINVAL, "client CA names", client_ca);
        SSL_CTX_set_client_CA_list(ctx, names);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER |
                                    (require_client_cert ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
                           NULL);
        static const unsigned char sid[] = "spoke-grpc";
        SSL_CTX_set_session_id_context(ctx, sid, sizeof(sid) - 1);
    }
    SSL_CTX_set_alpn_select_cb(ctx, on_alpn_select, NULL);
    *out = ctx;
    return 0;
}
