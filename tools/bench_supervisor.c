/*
 * bench_supervisor.c -- what the supervisor costs when things change:
 *
 *   spoke-bench reload   N connections stream round trips through spoked while it is
 *                        reloaded R times (SIGHUP). Per reload: the time from SIGHUP until
 *                        the new generation serves, the worst round-trip latency seen
 *                        during it, and the connections broken (reset, EOF, wrong bytes,
 *                        stalled): the target is 0.
 *   spoke-bench crash    a worker is killed with SIGSEGV K times; per crash: the time from
 *                        the kill until a new connection completes a round trip (the
 *                        restart backoff starts at 100 ms, so that is the floor), and until
 *                        the supervisor reports the worker ready again.
 *
 * Both start their own echo upstream (spoke-bench echo) and their own spoked (a temporary
 * directory holds its config, run_dir and queue), with `--plugins N` passthrough plugins.
 * The client threads use blocking sockets with a 5 s timeout: a stall counts as broken.
 */
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

typedef struct sbench {
    char dir[256];
    char self_dir[512];
    int echo_port, edge_port;
    pid_t echo_pid, spoked_pid;
    int conns, plugins, workers;
    size_t size;
    /* shared with the client threads */
    atomic_bool stop;
    atomic_uint_fast64_t rounds, broken;
    atomic_uint_fast64_t max_rtt_ns; /* worst round trip since the last reset */
} sbench;

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static int dial(int port, double timeout_s)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {.tv_sec = (time_t)timeout_s,
                         .tv_usec = (suseconds_t)((timeout_s - (time_t)timeout_s) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* One round trip of `n` bytes; 0 or -1. */
static int round_trip(int fd, const uint8_t *out, uint8_t *in, size_t n)
{
    size_t off = 0;
    while (off < n) {
        ssize_t w = send(fd, out + off, n - off, MSG_NOSIGNAL);
        if (w <= 0)
            return -1;
        off += (size_t)w;
    }
    for (off = 0; off < n;) {
        ssize_t r = recv(fd, in + off, n - off, 0);
        if (r <= 0)
            return -1;
        off += (size_t)r;
    }
    return memcmp(out, in, n) == 0 ? 0 : -1;
}

static void *client(void *arg)
{
    sbench *b = arg;
    uint8_t *out = malloc(b->size), *in = malloc(b->size);
    int fd = dial(b->edge_port, 5.0);
    if (out == NULL || in == NULL || fd < 0) {
        atomic_fetch_add(&b->broken, 1);
        goto done;
    }
    for (size_t i = 0; i < b->size; i++)
        out[i] = (uint8_t)(i * 7 + (uintptr_t)arg);
    while (!atomic_load(&b->stop)) {
        uint64_t t0 = spk_bench_now_ns();
        if (round_trip(fd, out, in, b->size) != 0) {
            atomic_fetch_add(&b->broken, 1);
            break;
        }
        uint64_t rtt = spk_bench_now_ns() - t0;
        uint64_t prev = atomic_load(&b->max_rtt_ns);
        while (rtt > prev && !atomic_compare_exchange_weak(&b->max_rtt_ns, &prev, rtt))
            ;
        atomic_fetch_add(&b->rounds, 1);
    }
done:
    if (fd >= 0)
        close(fd);
    free(out);
    free(in);
    return NULL;
}

static pid_t spawn(char *const argv[], const char *log)
{
    pid_t pid = fork();
    if (pid == 0) {
        if (log != NULL) {
            FILE *f = freopen(log, "w", stderr);
            (void)f;
        }
        execv(argv[0], argv);
        fprintf(stderr, "spoke-bench: exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    return pid;
}

static int write_config(sbench *b)
{
    char path[300];
    snprintf(path, sizeof(path), "%s/spoke.yaml", b->dir);
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return -1;
    fprintf(f,
            "listen: { address: 127.0.0.1:%d, upstream: 127.0.0.1:%d, workers: %d }\n"
            "run_dir: %s/run\nqueue: { path: %s/queue }\nuser: \"%s\"\n"
            "plugins:\n  dir: %s/plugins\n  drain_timeout: 60s\n",
            b->edge_port, b->echo_port, b->workers, b->dir, b->dir, spk_bench_run_as(),
            b->self_dir);
    if (b->plugins > 0) {
        fprintf(f, "  list:\n");
        for (int i = 0; i < b->plugins; i++)
            fprintf(f, "    - { name: pass-%d, file: passthrough.so }\n", i);
    }
    fclose(f);
    return 0;
}

/* Read `spoked status` through the admin socket into buf. Returns bytes or -1. */
static ssize_t read_status(const sbench *b, char *buf, size_t cap)
{
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    int n = snprintf(un.sun_path, sizeof(un.sun_path), "%s/run/spoked.sock", b->dir);
    if (n < 0 || (size_t)n >= sizeof(un.sun_path))
        return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&un, sizeof(un)) != 0) {
        close(fd);
        return -1;
    }
    size_t got = 0;
    ssize_t r;
    while (got + 1 < cap && (r = read(fd, buf + got, cap - 1 - got)) > 0)
        got += (size_t)r;
    buf[got] = '\0';
    close(fd);
    return (ssize_t)got;
}

/* Wait until the status report contains `needle`; returns seconds waited or -1. */
static double wait_status(const sbench *b, const char *needle, double timeout_s)
{
    static char buf[65536];
    uint64_t t0 = spk_bench_now_ns();
    for (;;) {
        double el = (double)(spk_bench_now_ns() - t0) / 1e9;
        if (el > timeout_s)
            return -1;
        if (read_status(b, buf, sizeof(buf)) > 0 && strstr(buf, needle) != NULL)
            return el;
        usleep(500);
    }
}

/* The pid of worker `index` of the serving generation, from the status report. */
static pid_t serving_worker(const sbench *b, int index)
{
    static char buf[65536];
    if (read_status(b, buf, sizeof(buf)) <= 0)
        return -1;
    char *gen = strstr(buf, "(serving)");
    char key[32];
    snprintf(key, sizeof(key), "worker %d  pid ", index);
    char *w = gen ? strstr(gen, key) : NULL;
    return w ? (pid_t)atoi(w + strlen(key)) : -1;
}

static int setup(sbench *b)
{
    if (spk_bench_self_dir(b->self_dir, sizeof(b->self_dir)) != 0)
        return -1;
    snprintf(b->dir, sizeof(b->dir), "/tmp/spoke-bench-sup.XXXXXX");
    if (mkdtemp(b->dir) == NULL)
        return -1;
    b->echo_port = free_port();
    b->edge_port = free_port();
    if (b->echo_port < 0 || b->edge_port < 0 || write_config(b) != 0)
        return -1;
    char self[600], spoked[600], listen[64], cfg[300], log[300];
    snprintf(self, sizeof(self), "%s/spoke-bench", b->self_dir);
    snprintf(spoked, sizeof(spoked), "%s/spoked", b->self_dir);
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", b->echo_port);
    snprintf(cfg, sizeof(cfg), "%s/spoke.yaml", b->dir);
    snprintf(log, sizeof(log), "%s/spoked.log", b->dir);
    char *echo_argv[] = {self, "echo", "--listen", listen, NULL};
    char *spoked_argv[] = {spoked, "-c", cfg, NULL};
    b->echo_pid = spawn(echo_argv, "/dev/null");
    b->spoked_pid = spawn(spoked_argv, log);
    if (b->echo_pid < 0 || b->spoked_pid < 0)
        return -1;
    if (wait_status(b, "generation 1 (serving)", 15) < 0 ||
        wait_status(b, "ready", 15) < 0) {
        fprintf(stderr, "spoke-bench: spoked did not start; see %s\n", log);
        return -1;
    }
    return 0;
}

static void teardown(sbench *b)
{
    if (b->spoked_pid > 0) {
        kill(b->spoked_pid, SIGTERM);
        waitpid(b->spoked_pid, NULL, 0);
    }
    if (b->echo_pid > 0) {
        kill(b->echo_pid, SIGTERM);
        waitpid(b->echo_pid, NULL, 0);
    }
    char cmd[400];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", b->dir);
    if (strncmp(b->dir, "/tmp/spoke-bench-sup.", 21) == 0 && system(cmd) != 0)
        fprintf(stderr, "spoke-bench: could not remove %s\n", b->dir);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: spoke-bench reload [--conns 50] [--size 1024] [--reloads 5] [--plugins 1] "
               "[--workers 2]\n"
               "       spoke-bench crash  [--crashes 5] [--plugins 1] [--workers 1]\n");
}

static int reload_run(sbench *b, int reloads)
{
    pthread_t *th = calloc((size_t)b->conns, sizeof(pthread_t));
    if (th == NULL)
        return 1;
    for (int i = 0; i < b->conns; i++)
        pthread_create(&th[i], NULL, client, b);
    usleep(500000);
    printf("| reload | SIGHUP -> new generation serving (ms) | worst round trip during it (ms) | "
           "connections broken |\n|---:|---:|---:|---:|\n");
    int rc = 0;
    for (int r = 0; r < reloads; r++) {
        uint64_t broken0 = atomic_load(&b->broken);
        atomic_store(&b->max_rtt_ns, 0);
        char want[64];
        snprintf(want, sizeof(want), "last reload: ok: generation %d ", r + 2);
        kill(b->spoked_pid, SIGHUP);
        double t = wait_status(b, want, 30);
        usleep(300000); /* let the handover settle: the old generation keeps draining */
        uint64_t broken = atomic_load(&b->broken) - broken0;
        printf("| %d | %.1f | %.2f | %llu |\n", r + 1, t * 1000.0,
               (double)atomic_load(&b->max_rtt_ns) / 1e6, (unsigned long long)broken);
        if (t < 0)
            rc = 2;
    }
    atomic_store(&b->stop, true);
    for (int i = 0; i < b->conns; i++)
        pthread_join(th[i], NULL);
    free(th);
    printf("\n%d connections, %zu-byte round trips: %llu round trips, %llu connections broken "
           "in all\n",
           b->conns, b->size, (unsigned long long)atomic_load(&b->rounds),
           (unsigned long long)atomic_load(&b->broken));
    return atomic_load(&b->broken) ? 2 : rc;
}

static int crash_run(sbench *b, int crashes)
{
    uint8_t out[64], in[64];
    memset(out, 'x', sizeof(out));
    printf("| crash | kill -SEGV -> a new connection served (ms) | -> worker ready again (ms) |\n"
           "|---:|---:|---:|\n");
    int rc = 0;
    for (int k = 0; k < crashes; k++) {
        pid_t w = serving_worker(b, 0);
        if (w <= 0) {
            fprintf(stderr, "spoke-bench: no serving worker 0\n");
            return 1;
        }
        uint64_t t0 = spk_bench_now_ns();
        kill(w, SIGSEGV);
        double served = -1;
        while ((double)(spk_bench_now_ns() - t0) / 1e9 < 30) {
            /* Wait for the worker to be gone, so the round trip is the new one's. */
            if (kill(w, 0) == 0) {
                usleep(100);
                continue;
            }
            int fd = dial(b->edge_port, 5.0);
            if (fd >= 0 && round_trip(fd, out, in, sizeof(out)) == 0) {
                served = (double)(spk_bench_now_ns() - t0) / 1e6;
                close(fd);
                break;
            }
            if (fd >= 0)
                close(fd);
        }
        double ready = -1;
        while ((double)(spk_bench_now_ns() - t0) / 1e9 < 30) {
            pid_t nw = serving_worker(b, 0);
            static char buf[65536];
            if (nw > 0 && nw != w && read_status(b, buf, sizeof(buf)) > 0) {
                char key[64];
                snprintf(key, sizeof(key), "pid %-7d ready", (int)nw);
                if (strstr(buf, key)) {
                    ready = (double)(spk_bench_now_ns() - t0) / 1e6;
                    break;
                }
            }
            usleep(200);
        }
        printf("| %d | %.1f | %.1f |\n", k + 1, served, ready);
        if (served < 0)
            rc = 2;
        usleep(200000);
    }
    return rc;
}

int spk_bench_supervisor(int argc, char **argv)
{
    sbench *b = calloc(1, sizeof(*b));
    if (b == NULL)
        return 1;
    bool is_crash = strcmp(argv[0], "crash") == 0;
    b->conns = 50;
    b->size = 1024;
    b->plugins = 1;
    b->workers = is_crash ? 1 : 2;
    uint64_t n = 5, v;
    static const struct option opts[] = {
        {"conns", required_argument, NULL, 'c'},   {"size", required_argument, NULL, 's'},
        {"reloads", required_argument, NULL, 'r'}, {"crashes", required_argument, NULL, 'k'},
        {"plugins", required_argument, NULL, 'p'}, {"workers", required_argument, NULL, 'w'},
        {"help", no_argument, NULL, 'h'},          {NULL, 0, NULL, 0},
    };
    int o;
    optind = 1;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'c':
        case 's':
        case 'r':
        case 'k':
        case 'p':
        case 'w':
            if (spk_bench_parse_uint(optarg, o == 'p' ? 0 : 1, 100000, &v) != 0) {
                fprintf(stderr, "spoke-bench: bad value '%s'\n", optarg);
                free(b);
                return 1;
            }
            if (o == 'c')
                b->conns = (int)v;
            else if (o == 's')
                b->size = (size_t)v;
            else if (o == 'p')
                b->plugins = (int)v;
            else if (o == 'w')
                b->workers = (int)v;
            else
                n = v;
            break;
        case 'h':
            usage(stdout);
            free(b);
            return 0;
        default:
            usage(stderr);
            free(b);
            return 1;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    int rc = 1;
    if (setup(b) == 0) {
        printf("spoke-bench %s: spoked with %d worker(s), %d passthrough plugin(s), "
               "log in %s/spoked.log (removed at exit)\n\n",
               argv[0], b->workers, b->plugins, b->dir);
        rc = is_crash ? crash_run(b, (int)n) : reload_run(b, (int)n);
    }
    teardown(b);
    free(b);
    return rc;
}

void spk_bench_supervisor_usage(FILE *f) { usage(f); }
