/*
 * proxy.c -- one worker's proxy (see proxy.h for the contract).
 *
 * Each connection has two halves: `up` carries client bytes to the server, `down` server
 * bytes to the client. Reading a chunk from a half's source runs the chain over it
 * (from_X hooks, then to_Y hooks), then writes the result straight to the destination
 * when nothing is queued before it; only what the socket did not take is copied into
 * the half's queue. So in the common case a byte is copied once, by the kernel, into the
 * shared read buffer, and once out of it.
 *
 * Which watchers are active is derived, not tracked: update_readers() computes from the
 * state whether each side should be read (not at EOF, not closing, destination queue under
 * the high watermark) and starts or stops the watcher accordingly. A writer is active
 * exactly while its queue is non-empty and the socket said EAGAIN.
 */
#include "proxy.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "net.h"

typedef struct half {
    spk_bytes q;  /* bytes waiting for the destination; valid from q.data + off */
    size_t off;
    bool eof;     /* the source sent FIN */
    bool shut;    /* the FIN was passed on to the destination */
} half;

typedef struct pconn {
    spoke_conn sc;
    spk_proxy *px;
    int cfd, sfd;
    ev_io crd, cwr, srd, swr;
    ev_timer tmr; /* connect timeout, then close linger */
    half up, down;
    bool connecting, connected, closing, replied;
    struct pconn *prev, *next;
} pconn;

struct spk_proxy {
    struct ev_loop *loop;
    const spk_config *cfg;
    const spk_chain *chain;
    spk_addr upstream;
    ev_io *lw;
    size_t n_listen;
    bool accepting, accept_paused;
    ev_timer accept_retry;
    pconn *conns;
    size_t n_conns;
    uint64_t next_id;
    uint64_t bytes[2]; /* read from the server [0] and from the client [1] */
    spk_proxy_counters *pub; /* where they are published as they change; NULL: nowhere */
    uint8_t *rbuf;
    size_t rcap;
    spk_buf buf;
    size_t hw;
    ev_tstamp upstream_log_at;
    unsigned upstream_log_suppressed;
    /* EXHAUSTION (below) */
    int starved;               /* the errno of the shortage (EMFILE, ENFILE, ENOBUFS, ENOMEM)
                                  until the backlog is drained; 0: none */
    size_t starved_mark;       /* connections open when it paused: a close below frees
                                  descriptors, and accepting resumes at once */
    bool starved_logged;       /* the shortage was logged, "accepting again" not yet */
    ev_tstamp starved_log_at;  /* ... at most once a second */
    unsigned starved_unlogged; /* shortages not logged since */
};

#define SPK_ACCEPT_BATCH 4
#define SPK_ACCEPT_RETRY_S 0.5 /* out of descriptors or memory, and no connection closed:
                                  try accepting again then */

static void conn_close(pconn *c);
static void update_readers(pconn *c);

static inline size_t pending(const half *h) { return h->q.len - h->off; }

static void io_set(struct ev_loop *loop, ev_io *w, bool on)
{
    if (on && !ev_is_active(w))
        ev_io_start(loop, w);
    else if (!on && ev_is_active(w))
        ev_io_stop(loop, w);
}

static void accept_pause(spk_proxy *px, double retry_s);

static bool is_exhaustion(int err)
{
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

/* Why a descriptor could not be had, for the log: "too many open files (...)" for EMFILE
 * (this worker's limit: listen.max_open_files or the one it inherited) and ENFILE (the
 * system's), else the error's own name. */
static void exhaustion_text(spk_proxy *px, int err, char *buf, size_t cap)
{
    if (err != EMFILE && err != ENFILE) {
        snprintf(buf, cap, "%s (%zu connections open)", strerror(err), px->n_conns);
        return;
    }
    struct rlimit rl = {0};
    getrlimit(RLIMIT_NOFILE, &rl);
    snprintf(buf, cap, "too many open files (%s; %zu connections open, open-files limit %llu: "
             "see listen.max_open_files)",
             err == EMFILE ? "this worker's limit" : "the system's file table", px->n_conns,
             (unsigned long long)rl.rlim_cur);
}

/* EXHAUSTION. When the worker runs out of descriptors or kernel memory (is_exhaustion:
 * the error is px->starved), accepting more clients could not serve them, so it pauses
 * accepting (the listening socket stays readable: not pausing would spin) until a
 * connection closes (conn_close, below px->starved_mark: that frees descriptors) or, for a
 * shortage not of the worker's own making, a probe every SPK_ACCEPT_RETRY_S finds the
 * descriptors a connection needs (on_accept_retry). Until the backlog is drained (accept
 * says EAGAIN) every accept is probed first, so the clients waiting there are served as
 * descriptors free up, not taken in only to be closed. The start is logged (at most once
 * a second), and "accepting again" once a connection is set up after it. */

/* Whether the descriptors a new connection needs (its client's, and its upstream's when
 * connecting eagerly) can be had now: a probe that duplicates the listening socket. */
static bool fds_available(const spk_proxy *px)
{
    int need = px->cfg->upstream_connect == SPK_CONNECT_EAGER ? 2 : 1, got[2], n = 0;
    while (n < need && (got[n] = fcntl(px->lw[0].fd, F_DUPFD_CLOEXEC, 0)) >= 0)
        n++;
    for (int i = 0; i < n; i++)
        close(got[i]);
    return n == need;
}

/* Out of resources (error `err`) with `open` connections (not counting a client about to
 * be closed for it); with `log_it` (an accept failed) say so. */
static void starve(spk_proxy *px, int err, bool log_it, size_t open)
{
    ev_tstamp now = ev_now(px->loop);
    if (log_it && !px->starved_logged && now - px->starved_log_at < 1.0) {
        px->starved_unlogged++;
    } else if (log_it && !px->starved_logged) {
        char why[200], more[80] = "";
        exhaustion_text(px, err, why, sizeof(why));
        if (px->starved_unlogged > 0)
            snprintf(more, sizeof(more), " (%u more times in the last second, not logged)",
                     px->starved_unlogged);
        spk_error("accept: %s; not accepting for now%s", why, more);
        px->starved_log_at = now;
        px->starved_unlogged = 0;
        px->starved_logged = true;
    }
    px->starved = err;
    px->starved_mark = open;
    accept_pause(px, SPK_ACCEPT_RETRY_S);
}

/* A connection was accepted and set up after a shortage: say that it works again. */
static void resources_back(spk_proxy *px)
{
    if (px->starved != 0 && px->starved_logged)
        spk_info("accepting again (%zu connections open; it had stopped on: %s)", px->n_conns,
                 strerror(px->starved));
    px->starved_logged = false;
}

/* Whether a client may be accepted now: not while a shortage of descriptors lasts. */
static bool may_accept(spk_proxy *px)
{
    if ((px->starved != EMFILE && px->starved != ENFILE) || px->n_listen == 0 ||
        fds_available(px))
        return true;
    starve(px, px->starved, false, px->n_conns);
    return false;
}

/* A client's upstream connection failed: say why clearly -- the upstream is down, or
 * (is_exhaustion) this worker had no descriptor left for the socket, which is not the
 * upstream's fault -- but not ten thousand times a second. */
static void log_upstream_failure(spk_proxy *px, pconn *c, const char *what, int err)
{
    ev_tstamp now = ev_now(px->loop);
    if (now - px->upstream_log_at < 1.0) {
        px->upstream_log_suppressed++;
        return;
    }
    const char *more = px->upstream_log_suppressed
                           ? " (similar failures in the last second not logged)"
                           : "";
    if (is_exhaustion(err)) {
        char why[200];
        exhaustion_text(px, err, why, sizeof(why));
        spk_error("connect to upstream %s for client %s (conn %llu): %s; closing the client%s",
                  px->upstream.text, c->sc.peer, (unsigned long long)c->sc.id, why, more);
        px->starved_logged = true; /* so that "accepting again" follows */
    } else {
        spk_warn("upstream %s %s: %s; closing client %s (conn %llu)%s", px->upstream.text,
                 what, strerror(err), c->sc.peer, (unsigned long long)c->sc.id, more);
    }
    px->upstream_log_at = now;
    px->upstream_log_suppressed = 0;
}

/* ---- writing ------------------------------------------------------------------------ */

/* Write what `h` holds to `fd`. Returns 0, or -1 when the connection was closed. */
static int half_flush(pconn *c, half *h, int fd, ev_io *w)
{
    spk_proxy *px = c->px;
    while (pending(h) > 0) {
        ssize_t n = send(fd, h->q.data + h->off, pending(h), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                io_set(px->loop, w, true);
                return 0;
            }
            spk_debug("conn %llu: write to %s: %s", (unsigned long long)c->sc.id,
                      fd == c->cfd ? "client" : "server", strerror(errno));
            conn_close(c);
            return -1;
        }
        h->off += (size_t)n;
    }
    io_set(px->loop, w, false);
    h->q.len = h->off = 0;
    if (h->q.cap > 4 * px->rcap) { /* give a burst's memory back */
        spk_bytes_free(&h->q);
    }
    if (h->eof && !h->shut) {
        shutdown(fd, SHUT_WR);
        h->shut = true;
    }
    return 0;
}

/* Queue or write data to a half's destination. Returns 0 or -1 (connection closed). */
static int half_send(pconn *c, half *h, int fd, ev_io *w, bool dst_ready, const uint8_t *data,
                     size_t len)
{
    if (len == 0)
        return 0;
    if (pending(h) == 0 && dst_ready) {
        ssize_t n;
        do
            n = send(fd, data, len, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            spk_debug("conn %llu: write to %s: %s", (unsigned long long)c->sc.id,
                      fd == c->cfd ? "client" : "server", strerror(errno));
            conn_close(c);
            return -1;
        }
        if (n > 0) {
            data += n;
            len -= (size_t)n;
        }
        if (len == 0)
            return 0;
        io_set(c->px->loop, w, true);
    }
    if (spk_bytes_append(&h->q, data, len) != 0) {
        spk_error("conn %llu: out of memory queueing %zu bytes; closing",
                  (unsigned long long)c->sc.id, len);
        conn_close(c);
        return -1;
    }
    return 0;
}

static int send_to_client(pconn *c, const uint8_t *data, size_t len)
{
    return half_send(c, &c->down, c->cfd, &c->cwr, true, data, len);
}

static int send_to_server(pconn *c, const uint8_t *data, size_t len)
{
    return half_send(c, &c->up, c->sfd, &c->swr, c->connected, data, len);
}

/* Send what plugins queued with respond() during the last chain run. */
static int deliver_reply(pconn *c)
{
    spk_bytes *r = &c->sc.reply;
    if (r->len == 0)
        return 0;
    c->replied = true;
    int rc = c->sc.reply_to_server ? send_to_server(c, r->data, r->len)
                                   : send_to_client(c, r->data, r->len);
    if (rc == 0)
        r->len = 0;
    return rc;
}

/* ---- closing ------------------------------------------------------------------------ */

static void conn_close(pconn *c)
{
    spk_proxy *px = c->px;
    if (px->chain != NULL)
        spk_chain_close(px->chain, &c->sc);
    ev_io_stop(px->loop, &c->crd);
    ev_io_stop(px->loop, &c->cwr);
    ev_io_stop(px->loop, &c->srd);
    ev_io_stop(px->loop, &c->swr);
    ev_timer_stop(px->loop, &c->tmr);
    close(c->cfd);
    if (c->sfd >= 0)
        close(c->sfd);
    spk_bytes_free(&c->up.q);
    spk_bytes_free(&c->down.q);
    spk_chain_conn_fini(&c->sc);
    if (c->prev)
        c->prev->next = c->next;
    else
        px->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    px->n_conns--;
    free(c);
    /* Paused at max_connections, or out of descriptors (starve): this close may make
     * room. */
    bool room = px->starved != 0 ? px->n_conns < px->starved_mark
                                 : px->n_conns < px->cfg->max_connections;
    if (px->accept_paused && px->accepting && room) {
        px->accept_paused = false;
        for (size_t i = 0; i < px->n_listen; i++)
            ev_io_start(px->loop, &px->lw[i]);
    }
}

static void linger_expired(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    conn_close((pconn *)((char *)w - offsetof(pconn, tmr)));
}

/* A plugin asked to close (CLOSE verdict or terminate signal): stop reading, send what is
 * queued (the plugin's response included), then close; at most connect_timeout later. */
static void conn_begin_close(pconn *c)
{
    c->closing = true;
    update_readers(c);
    if (pending(&c->down) == 0 && (pending(&c->up) == 0 || !c->connected)) {
        conn_close(c);
        return;
    }
    ev_timer_stop(c->px->loop, &c->tmr);
    ev_timer_init(&c->tmr, linger_expired, (double)c->px->cfg->connect_timeout_ms / 1000.0, 0);
    ev_timer_start(c->px->loop, &c->tmr);
}

/* Called after every flush: end the connection when both directions are done. */
static bool conn_maybe_done(pconn *c)
{
    if (c->closing) {
        if (pending(&c->down) == 0 && (pending(&c->up) == 0 || !c->connected)) {
            conn_close(c);
            return true;
        }
        return false;
    }
    bool up_done = c->up.eof && (c->up.shut || (!c->connected && !c->connecting));
    bool down_done = c->down.eof ? c->down.shut : (!c->connected && !c->connecting);
    if (up_done && down_done && pending(&c->down) == 0) {
        conn_close(c);
        return true;
    }
    return false;
}

/* ---- reading ------------------------------------------------------------------------ */

static void update_readers(pconn *c)
{
    spk_proxy *px = c->px;
    bool reply_blocked = c->replied && pending(&c->down) >= px->hw;
    bool want_c = !c->closing && !c->up.eof && pending(&c->up) < px->hw && !reply_blocked;
    bool want_s = c->connected && !c->closing && !c->down.eof && pending(&c->down) < px->hw;
    io_set(px->loop, &c->crd, want_c);
    io_set(px->loop, &c->srd, want_s);
}

static int start_connect(pconn *c);

/* Send what the chain let through on towards the destination of the side it came from
 * (connecting upstream first, lazily, when it is for the server). Returns 0 or -1 if the
 * connection is gone. */
static int forward(pconn *c, bool from_client, const uint8_t *out, size_t out_len)
{
    if (from_client) {
        if (send_to_server(c, out, out_len) != 0)
            return -1;
        if (!c->connected && !c->connecting && pending(&c->up) > 0)
            return start_connect(c);
        return 0;
    }
    return send_to_client(c, out, out_len);
}

/* Run the chain over one chunk read from the client (to_server == true) or the server,
 * and send the result on. Returns 0 or -1 if the connection is gone. */
static int process_chunk(pconn *c, bool from_client, uint8_t *data, size_t len)
{
    spk_proxy *px = c->px;
    const spk_chain *ch = px->chain;
    enum spk_hook_id h1 = from_client ? SPK_HOOK_FROM_CLIENT : SPK_HOOK_FROM_SERVER;
    enum spk_hook_id h2 = from_client ? SPK_HOOK_TO_SERVER : SPK_HOOK_TO_CLIENT;
    const uint8_t *out = data;
    size_t out_len = len;
    if (ch != NULL && (ch->n_traffic[h1] | ch->n_traffic[h2]) != 0) {
        spk_buf_view(&px->buf, data, len);
        spoke_verdict v = spk_chain_run(ch, h1, &c->sc, &px->buf);
        if (v <= SPOKE_MODIFIED)
            v = spk_chain_run(ch, h2, &c->sc, &px->buf);
        if (deliver_reply(c) != 0)
            return -1;
        if (v == SPOKE_CLOSE) {
            conn_begin_close(c);
            return -1;
        }
        if (v == SPOKE_RESPOND)
            return 0;
        out = px->buf.pub.data;
        out_len = px->buf.pub.len;
    }
    return forward(c, from_client, out, out_len);
}

/* The client (from_client) or the server half-closed: let the plugins hand on what they
 * held back (on_half_close), ahead of the FIN the caller passes on. Returns 0, or -1 if
 * the connection is gone or closing. */
static int half_close_chain(pconn *c, bool from_client)
{
    spk_proxy *px = c->px;
    if (px->chain == NULL || !px->chain->any_half_close)
        return 0;
    spk_buf_view(&px->buf, NULL, 0);
    spoke_verdict v = spk_chain_half_close(px->chain, &c->sc, from_client, &px->buf);
    if (deliver_reply(c) != 0)
        return -1;
    if (v == SPOKE_CLOSE) {
        conn_begin_close(c);
        return -1;
    }
    if (v == SPOKE_RESPOND)
        return 0;
    return forward(c, from_client, px->buf.pub.data, px->buf.pub.len);
}

static void on_read(pconn *c, bool from_client)
{
    spk_proxy *px = c->px;
    int fd = from_client ? c->cfd : c->sfd;
    ssize_t n;
    do
        n = recv(fd, px->rbuf, px->rcap, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        spk_debug("conn %llu: read from %s: %s", (unsigned long long)c->sc.id,
                  from_client ? "client" : "server", strerror(errno));
        conn_close(c);
        return;
    }
    if (n == 0) {
        half *h = from_client ? &c->up : &c->down;
        h->eof = true;
        if (half_close_chain(c, from_client) != 0)
            return;
        if (pending(h) == 0) {
            int dfd = from_client ? c->sfd : c->cfd;
            bool dst_ready = from_client ? c->connected : true;
            if (dst_ready && !h->shut) {
                shutdown(dfd, SHUT_WR);
                h->shut = true;
            }
        }
        update_readers(c);
        conn_maybe_done(c);
        return;
    }
    px->bytes[from_client] += (uint64_t)n;
    if (px->pub != NULL)
        atomic_store_explicit(from_client ? px->pub->bytes_from_client : px->pub->bytes_from_server,
                              px->bytes[from_client], memory_order_relaxed);
    if (process_chunk(c, from_client, px->rbuf, (size_t)n) == 0)
        update_readers(c);
}

static void on_client_read(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    on_read((pconn *)((char *)w - offsetof(pconn, crd)), true);
}

static void on_server_read(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    on_read((pconn *)((char *)w - offsetof(pconn, srd)), false);
}

static void on_client_write(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    pconn *c = (pconn *)((char *)w - offsetof(pconn, cwr));
    if (half_flush(c, &c->down, c->cfd, &c->cwr) != 0 || conn_maybe_done(c))
        return;
    update_readers(c);
}

static void connect_done(pconn *c, int err)
{
    spk_proxy *px = c->px;
    c->connecting = false;
    if (!c->closing) /* while closing, tmr is the linger timer */
        ev_timer_stop(px->loop, &c->tmr);
    if (err != 0) {
        log_upstream_failure(px, c, "unreachable", err);
        conn_close(c);
        return;
    }
    c->connected = true;
    /* The client may have finished sending while we connected. */
    if (half_flush(c, &c->up, c->sfd, &c->swr) != 0 || conn_maybe_done(c))
        return;
    update_readers(c);
}

static void on_server_write(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    pconn *c = (pconn *)((char *)w - offsetof(pconn, swr));
    if (c->connecting) {
        int err = 0;
        socklen_t len = sizeof(err);
        if (getsockopt(c->sfd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
            err = errno;
        ev_io_stop(loop, w);
        connect_done(c, err);
        return;
    }
    if (half_flush(c, &c->up, c->sfd, &c->swr) != 0 || conn_maybe_done(c))
        return;
    update_readers(c);
}

static void connect_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    pconn *c = (pconn *)((char *)w - offsetof(pconn, tmr));
    ev_io_stop(c->px->loop, &c->swr);
    connect_done(c, ETIMEDOUT);
}

static int start_connect(pconn *c)
{
    spk_proxy *px = c->px;
    int fd = spk_connect_start(&px->upstream);
    if (fd < 0) {
        if (is_exhaustion(-fd)) /* no descriptors: more clients could not be served either */
            starve(px, -fd, false, px->n_conns - 1);
        log_upstream_failure(px, c, "unreachable", -fd);
        conn_close(c);
        return -1;
    }
    c->sfd = fd;
    c->connecting = true;
    ev_io_init(&c->srd, on_server_read, fd, EV_READ);
    ev_io_init(&c->swr, on_server_write, fd, EV_WRITE);
    ev_io_start(px->loop, &c->swr);
    ev_timer_init(&c->tmr, connect_timeout, (double)px->cfg->connect_timeout_ms / 1000.0, 0);
    ev_timer_start(px->loop, &c->tmr);
    return 0;
}

/* ---- accepting ---------------------------------------------------------------------- */

static void conn_new(spk_proxy *px, int fd, const struct sockaddr *sa, socklen_t salen)
{
    pconn *c = calloc(1, sizeof(*c));
    char peer[64];
    spk_addr_format(sa, salen, peer, sizeof(peer));
    if (c == NULL ||
        (px->chain != NULL && spk_chain_conn_init(px->chain, &c->sc, ++px->next_id, peer) != 0)) {
        spk_error("out of memory accepting a connection from %s; closing it", peer);
        free(c);
        close(fd);
        return;
    }
    if (px->chain == NULL) {
        c->sc.id = ++px->next_id;
        snprintf(c->sc.peer, sizeof(c->sc.peer), "%s", peer);
    }
    if (sa->sa_family != AF_UNIX) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    if (px->pub != NULL)
        atomic_store_explicit(px->pub->accepted, px->next_id, memory_order_relaxed);
    c->px = px;
    c->cfd = fd;
    c->sfd = -1;
    ev_io_init(&c->crd, on_client_read, fd, EV_READ);
    ev_io_init(&c->cwr, on_client_write, fd, EV_WRITE);
    ev_init(&c->srd, on_server_read);
    ev_init(&c->swr, on_server_write);
    ev_init(&c->tmr, connect_timeout);
    c->next = px->conns;
    if (px->conns)
        px->conns->prev = c;
    px->conns = c;
    px->n_conns++;

    if (px->chain != NULL) {
        spoke_verdict v = spk_chain_open(px->chain, &c->sc);
        if (deliver_reply(c) != 0)
            return;
        if (v == SPOKE_CLOSE) {
            conn_begin_close(c);
            return;
        }
    }
    if (px->cfg->upstream_connect == SPK_CONNECT_EAGER && start_connect(c) != 0)
        return;
    resources_back(px);
    update_readers(c);
}

static void accept_pause(spk_proxy *px, double retry_s)
{
    if (!px->accepting)
        return; /* draining: not accepting anyway */
    px->accept_paused = true;
    for (size_t i = 0; i < px->n_listen; i++)
        ev_io_stop(px->loop, &px->lw[i]);
    if (retry_s > 0) {
        ev_timer_stop(px->loop, &px->accept_retry); /* it may still run: set needs it idle */
        ev_timer_set(&px->accept_retry, retry_s, 0);
        ev_timer_start(px->loop, &px->accept_retry);
    }
}

static void on_accept(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    spk_proxy *px = w->data;
    /* Accept only a few per wakeup: every worker's loop is woken for a new connection, and
     * a worker that accepted a whole burst would leave its siblings idle. Taking a few and
     * going back to the loop lets a less busy worker win the rest. */
    for (int i = 0; i < SPK_ACCEPT_BATCH; i++) {
        if (px->n_conns >= px->cfg->max_connections) {
            spk_warn("listen.max_connections (%zu) reached; not accepting until one closes",
                     px->cfg->max_connections);
            accept_pause(px, 0);
            return;
        }
        if (!may_accept(px))
            return;
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int fd = accept4(w->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (is_exhaustion(errno))
                starve(px, errno, true, px->n_conns);
            else if (errno == EAGAIN || errno == EWOULDBLOCK)
                px->starved = 0; /* the backlog is drained: no more probing */
            return; /* EAGAIN (another worker took it), or paused */
        }
        conn_new(px, fd, (struct sockaddr *)&ss, len);
        if (px->accept_paused)
            return; /* its upstream connect ran out of descriptors */
    }
}

static void on_accept_retry(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    spk_proxy *px = w->data;
    if (!px->accepting)
        return;
    if (!may_accept(px)) /* still short of descriptors: it paused again */
        return;
    px->accept_paused = false;
    for (size_t i = 0; i < px->n_listen; i++)
        ev_io_start(loop, &px->lw[i]);
}

/* ---- lifecycle ---------------------------------------------------------------------- */

int spk_proxy_new(struct ev_loop *loop, const spk_config *cfg, const int *fds, size_t n,
                  const spk_chain *chain, spk_proxy **out, spk_errbuf *eb)
{
    *out = NULL;
    spk_proxy *px = calloc(1, sizeof(*px));
    if (px == NULL)
        return spk_errf(eb, SPK_ENOMEM, "out of memory");
    int rc = spk_addr_parse(cfg->upstream, &px->upstream, eb);
    if (rc != 0) {
        free(px);
        return rc;
    }
    px->loop = loop;
    px->cfg = cfg;
    px->chain = chain;
    px->rcap = cfg->read_chunk;
    px->hw = cfg->high_watermark > 0 ? cfg->high_watermark : cfg->read_chunk;
    px->rbuf = malloc(px->rcap);
    px->lw = calloc(n ? n : 1, sizeof(*px->lw));
    if (px->rbuf == NULL || px->lw == NULL) {
        free(px->rbuf);
        free(px->lw);
        free(px);
        return spk_errf(eb, SPK_ENOMEM, "out of memory");
    }
    px->n_listen = n;
    px->upstream_log_at = -10;
    px->starved_log_at = -10;
    ev_timer_init(&px->accept_retry, on_accept_retry, SPK_ACCEPT_RETRY_S, 0);
    px->accept_retry.data = px;
    for (size_t i = 0; i < n; i++) {
        ev_io_init(&px->lw[i], on_accept, fds[i], EV_READ);
        px->lw[i].data = px;
    }
    *out = px;
    return 0;
}

void spk_proxy_start_accepting(spk_proxy *px)
{
    if (px->accepting)
        return;
    px->accepting = true;
    px->accept_paused = false;
    for (size_t i = 0; i < px->n_listen; i++)
        ev_io_start(px->loop, &px->lw[i]);
}

void spk_proxy_stop_accepting(spk_proxy *px)
{
    if (!px->accepting)
        return;
    px->accepting = false;
    ev_timer_stop(px->loop, &px->accept_retry);
    for (size_t i = 0; i < px->n_listen; i++)
        ev_io_stop(px->loop, &px->lw[i]);
}

size_t spk_proxy_active(const spk_proxy *px) { return px->n_conns; }

uint64_t spk_proxy_accepted(const spk_proxy *px) { return px->next_id; }

void spk_proxy_publish(spk_proxy *px, spk_proxy_counters *pub)
{
    px->pub = pub;
}


void spk_proxy_close_all(spk_proxy *px)
{
    spk_proxy_stop_accepting(px);
    while (px->conns != NULL)
        conn_close(px->conns);
}

void spk_proxy_free(spk_proxy *px)
{
    if (px == NULL)
        return;
    spk_proxy_close_all(px);
    spk_buf_free(&px->buf);
    free(px->rbuf);
    free(px->lw);
    free(px);
}
