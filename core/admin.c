/*
 * admin.c -- the admin socket (run_dir/spoked.sock, run_dir/hubd.sock): commands from
 * `spoked status` and operators, answered on the supervisor's loop without ever waiting
 * on a client.
 *
 * Protocol: a client sends commands, one per line ("status"); each is answered in order,
 * and the connection stays open until the client closes its side (`spoked status` sends
 * "status\n", shuts down writing and reads to the end). A client that closes its side
 * without sending a command gets the status report, as before commands existed.
 *
 * Everything is non-blocking, so a client costs the loop nothing while it is slow: a
 * request arrives in pieces into the connection's request buffer, and a command runs only
 * once its line is complete; an answer is built whole into an output buffer and written
 * as the socket takes it, on EV_WRITE. While an answer is being written the connection's
 * further commands are not read (they wait in the socket), so a client that sends many
 * and reads none holds one answer's memory, not many. A connection that makes no
 * progress for ADMIN_IDLE_S is closed, and at most ADMIN_MAX_CONNS are open at once (a
 * new one past that closes the one idle longest, so stalled clients cannot lock others
 * out): an idle or stalled client costs a descriptor and this struct, for a bounded
 * time.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "supervisor_int.h"

#define ADMIN_MAX_CONNS 32
#define ADMIN_LINE_MAX 256   /* bytes of one command line, newline included */
#define ADMIN_IDLE_S 10.0    /* a connection that neither sends nor reads this long ends */
#define ADMIN_ACCEPT_BATCH 8 /* connections accepted per wakeup */
#define ADMIN_PAUSE_S 1.0    /* no accepting this long after EMFILE and the like */

struct admin_conn {
    sup *s;
    int fd;
    ev_io io;      /* EV_READ while no answer is pending, EV_WRITE while one is */
    ev_timer idle; /* ADMIN_IDLE_S without progress */
    ev_tstamp last; /* the last progress (ev_now) */
    char req[ADMIN_LINE_MAX];
    size_t req_len;
    char *out; /* the answer being written: out[off..len) is left; owned */
    size_t out_len, out_off;
    bool eof;      /* the client shut down its side */
    bool answered; /* at least one command was answered */
    bool closing;  /* close once the answer is written */
    admin_conn *prev, *next;
};

static void conn_close(admin_conn *c)
{
    sup *s = c->s;
    ev_io_stop(s->loop, &c->io);
    ev_timer_stop(s->loop, &c->idle);
    close(c->fd);
    free(c->out);
    if (c->prev)
        c->prev->next = c->next;
    else
        s->admin_conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->n_admin--;
    free(c);
}

static void progress(admin_conn *c)
{
    c->last = ev_now(c->s->loop);
    ev_timer_again(c->s->loop, &c->idle);
}

/* The answer to one command line (without its newline) into c->out. */
static void run_command(admin_conn *c, char *line)
{
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t'))
        line[--n] = '\0';
    while (*line == ' ' || *line == '\t')
        line++;
    c->answered = true;
    c->out_off = c->out_len = 0;
    free(c->out);
    c->out = NULL;
    if (strcmp(line, "status") == 0 || line[0] == '\0') {
        c->out = spk_sup_status_text(c->s, &c->out_len);
        if (c->out == NULL) {
            spk_error("admin socket: out of memory building the status report");
            c->closing = true;
        }
        return;
    }
    if (asprintf(&c->out, "unknown command '%.64s' (commands: status)\n", line) < 0) {
        c->out = NULL;
        c->closing = true;
        return;
    }
    c->out_len = strlen(c->out);
}

/* Write what is pending. Returns 0 when all of it went, 1 when the socket is full, -1
 * when the connection failed (the caller closes it). */
static int flush_out(admin_conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 1;
        if (n < 0)
            return -1;
        c->out_off += (size_t)n;
        progress(c);
    }
    free(c->out);
    c->out = NULL;
    c->out_off = c->out_len = 0;
    return 0;
}

static void watch(admin_conn *c, int events)
{
    if (ev_is_active(&c->io) && (c->io.events & (EV_READ | EV_WRITE)) == events)
        return;
    ev_io_stop(c->s->loop, &c->io);
    ev_io_set(&c->io, c->fd, events);
    ev_io_start(c->s->loop, &c->io);
}

/* Move the connection on as far as it goes without waiting: write the pending answer,
 * then run the next complete command, until the socket is full or a command is not
 * complete yet. May close (and free) c. */
static void step(admin_conn *c)
{
    for (;;) {
        int rc = flush_out(c);
        if (rc < 0) {
            conn_close(c);
            return;
        }
        if (rc > 0) {
            watch(c, EV_WRITE);
            return;
        }
        if (c->closing) {
            conn_close(c);
            return;
        }
        char *nl = memchr(c->req, '\n', c->req_len);
        if (nl != NULL) {
            *nl = '\0';
            size_t used = (size_t)(nl - c->req) + 1;
            run_command(c, c->req);
            memmove(c->req, c->req + used, c->req_len - used);
            c->req_len -= used;
            continue;
        }
        if (c->req_len == sizeof(c->req)) {
            c->req_len = 0;
            c->closing = true;
            c->out = strdup("command line too long\n");
            c->out_len = c->out ? strlen(c->out) : 0;
            continue;
        }
        if (c->eof) {
            c->closing = true;
            if (c->req_len > 0 || !c->answered) { /* a last line without its newline */
                c->req[c->req_len] = '\0';
                c->req_len = 0;
                run_command(c, c->req);
            }
            continue;
        }
        watch(c, EV_READ);
        return;
    }
}

static void on_conn(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    admin_conn *c = w->data;
    if ((revents & EV_READ) && c->out == NULL) {
        ssize_t n;
        do
            n = recv(c->fd, c->req + c->req_len, sizeof(c->req) - c->req_len, 0);
        while (n < 0 && errno == EINTR);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            conn_close(c);
            return;
        }
        if (n == 0)
            c->eof = true;
        if (n > 0) {
            c->req_len += (size_t)n;
            progress(c);
        }
    }
    step(c);
}

static void on_idle(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    admin_conn *c = w->data;
    spk_debug("admin socket: closing a connection idle for %.0f s", ADMIN_IDLE_S);
    conn_close(c);
}

static void conn_new(sup *s, int fd)
{
    if (s->n_admin >= ADMIN_MAX_CONNS) { /* make room: the one idle longest goes */
        admin_conn *oldest = s->admin_conns;
        for (admin_conn *o = s->admin_conns; o != NULL; o = o->next)
            if (o->last < oldest->last)
                oldest = o;
        spk_debug("admin socket: %d connections open; closing the one idle longest",
                  ADMIN_MAX_CONNS);
        conn_close(oldest);
    }
    admin_conn *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        spk_error("admin socket: out of memory accepting a connection");
        close(fd);
        return;
    }
    c->s = s;
    c->fd = fd;
    ev_io_init(&c->io, on_conn, fd, EV_READ);
    c->io.data = c;
    ev_init(&c->idle, on_idle);
    c->idle.repeat = ADMIN_IDLE_S;
    c->idle.data = c;
    progress(c);
    ev_io_start(s->loop, &c->io);
    c->next = s->admin_conns;
    if (c->next)
        c->next->prev = c;
    s->admin_conns = c;
    s->n_admin++;
}

static void on_accept(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    sup *s = w->data;
    for (int i = 0; i < ADMIN_ACCEPT_BATCH; i++) {
        int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* The socket stays readable: pause, or the loop would spin on it. */
                spk_warn("admin socket: accept: %s; not accepting for %.0f s%s",
                         strerror(errno), ADMIN_PAUSE_S,
                         errno == EMFILE || errno == ENFILE ? " (too many open files)" : "");
                ev_io_stop(s->loop, w);
                ev_timer_set(&s->admin_retry, ADMIN_PAUSE_S, 0);
                ev_timer_start(s->loop, &s->admin_retry);
            } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
                spk_warn("admin socket: accept: %s", strerror(errno));
            }
            return;
        }
        conn_new(s, fd);
    }
}

static void on_retry(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)revents;
    sup *s = t->data;
    ev_io_start(loop, &s->admin_w);
}

void spk_sup_admin_start(sup *s)
{
    ev_io_init(&s->admin_w, on_accept, s->admin_fd, EV_READ);
    s->admin_w.data = s;
    ev_io_start(s->loop, &s->admin_w);
    ev_timer_init(&s->admin_retry, on_retry, ADMIN_PAUSE_S, 0);
    s->admin_retry.data = s;
}

void spk_sup_admin_stop(sup *s)
{
    ev_io_stop(s->loop, &s->admin_w);
    ev_timer_stop(s->loop, &s->admin_retry);
    while (s->admin_conns != NULL)
        conn_close(s->admin_conns);
}
