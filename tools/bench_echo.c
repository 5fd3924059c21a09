/*
 * bench_echo.c -- `spoke-bench echo`: the upstream of the proxy benchmarks.
 *
 * One level-triggered epoll loop per thread, all sharing one non-blocking listening
 * socket (EPOLLEXCLUSIVE, so one thread wakes per new connection). Each connection owns a
 * 64 KiB buffer allocated at accept: read what is there, write it back; while the peer
 * does not take it all, stop reading that connection (backpressure, EPOLLOUT only) until
 * it has. Nothing is allocated per message. SIGTERM/SIGINT stop the loops within 200 ms.
 * `spoke-bench proxy --echo` runs the same server in a child (spk_bench_echo_serve).
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench.h"
#include "bench_net.h"

#define ECHO_BUF (64 * 1024)

typedef struct echo_conn {
    int fd;
    bool want_out;             /* waiting for EPOLLOUT to flush buf[off..off+len) */
    uint32_t off, len;
    struct echo_conn *prev, *next;
    uint8_t buf[ECHO_BUF];
} echo_conn;

typedef struct echo_thread {
    int lfd, ep;
    echo_conn *conns;          /* every open connection, for shutdown */
    uint64_t accepted, errors;
    pthread_t tid;
} echo_thread;

static char g_listen_tag; /* epoll data.ptr of the listening socket */

static void echo_close(echo_thread *t, echo_conn *c)
{
    close(c->fd);
    if (c->prev)
        c->prev->next = c->next;
    else
        t->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    free(c);
}

static int echo_interest(echo_thread *t, echo_conn *c, bool out)
{
    if (c->want_out == out)
        return 0;
    struct epoll_event ev = {.events = out ? EPOLLOUT : EPOLLIN, .data.ptr = c};
    if (epoll_ctl(t->ep, EPOLL_CTL_MOD, c->fd, &ev) != 0)
        return -1;
    c->want_out = out;
    return 0;
}

static void echo_accept(echo_thread *t)
{
    for (;;) {
        int fd = accept4(t->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                errno != ECONNABORTED) {
                fprintf(stderr, "spoke-bench: echo: accept: %s\n", strerror(errno));
                t->errors++;
            }
            return;
        }
        echo_conn *c = malloc(sizeof(*c));
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (c == NULL || epoll_ctl(t->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
            fprintf(stderr, "spoke-bench: echo: %s\n",
                    c == NULL ? "out of memory" : strerror(errno));
            free(c);
            close(fd);
            t->errors++;
            continue;
        }
        c->fd = fd;
        c->want_out = false;
        c->off = c->len = 0;
        c->prev = NULL;
        c->next = t->conns;
        if (t->conns)
            t->conns->prev = c;
        t->conns = c;
        t->accepted++;
    }
}

/* Read once (when nothing is pending), then write back until done or the socket is full. */
static void echo_io(echo_thread *t, echo_conn *c)
{
    if (c->len == 0) {
        ssize_t n = recv(c->fd, c->buf, ECHO_BUF, MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            if (n < 0 && errno != ECONNRESET)
                t->errors++;
            echo_close(t, c);
            return;
        }
        if (n < 0)
            return;
        c->off = 0;
        c->len = (uint32_t)n;
    }
    while (c->len > 0) {
        ssize_t w = send(c->fd, c->buf + c->off, c->len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (echo_interest(t, c, true) != 0)
                echo_close(t, c);
            return;
        }
        if (w < 0) {
            if (errno != ECONNRESET && errno != EPIPE)
                t->errors++;
            echo_close(t, c);
            return;
        }
        c->off += (uint32_t)w;
        c->len -= (uint32_t)w;
    }
    if (echo_interest(t, c, false) != 0)
        echo_close(t, c);
}

static void *echo_thread_main(void *arg)
{
    echo_thread *t = arg;
    struct epoll_event evs[256];
    while (!spk_bench_stop) {
        int n = epoll_wait(t->ep, evs, 256, 200);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "spoke-bench: echo: epoll_wait: %s\n", strerror(errno));
            t->errors++;
            break;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &g_listen_tag)
                echo_accept(t);
            else
                echo_io(t, evs[i].data.ptr);
        }
    }
    while (t->conns)
        echo_close(t, t->conns);
    return NULL;
}

static int echo_thread_init(echo_thread *t, int lfd)
{
    memset(t, 0, sizeof(*t));
    t->lfd = lfd;
    t->ep = epoll_create1(EPOLL_CLOEXEC);
    if (t->ep < 0) {
        fprintf(stderr, "spoke-bench: echo: epoll_create1: %s\n", strerror(errno));
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = &g_listen_tag};
    if (epoll_ctl(t->ep, EPOLL_CTL_ADD, lfd, &ev) != 0) {
        fprintf(stderr, "spoke-bench: echo: epoll_ctl: %s\n", strerror(errno));
        close(t->ep);
        return -1;
    }
    return 0;
}

int spk_bench_echo_serve(int lfd, unsigned threads)
{
    echo_thread *ts = calloc(threads, sizeof(*ts));
    if (ts == NULL) {
        fprintf(stderr, "spoke-bench: echo: out of memory\n");
        return 1;
    }
    unsigned ready = 0, started = 1;
    while (ready < threads && echo_thread_init(&ts[ready], lfd) == 0)
        ready++;
    int rc = ready == threads ? 0 : 1;
    for (; rc == 0 && started < threads; started++) {
        errno = pthread_create(&ts[started].tid, NULL, echo_thread_main, &ts[started]);
        if (errno != 0) {
            fprintf(stderr, "spoke-bench: echo: pthread_create: %s\n", strerror(errno));
            spk_bench_stop = 1;
            rc = 1;
            break;
        }
    }
    if (rc == 0)
        echo_thread_main(&ts[0]);
    for (unsigned i = 1; i < started; i++)
        pthread_join(ts[i].tid, NULL);
    for (unsigned i = 0; i < ready; i++)
        close(ts[i].ep);
    free(ts);
    return rc;
}

void spk_bench_echo_usage(FILE *f)
{
    fprintf(f, "  echo --listen ADDR [--threads 1]\n"
               "      echo server (epoll, one loop per thread); stops on SIGTERM/SIGINT.\n"
               "      Prints \"listening on ADDR\" once it accepts connections.\n");
}

int spk_bench_echo(int argc, char **argv)
{
    static const struct option opts[] = {
        {"listen", required_argument, NULL, 'l'},
        {"threads", required_argument, NULL, 'T'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *listen_text = NULL;
    uint64_t threads = 1;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "l:T:h", opts, NULL)) != -1) {
        switch (c) {
        case 'l': listen_text = optarg; break;
        case 'T':
            if (spk_bench_parse_uint(optarg, 1, 64, &threads) != 0) {
                fprintf(stderr, "spoke-bench: echo: --threads: expected 1..64, got '%s'\n",
                        optarg);
                return 1;
            }
            break;
        case 'h': spk_bench_echo_usage(stdout); return 0;
        default: spk_bench_echo_usage(stderr); return 1;
        }
    }
    if (listen_text == NULL || optind != argc) {
        fprintf(stderr, "spoke-bench: echo: --listen ADDR is required\n");
        spk_bench_echo_usage(stderr);
        return 1;
    }
    spk_addr addr;
    spk_errbuf eb;
    if (spk_addr_parse(listen_text, &addr, &eb) != 0) {
        fprintf(stderr, "spoke-bench: echo: %s\n", eb.msg);
        return 1;
    }
    spk_bench_raise_nofile();
    if (spk_bench_install_signals() != 0)
        return 1;
    int lfd = spk_listen(&addr, 4096, &eb);
    if (lfd < 0) {
        fprintf(stderr, "spoke-bench: echo: %s\n", eb.msg);
        return 1;
    }
    printf("spoke-bench echo: listening on %s (%u thread%s)\n", addr.text, (unsigned)threads,
           threads == 1 ? "" : "s");
    fflush(stdout);
    int rc = spk_bench_echo_serve(lfd, (unsigned)threads);
    close(lfd);
    spk_bench_unlink_if_unix(&addr);
    return rc;
}
