/*
 * bench_proxy.c -- `spoke-bench proxy`: round-trip load against an address (a spoked, or
 * anything that echoes). The echo server is bench_echo.c, the histogram bench_hist.c.
 *
 * N connections spread over T threads (default 1), each thread a level-triggered epoll
 * loop. A connection keeps `pipeline` requests of `size` bytes in flight: it writes
 * them, and every time `size` more bytes have come back one request is complete and the
 * next one is written. Request k starts when its first byte is written; its latency ends
 * when its last byte is read; both instants come from CLOCK_MONOTONIC (one clock read per
 * read and per write batch, ~25 ns against round trips of tens of µs).
 *
 * Correctness: the byte at offset o of connection c's stream is pat[(seed_c + o) % P]
 * where pat is pseudo-random and P a prime larger than any request. The echo must return
 * exactly that, so bytes that are lost, duplicated, reordered or crossed with another
 * connection's fail the comparison (one memcmp per read). Every failure is counted by
 * kind (connect, reset, eof = short read, mismatch, stalled = no answer for 1 s at the
 * end) and the first of each kind is printed; a failed connection reconnects after 50 ms
 * so the load stays at N.
 *
 * Latencies go into a histogram (bench_hist.h) per thread, merged at the end. The first
 * `warmup` seconds (connection set-up included) are not counted.
 *
 * Open loop (--rate R): the offered load is fixed instead of the number in flight. Each
 * connection's request k is due at its connect time + offset + k * conns / R (the
 * connections' schedules staggered); it is written when due (and fewer than `pipeline`
 * are in flight), and its latency is counted from when it was DUE, not when it could be
 * written, so a proxy that falls behind shows its queueing (no coordinated omission). A
 * timerfd in each thread's epoll set wakes it at the next due instant.
 *
 * Without --target or --echo, `spoke-bench proxy` runs the whole proxy suite instead
 * (bench_proxy_suite.c): it starts the echo upstream, HAProxy and spoked itself.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "bench_hist.h"
#include "bench_net.h"
#include "bench_proxy.h"

/* ---- load generator ----------------------------------------------------------------- */

#define PAT_PERIOD 65521u        /* prime; the pattern repeats every PAT_PERIOD bytes */
#define RBUF_SIZE (256 * 1024)   /* per-thread receive buffer */
#define RETRY_NS (50 * NS_PER_MS)
#define STALL_NS NS_PER_S


enum lg_state { LG_IDLE, LG_CONNECTING, LG_RUNNING };


static const char *const lg_err_names[E_COUNT] = {"connect", "reset", "eof", "mismatch",
                                                  "stalled"};

typedef struct lg_conn {
    int fd;
    enum lg_state state;
    bool want_out;
    uint32_t idx;            /* connection number, 0..conns-1, for messages */
    uint32_t seed;           /* offset of this connection's stream into the pattern */
    uint64_t sent, recvd;    /* stream offsets, since the current connect */
    uint64_t retry_at;       /* LG_IDLE: when to connect again */
    uint64_t connect_at;     /* LG_CONNECTING: when connect() was called */
    uint64_t first_due;      /* open loop: when request 0 of this connection is due */
    uint64_t last_write;     /* when bytes were last written (the open loop's stall check) */
    uint64_t *starts;        /* start time of request k at starts[k % pipeline] */
} lg_conn;

typedef struct lg_thread {
    const lg_opts *o;
    const uint8_t *pat;
    lg_conn *conns;
    unsigned n;
    int ep;
    int tfd;                 /* open loop: timerfd for the next due request, or -1 */
    uint64_t interval_ns;    /* open loop: between two requests of one connection */
    uint64_t armed_at;       /* open loop: the instant tfd is set to (0: not armed) */
    uint64_t t_measure, t_end, t_stopped;
    uint8_t *rbuf;
    spk_bench_hist h;        /* latencies of requests completed in the window */
    uint64_t bytes_out, bytes_in; /* in the window */
    uint64_t requests_all;   /* completed, warmup included (for CPU cost per request) */
    uint64_t errors[E_COUNT];
    pthread_t tid;
} lg_thread;

static atomic_int g_err_printed[E_COUNT];

/* Count an error of `kind` and print the first one of each kind. */
static void lg_note_error(lg_thread *t, enum lg_err kind, const char *fmt, const char *a,
                          const char *b)
{
    t->errors[kind]++;
    if (atomic_exchange(&g_err_printed[kind], 1) == 0) {
        fprintf(stderr, "spoke-bench: ");
        fprintf(stderr, fmt, a, b);
        fprintf(stderr, " (first %s error; all are counted)\n", lg_err_names[kind]);
    }
}

static void lg_drop(lg_conn *c, uint64_t now)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->state = LG_IDLE;
    c->want_out = false;
    c->retry_at = now + RETRY_NS;
}

static void lg_fail(lg_thread *t, lg_conn *c, enum lg_err kind, int err, uint64_t now)
{
    lg_note_error(t, kind, kind == E_CONNECT ? "connect %s: %s" : "%s: %s",
                  t->o->target.text, strerror(err));
    lg_drop(c, now);
}

static int lg_interest(lg_thread *t, lg_conn *c, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    return epoll_ctl(t->ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void lg_connect(lg_thread *t, lg_conn *c, uint64_t now)
{
    int fd = spk_connect_start(&t->o->target);
    if (fd < 0) {
        c->fd = -1;
        lg_fail(t, c, E_CONNECT, -fd, now);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(t->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
        int e = errno;
        c->fd = fd;
        lg_fail(t, c, E_CONNECT, e, now);
        return;
    }
    c->fd = fd;
    c->connect_at = now;
    c->state = LG_CONNECTING;
    c->want_out = true;
    c->sent = c->recvd = 0;
}

static inline bool in_window(const lg_thread *t, uint64_t now)
{
    return now >= t->t_measure;
}

/* Open loop: have the timer fire at `at` (or earlier, if it already will). */
static void lg_arm(lg_thread *t, uint64_t at)
{
    if (t->tfd < 0 || (t->armed_at != 0 && t->armed_at <= at))
        return;
    struct itimerspec its = {.it_value = {.tv_sec = (time_t)(at / NS_PER_S),
                                          .tv_nsec = (long)(at % NS_PER_S)}};
    if (timerfd_settime(t->tfd, TFD_TIMER_ABSTIME, &its, NULL) == 0)
        t->armed_at = at;
}

/* Write until `pipeline` requests are in flight or the socket is full; in the open loop,
 * also only the requests that are due, and arm the timer for the next one. */
static void lg_send(lg_thread *t, lg_conn *c, uint64_t now)
{
    const uint64_t size = t->o->size, depth = t->o->pipeline;
    uint64_t want = (c->recvd / size + depth) * size;
    if (t->interval_ns != 0) {
        uint64_t due = now < c->first_due ? 0 : (now - c->first_due) / t->interval_ns + 1;
        if (due * size < want) {
            want = due * size;
            lg_arm(t, c->first_due + due * t->interval_ns);
        }
    }
    while (c->sent < want) {
        const uint8_t *p = t->pat + (c->seed + c->sent) % PAT_PERIOD;
        ssize_t n = send(c->fd, p, want - c->sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->want_out && lg_interest(t, c, EPOLLIN | EPOLLOUT) != 0) {
                lg_fail(t, c, E_RESET, errno, now);
                return;
            }
            c->want_out = true;
            return;
        }
        if (n < 0) {
            lg_fail(t, c, E_RESET, errno, now);
            return;
        }
        /* Requests whose first byte went out now start now. */
        for (uint64_t k = (c->sent + size - 1) / size; k * size < c->sent + (uint64_t)n; k++)
            c->starts[k % depth] = t->interval_ns ? c->first_due + k * t->interval_ns : now;
        c->sent += (uint64_t)n;
        c->last_write = now;
        if (in_window(t, now))
            t->bytes_out += (uint64_t)n;
    }
    if (c->want_out) {
        if (lg_interest(t, c, EPOLLIN) != 0) {
            lg_fail(t, c, E_RESET, errno, now);
            return;
        }
        c->want_out = false;
    }
}

static void lg_connected(lg_thread *t, lg_conn *c)
{
    uint64_t now = spk_bench_now_ns();
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
        err = errno;
    if (err != 0) {
        lg_fail(t, c, E_CONNECT, err, now);
        return;
    }
    /* Read while writing from now on: with requests larger than the socket buffers, the
     * echo only takes more once we take its answer back. */
    if (lg_interest(t, c, EPOLLIN) != 0) {
        lg_fail(t, c, E_CONNECT, errno, now);
        return;
    }
    c->want_out = false;
    c->state = LG_RUNNING;
    /* Open loop: this connection's schedule starts now, staggered among the others. */
    c->first_due = now + t->interval_ns * c->idx / t->o->conns;
    lg_send(t, c, now);
}

static void lg_mismatch(lg_thread *t, lg_conn *c, const char *what, uint64_t now)
{
    char where[96];
    snprintf(where, sizeof(where), "%s (connection %u, stream offset %llu)", what,
             (unsigned)c->idx, (unsigned long long)c->recvd);
    lg_note_error(t, E_MISMATCH, "%s: %s", t->o->target.text, where);
    lg_drop(c, now);
}

/* Read once, check the bytes, complete the requests they finish, send the next ones. */
static void lg_recv(lg_thread *t, lg_conn *c)
{
    ssize_t n = recv(c->fd, t->rbuf, RBUF_SIZE, MSG_DONTWAIT);
    uint64_t now = spk_bench_now_ns();
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            lg_fail(t, c, E_RESET, errno, now);
        return;
    }
    if (n == 0) {
        char left[64];
        snprintf(left, sizeof(left), "%llu bytes", (unsigned long long)(c->sent - c->recvd));
        lg_note_error(t, E_EOF, "%s: connection closed by the peer with %s outstanding",
                      t->o->target.text, left);
        lg_drop(c, now);
        return;
    }
    if ((uint64_t)n > c->sent - c->recvd) {
        lg_mismatch(t, c, "received more bytes than were sent", now);
        return;
    }
    if (memcmp(t->rbuf, t->pat + (c->seed + c->recvd) % PAT_PERIOD, (size_t)n) != 0) {
        lg_mismatch(t, c, "echoed bytes differ from the bytes sent", now);
        return;
    }
    const uint64_t size = t->o->size, depth = t->o->pipeline;
    uint64_t done = c->recvd / size;
    c->recvd += (uint64_t)n;
    uint64_t now_done = c->recvd / size;
    if (in_window(t, now)) {
        t->bytes_in += (uint64_t)n;
        for (uint64_t k = done; k < now_done; k++)
            spk_bench_hist_record(&t->h, now - c->starts[k % depth]);
    }
    t->requests_all += now_done - done;
    if (now_done > done)
        lg_send(t, c, now);
}

static void lg_event(lg_thread *t, lg_conn *c, uint32_t events)
{
    if (c->state == LG_CONNECTING) {
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
            lg_connected(t, c);
        return;
    }
    if (c->state != LG_RUNNING)
        return;
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP))
        lg_recv(t, c);
    if (c->state == LG_RUNNING && (events & EPOLLOUT))
        lg_send(t, c, spk_bench_now_ns());
}

/* At the end: a connection still waiting for an answer after STALL_NS is an error. */
static void lg_finish(lg_thread *t, uint64_t now)
{
    for (unsigned i = 0; i < t->n; i++) {
        lg_conn *c = &t->conns[i];
        if (c->state == LG_CONNECTING && now - c->connect_at > STALL_NS)
            lg_note_error(t, E_STALLED, "connect %s: %s", t->o->target.text,
                          "still not connected at the end of the run");
        if (c->state == LG_RUNNING && c->sent > c->recvd) {
            /* Open loop: a request is due before it is written; a proxy that falls behind
             * is slow, not stalled, so the stall counts from the last write. */
            uint64_t started = t->interval_ns ? c->last_write
                                              : c->starts[(c->recvd / t->o->size) % t->o->pipeline];
            if (now - started > STALL_NS)
                lg_note_error(t, E_STALLED, "%s: %s", t->o->target.text,
                              "a request got no complete answer within 1 s");
        }
        if (c->fd >= 0)
            close(c->fd);
        c->fd = -1;
    }
}

static void *lg_thread_main(void *arg)
{
    lg_thread *t = arg;
    uint64_t now = spk_bench_now_ns();
    for (unsigned i = 0; i < t->n; i++)
        lg_connect(t, &t->conns[i], now);
    uint64_t next_sweep = now + 10 * NS_PER_MS;
    struct epoll_event evs[256];
    while (!spk_bench_stop) {
        now = spk_bench_now_ns();
        if (now >= t->t_end)
            break;
        if (now >= next_sweep) {
            for (unsigned i = 0; i < t->n; i++)
                if (t->conns[i].state == LG_IDLE && t->conns[i].retry_at <= now)
                    lg_connect(t, &t->conns[i], now);
            next_sweep = now + 10 * NS_PER_MS;
        }
        uint64_t left_ms = (t->t_end - now) / NS_PER_MS + 1;
        int n = epoll_wait(t->ep, evs, 256, left_ms < 10 ? (int)left_ms : 10);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "spoke-bench: epoll_wait: %s\n", strerror(errno));
            break;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr != NULL) {
                lg_event(t, evs[i].data.ptr, evs[i].events);
                continue;
            }
            /* The open loop's timer: send what is due on every connection. */
            uint64_t ticks;
            ssize_t r = read(t->tfd, &ticks, sizeof(ticks));
            (void)r;
            t->armed_at = 0;
            now = spk_bench_now_ns();
            for (unsigned j = 0; j < t->n; j++)
                if (t->conns[j].state == LG_RUNNING)
                    lg_send(t, &t->conns[j], now);
        }
    }
    t->t_stopped = spk_bench_now_ns();
    lg_finish(t, t->t_stopped);
    return NULL;
}

/* Fill one period from a fixed xorshift seed (the same bytes every run), then repeat it
 * to the end, so pat[i] == pat[i % PAT_PERIOD] and any window of the stream is one
 * contiguous slice. */
static void fill_pattern(uint8_t *pat, size_t len)
{
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < len; i++) {
        if (i >= PAT_PERIOD) {
            pat[i] = pat[i - PAT_PERIOD];
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pat[i] = (uint8_t)(x >> 24);
    }
}

static void lg_threads_free(lg_thread *ts, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        for (unsigned j = 0; j < ts[i].n; j++)
            free(ts[i].conns[j].starts);
        free(ts[i].conns);
        free(ts[i].rbuf);
        if (ts[i].ep >= 0)
            close(ts[i].ep);
        if (ts[i].tfd >= 0)
            close(ts[i].tfd);
    }
    free(ts);
}

/* Allocate thread t's share of the connections (every threads-th, from `first`). */
static int lg_thread_init(lg_thread *t, const lg_opts *o, const uint8_t *pat, unsigned first)
{
    t->o = o;
    t->pat = pat;
    t->ep = epoll_create1(EPOLL_CLOEXEC);
    if (t->ep < 0) {
        fprintf(stderr, "spoke-bench: epoll_create1: %s\n", strerror(errno));
        return -1;
    }
    if (o->rate > 0) {
        t->interval_ns = (uint64_t)((double)o->conns * 1e9 / o->rate);
        if (t->interval_ns == 0)
            t->interval_ns = 1;
        t->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
        if (t->tfd < 0 || epoll_ctl(t->ep, EPOLL_CTL_ADD, t->tfd, &ev) != 0) {
            fprintf(stderr, "spoke-bench: timerfd: %s\n", strerror(errno));
            return -1;
        }
    }
    t->n = (o->conns - first + o->threads - 1) / o->threads;
    t->conns = calloc(t->n, sizeof(lg_conn));
    t->rbuf = malloc(RBUF_SIZE);
    if (t->conns == NULL || t->rbuf == NULL)
        goto nomem;
    for (unsigned j = 0; j < t->n; j++) {
        lg_conn *c = &t->conns[j];
        c->fd = -1;
        c->idx = first + j * o->threads;
        c->seed = (uint32_t)(((uint64_t)c->idx * 7919u) % PAT_PERIOD);
        c->starts = calloc(o->pipeline, sizeof(uint64_t));
        if (c->starts == NULL)
            goto nomem;
    }
    return 0;
nomem:
    fprintf(stderr, "spoke-bench: out of memory\n");
    return -1;
}


/* User + system CPU time of this process so far, in µs. */
static double process_cpu_us(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

int spk_bench_lg_run(const lg_opts *o, lg_result *r)
{
    size_t pat_len = PAT_PERIOD + (size_t)(o->size * o->pipeline > RBUF_SIZE
                                                ? o->size * o->pipeline
                                                : RBUF_SIZE);
    uint8_t *pat = malloc(pat_len);
    lg_thread *ts = calloc(o->threads, sizeof(*ts));
    if (pat == NULL || ts == NULL) {
        fprintf(stderr, "spoke-bench: out of memory\n");
        free(pat);
        free(ts);
        return -1;
    }
    fill_pattern(pat, pat_len);
    for (unsigned i = 0; i < o->threads; i++)
        ts[i].ep = ts[i].tfd = -1;
    int rc = 0;
    for (unsigned i = 0; i < o->threads && rc == 0; i++)
        rc = lg_thread_init(&ts[i], o, pat, i);
    if (rc != 0)
        goto out;

    uint64_t t0 = spk_bench_now_ns();
    uint64_t t_measure = t0 + (uint64_t)(o->warmup_s * 1e9);
    uint64_t t_end = t_measure + (uint64_t)(o->duration_s * 1e9);
    unsigned started = 0;
    const double cpu0 = process_cpu_us();
    for (unsigned i = 0; i < o->threads; i++) {
        ts[i].t_measure = t_measure;
        ts[i].t_end = t_end;
    }
    for (started = 1; started < o->threads; started++) {
        if ((errno = pthread_create(&ts[started].tid, NULL, lg_thread_main, &ts[started])) != 0) {
            fprintf(stderr, "spoke-bench: pthread_create: %s\n", strerror(errno));
            spk_bench_stop = 1;
            rc = -1;
            break;
        }
    }
    lg_thread_main(&ts[0]);
    for (unsigned i = 1; i < started; i++)
        pthread_join(ts[i].tid, NULL);
    const double cpu_used = process_cpu_us() - cpu0;

    memset(r, 0, sizeof(*r));
    uint64_t t_last = t_measure;
    for (unsigned i = 0; i < started; i++) {
        spk_bench_hist_merge(&r->h, &ts[i].h);
        r->bytes_out += ts[i].bytes_out;
        r->bytes_in += ts[i].bytes_in;
        r->requests_all += ts[i].requests_all;
        for (int k = 0; k < E_COUNT; k++) {
            r->errors[k] += ts[i].errors[k];
            r->errors_total += ts[i].errors[k];
        }
        if (ts[i].t_stopped > t_last)
            t_last = ts[i].t_stopped < t_end ? ts[i].t_stopped : t_end;
    }
    r->seconds = (double)(t_last - t_measure) / 1e9;
    r->cpu_us_per_req = r->requests_all ? cpu_used / (double)r->requests_all : 0;
out:
    lg_threads_free(ts, o->threads);
    free(pat);
    return rc;
}

/* ---- report ------------------------------------------------------------------------- */

static void report(const lg_opts *o, const lg_result *r)
{
    const double secs = r->seconds > 0 ? r->seconds : 1e-9;
    const double rps = (double)r->h.total / secs;
    const double mib_out = (double)r->bytes_out / secs / 1048576.0;
    const double mib_in = (double)r->bytes_in / secs / 1048576.0;
    const double us[5] = {
        (double)spk_bench_hist_quantile(&r->h, 0.50) / 1e3,
        (double)spk_bench_hist_quantile(&r->h, 0.99) / 1e3,
        (double)spk_bench_hist_quantile(&r->h, 0.999) / 1e3, (double)r->h.max / 1e3,
        r->h.total ? (double)r->h.sum / (double)r->h.total / 1e3 : 0};
    if (o->json) {
        printf("{\"target\":");
        spk_bench_json_string(stdout, o->target.text);
        printf(",\"rate\":%.0f", o->rate);
        printf(",\"conns\":%u,\"size\":%llu,\"pipeline\":%u,\"threads\":%u,"
               "\"duration_s\":%.3f,\"warmup_s\":%.3f,\"requests\":%llu,"
               "\"requests_all\":%llu,\"errors\":%llu",
               o->conns, (unsigned long long)o->size, o->pipeline, o->threads, secs,
               o->warmup_s, (unsigned long long)r->h.total,
               (unsigned long long)r->requests_all, (unsigned long long)r->errors_total);
        for (int k = 0; k < E_COUNT; k++)
            printf(",\"errors_%s\":%llu", lg_err_names[k], (unsigned long long)r->errors[k]);
        printf(",\"rps\":%.1f,\"mib_s_out\":%.3f,\"mib_s_in\":%.3f,\"p50_us\":%.2f,"
               "\"p99_us\":%.2f,\"p999_us\":%.2f,\"max_us\":%.2f,\"mean_us\":%.2f,"
               "\"client_cpu_us_per_req\":%.3f}\n",
               rps, mib_out, mib_in, us[0], us[1], us[2], us[3], us[4], r->cpu_us_per_req);
        return;
    }
    printf("spoke-bench proxy: %s, %u connections, %llu-byte requests, pipeline %u, "
           "%u thread%s, %.1f s measured after %.1f s warmup\n",
           o->target.text, o->conns, (unsigned long long)o->size, o->pipeline, o->threads,
           o->threads == 1 ? "" : "s", secs, o->warmup_s);
    printf("  requests    %llu\n", (unsigned long long)r->h.total);
    printf("  errors      %llu (", (unsigned long long)r->errors_total);
    for (int k = 0; k < E_COUNT; k++)
        printf("%s%s %llu", k ? ", " : "", lg_err_names[k], (unsigned long long)r->errors[k]);
    printf(")\n");
    printf("  throughput  %.0f req/s, %.2f MiB/s sent, %.2f MiB/s received\n", rps, mib_out,
           mib_in);
    printf("  latency µs  p50 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  (mean %.1f)\n", us[0],
           us[1], us[2], us[3], us[4]);
    printf("  client CPU  %.2f µs per request (warmup included)\n", r->cpu_us_per_req);
}

/* ---- the echo child of --echo ------------------------------------------------------- */

/* Bind the echo address here, so it listens before fork returns, then serve it in a
 * child that dies with us. Returns the child's pid, or -1. */
pid_t spk_bench_echo_start(const char *text, spk_addr *addr)
{
    spk_errbuf eb;
    if (spk_addr_parse(text, addr, &eb) != 0) {
        fprintf(stderr, "spoke-bench: --echo: %s\n", eb.msg);
        return -1;
    }
    int lfd = spk_listen(addr, 4096, &eb);
    if (lfd < 0) {
        fprintf(stderr, "spoke-bench: --echo: %s\n", eb.msg);
        return -1;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "spoke-bench: fork: %s\n", strerror(errno));
        close(lfd);
        return -1;
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() == 1)
            _exit(0);
        int rc = spk_bench_echo_serve(lfd, 1);
        close(lfd);
        _exit(rc);
    }
    close(lfd);
    return pid;
}

void spk_bench_echo_stop(pid_t pid, const spk_addr *addr)
{
    kill(pid, SIGTERM);
    for (int i = 0; i < 200; i++) { /* 2 s, then SIGKILL */
        pid_t w = waitpid(pid, NULL, WNOHANG);
        if (w == pid || (w < 0 && errno != EINTR))
            break;
        if (i == 199) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
        }
        usleep(10000);
    }
    spk_bench_unlink_if_unix(addr);
}

/* ---- proxy subcommand --------------------------------------------------------------- */

void spk_bench_proxy_usage(FILE *f)
{
    fprintf(f, "  proxy --target ADDR [--echo ADDR] [--conns 64] [--size 128] [--duration 10s]\n"
               "        [--warmup 1s] [--pipeline 1] [--threads 1] [--rate R] [--json]\n"
               "      request/response round trips on N connections against ADDR: send SIZE\n"
               "      bytes, wait for SIZE bytes back (checked), repeat. --echo ADDR first\n"
               "      starts an echo upstream at ADDR (killed at the end); without --target,\n"
               "      the load goes straight to it. Prints requests, errors, req/s, MiB/s\n"
               "      each way and p50/p99/p99.9/max latency; --json prints one object.\n"
               "      --rate R: open loop, R requests/s offered in all, latency counted from\n"
               "      when each request was due.\n"
               "  proxy [--sizes 128,16384] [--conns 64] [--duration 5s] [--warmup 1s] [--rounds 1]\n"
               "        [--rates 10,30,50,70,90] [--rate-duration 3s] [--bin-dir DIR] [--json FILE]\n"
               "        [--plot PREFIX]\n"
               "      the suite: starts an echo upstream, HAProxy (nbthread 1) and spoked with 1\n"
               "      worker and 0, 1, 4 passthrough plugins; interleaved rounds of closed-loop\n"
               "      throughput per size (ratios against HAProxy), then open-loop latency at\n"
               "      offered loads (--rates: percent of HAProxy's closed-loop req/s at the first\n"
               "      size, or --rates-abs R1,R2,..), a markdown table each, and with --plot a\n"
               "      gnuplot plot of latency against offered load (PREFIX.png, PREFIX.svg).\n");
}

static int bad_option(const char *opt, const char *want, const char *got)
{
    fprintf(stderr, "spoke-bench: proxy: %s: expected %s, got '%s'\n", opt, want, got);
    return 1;
}

static int parse_proxy_opts(int argc, char **argv, lg_opts *o, const char **target_text)
{
    static const struct option opts[] = {
        {"target", required_argument, NULL, 't'},  {"echo", required_argument, NULL, 'e'},
        {"conns", required_argument, NULL, 'c'},   {"size", required_argument, NULL, 's'},
        {"duration", required_argument, NULL, 'd'}, {"warmup", required_argument, NULL, 'w'},
        {"pipeline", required_argument, NULL, 'p'}, {"threads", required_argument, NULL, 'T'},
        {"json", no_argument, NULL, 'j'},          {"help", no_argument, NULL, 'h'},
        {"rate", required_argument, NULL, 'r'},    {NULL, 0, NULL, 0},
    };
    uint64_t v;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "t:e:c:s:d:w:p:T:jhr:", opts, NULL)) != -1) {
        switch (c) {
        case 't': *target_text = optarg; break;
        case 'e': o->echo_text = optarg; break;
        case 'c':
            if (spk_bench_parse_uint(optarg, 1, 1000000, &v) != 0)
                return bad_option("--conns", "1..1000000", optarg);
            o->conns = (unsigned)v;
            break;
        case 's':
            if (spk_bench_parse_uint(optarg, 1, 64ull << 20, &v) != 0)
                return bad_option("--size", "1 byte..64MiB", optarg);
            o->size = v;
            break;
        case 'd':
            if (spk_bench_parse_duration(optarg, 0, &o->duration_s) != 0)
                return bad_option("--duration", "a duration such as 10s", optarg);
            break;
        case 'w':
            if (spk_bench_parse_duration(optarg, 1, &o->warmup_s) != 0)
                return bad_option("--warmup", "a duration such as 1s or 0", optarg);
            break;
        case 'p':
            if (spk_bench_parse_uint(optarg, 1, 1024, &v) != 0)
                return bad_option("--pipeline", "1..1024", optarg);
            o->pipeline = (unsigned)v;
            break;
        case 'T':
            if (spk_bench_parse_uint(optarg, 1, 64, &v) != 0)
                return bad_option("--threads", "1..64", optarg);
            o->threads = (unsigned)v;
            break;
        case 'r':
            if (spk_bench_parse_uint(optarg, 1, 100000000, &v) != 0)
                return bad_option("--rate", "requests per second, 1..100000000", optarg);
            o->rate = (double)v;
            break;
        case 'j': o->json = true; break;
        case 'h': spk_bench_proxy_usage(stdout); return -1;
        default: spk_bench_proxy_usage(stderr); return 1;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "spoke-bench: proxy: unexpected argument '%s'\n", argv[optind]);
        return 1;
    }
    if (*target_text == NULL)
        *target_text = o->echo_text;
    if (*target_text == NULL) {
        fprintf(stderr, "spoke-bench: proxy: --target ADDR (or --echo ADDR) is required\n");
        spk_bench_proxy_usage(stderr);
        return 1;
    }
    if (o->size * o->pipeline > (256ull << 20))
        return bad_option("--size x --pipeline", "at most 256MiB in flight", "more");
    if (o->threads > o->conns)
        o->threads = o->conns;
    return 0;
}

int spk_bench_proxy(int argc, char **argv)
{
    bool single = false;
    for (int i = 1; i < argc; i++)
        if (strncmp(argv[i], "--target", 8) == 0 || strncmp(argv[i], "--echo", 6) == 0 ||
            strcmp(argv[i], "-t") == 0 || strcmp(argv[i], "-e") == 0 ||
            strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            single = true;
    if (!single)
        return spk_bench_proxy_suite(argc, argv);
    lg_opts o = {.conns = 64, .threads = 1, .pipeline = 1, .size = 128, .duration_s = 10,
                 .warmup_s = 1};
    const char *target_text = NULL;
    int rc = parse_proxy_opts(argc, argv, &o, &target_text);
    if (rc != 0)
        return rc < 0 ? 0 : rc;
    spk_errbuf eb;
    if (spk_addr_parse(target_text, &o.target, &eb) != 0) {
        fprintf(stderr, "spoke-bench: proxy: --target: %s\n", eb.msg);
        return 1;
    }
    spk_bench_raise_nofile();
    if (spk_bench_install_signals() != 0)
        return 1;
    spk_addr echo_addr;
    pid_t echo_pid = -1;
    if (o.echo_text != NULL && (echo_pid = spk_bench_echo_start(o.echo_text, &echo_addr)) < 0)
        return 1;
    lg_result *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        fprintf(stderr, "spoke-bench: out of memory\n");
        rc = 1;
    } else if (spk_bench_lg_run(&o, r) != 0) {
        rc = 1;
    } else {
        report(&o, r);
        fflush(stdout);
        if (r->errors_total > 0 || r->h.total == 0) {
            if (r->h.total == 0)
                fprintf(stderr, "spoke-bench: proxy: no request completed\n");
            rc = 2;
        }
    }
    free(r);
    if (echo_pid > 0)
        spk_bench_echo_stop(echo_pid, &echo_addr);
    return rc;
}
