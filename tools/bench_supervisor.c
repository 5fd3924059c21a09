/*
 * bench_supervisor.c -- what the supervisor costs when things change:
 *
 *   spoke-bench reload   N connections stream round trips through spoked while it is
 *                        reloaded R times (SIGHUP). Per reload: the time from SIGHUP until
 *                        the new generation serves, the worst round-trip latency seen
 *                        during it, and the connections broken (reset, EOF, wrong bytes,
 *                        stalled): the target is 0.
 *   spoke-bench crash    the soak of issue 12: one worker, a real crashing plugin
 *                        (bench-crash, tools/bench_plugins/bench_crash.c, segfaults in
 *                        on_traffic_from_client on a chunk starting with CRASH) and client
 *                        traffic throughout. K crashes (default 1000), and R reloads
 *                        (default 100) spread among them, every 4th one failing (the plugin
 *                        configured to fail its init: generation N keeps serving). Per crash:
 *                        the time from sending CRASH until a new connection completes a
 *                        round trip (p50/p99/max). Then the quarantine: with crash_limit 3,
 *                        three crashes must quarantine bench-crash and a CRASH chunk must then
 *                        pass through. At the end: the supervisor's descriptors
 *                        (/proc/PID/fd) and children are what they were at the start, and no
 *                        worker seen during the run is left alive after spoked exits.
 *                        --max-time bounds the crash phase (the backoff of the supervisor
 *                        under test decides how many crashes fit); the report says how many
 *                        ran.
 *
 * Both start their own echo upstream (spoke-bench echo) and their own spoked (a temporary
 * directory holds its config, run_dir and queue), with `--plugins N` passthrough plugins.
 * The client threads use blocking sockets with a 5 s timeout: a stall counts as broken.
 */
#include <dirent.h>
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
    /* crash: bench-crash in the plugin list (0 no, 1 yes, 2 configured to fail its init),
     * and the quarantine's limit and window */
    int crash_plugin, crash_limit;
    const char *crash_window;
    size_t log_seen;  /* bytes of spoked.log already scanned by log_count() */
    const char *spoked_bin; /* --spoked: the spoked to measure (default: beside spoke-bench) */
    /* shared with the client threads */
    atomic_bool stop;
    atomic_uint_fast64_t rounds, broken;
    atomic_uint_fast64_t max_rtt_ns; /* worst round trip since the last reset */
} sbench;

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
            if (f != NULL)
                dup2(fileno(f), STDOUT_FILENO); /* our stdout is the report */
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
    if (b->crash_plugin)
        fprintf(f, "  crash_limit: %d\n  crash_window: %s\n", b->crash_limit, b->crash_window);
    if (b->plugins > 0 || b->crash_plugin) {
        fprintf(f, "  list:\n");
        for (int i = 0; i < b->plugins; i++)
            fprintf(f, "    - { name: pass-%d, file: passthrough.so }\n", i);
    }
    if (b->crash_plugin)
        fprintf(f, "    - { name: crash, file: %s/bench-plugins/bench_crash.so%s }\n",
                b->self_dir, b->crash_plugin == 2 ? ", config: { fail_init: true }" : "");
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
    static const char cmd[] = "status\n"; /* one command, then the end of the request */
    if (connect(fd, (struct sockaddr *)&un, sizeof(un)) != 0 ||
        write(fd, cmd, sizeof(cmd) - 1) != (ssize_t)(sizeof(cmd) - 1) ||
        shutdown(fd, SHUT_WR) != 0) {
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

static int setup(sbench *b)
{
    if (spk_bench_self_dir(b->self_dir, sizeof(b->self_dir)) != 0)
        return -1;
    snprintf(b->dir, sizeof(b->dir), "/tmp/spoke-bench-sup.XXXXXX");
    if (mkdtemp(b->dir) == NULL)
        return -1;
    b->echo_port = spk_bench_free_port();
    b->edge_port = spk_bench_free_port();
    if (b->echo_port < 0 || b->edge_port < 0 || write_config(b) != 0)
        return -1;
    char self[600], spoked[600], listen[64], cfg[300], log[300];
    snprintf(self, sizeof(self), "%s/spoke-bench", b->self_dir);
    if (b->spoked_bin != NULL)
        snprintf(spoked, sizeof(spoked), "%s", b->spoked_bin);
    else
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
    fprintf(f, "  reload [--conns 50] [--size 1024] [--reloads 5] [--plugins 1] [--workers 2]\n"
               "         [--json FILE] [--spoked PATH]\n"
               "      N connections stream round trips while spoked is reloaded R times: per\n"
               "      reload the time until the new generation serves and the connections broken\n"
               "  crash [--crashes 1000] [--reloads 100] [--conns 4] [--plugins 1] [--max-time 10m]\n"
               "        [--json FILE] [--spoked PATH]\n"
               "      the soak: one worker, bench-crash segfaulting on demand under traffic, the\n"
               "      reloads among the crashes (every 4th failing), then a quarantine; the time\n"
               "      from a crash to the next connection served (p50/p99/max), and descriptors,\n"
               "      children and workers left at the end. --spoked: measure another build's\n"
               "      spoked (plugins still from this one)\n");
}

static int reload_run(sbench *b, int reloads, const char *json)
{
    pthread_t *th = calloc((size_t)b->conns, sizeof(pthread_t));
    double *res = calloc((size_t)reloads * 3 + 1, sizeof(double)); /* ms, worst ms, broken */
    if (th == NULL || res == NULL) {
        free(th);
        free(res);
        return 1;
    }
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
        res[3 * r] = t * 1000.0;
        res[3 * r + 1] = (double)atomic_load(&b->max_rtt_ns) / 1e6;
        res[3 * r + 2] = (double)broken;
        printf("| %d | %.1f | %.2f | %llu |\n", r + 1, res[3 * r], res[3 * r + 1],
               (unsigned long long)broken);
        fflush(stdout);
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
    FILE *f = json ? fopen(json, "w") : NULL;
    if (json != NULL && f == NULL) {
        fprintf(stderr, "spoke-bench reload: %s: %s\n", json, strerror(errno));
        rc = 1;
    }
    if (f != NULL) {
        fprintf(f, "{\"conns\":%d,\"size\":%zu,\"workers\":%d,\"plugins\":%d,\"rounds\":%llu,"
                   "\"broken\":%llu,\"reloads\":[",
                b->conns, b->size, b->workers, b->plugins,
                (unsigned long long)atomic_load(&b->rounds),
                (unsigned long long)atomic_load(&b->broken));
        for (int r = 0; r < reloads; r++)
            fprintf(f, "%s{\"serving_ms\":%.3f,\"worst_rtt_ms\":%.3f,\"broken\":%.0f}",
                    r ? "," : "", res[3 * r], res[3 * r + 1], res[3 * r + 2]);
        fprintf(f, "]}\n");
        fclose(f);
    }
    free(res);
    return atomic_load(&b->broken) ? 2 : rc;
}

/* ---- crash: the soak ------------------------------------------------------------------ */

/* Shared with the soak's client threads. */
typedef struct soak_traffic {
    sbench *b;
    atomic_bool stop;
    atomic_uint_fast64_t rounds, broken, conns;
    atomic_uint_fast64_t last_ok_ns, max_gap_ns; /* the longest time without a round trip */
} soak_traffic;

/* Round trips on short connections (at most 200 each, so old generations drain fast);
 * a failure is counted and the client connects again 1 ms later. */
static void *soak_client(void *arg)
{
    soak_traffic *t = arg;
    uint8_t out[512], in[512];
    memset(out, 'd', sizeof(out)); /* never "CRASH" */
    while (!atomic_load(&t->stop)) {
        int fd = dial(t->b->edge_port, 5.0);
        if (fd < 0) {
            atomic_fetch_add(&t->broken, 1);
            usleep(1000);
            continue;
        }
        atomic_fetch_add(&t->conns, 1);
        for (int i = 0; i < 200 && !atomic_load(&t->stop); i++) {
            if (round_trip(fd, out, in, sizeof(out)) != 0) {
                atomic_fetch_add(&t->broken, 1);
                usleep(1000);
                break;
            }
            uint64_t now = spk_bench_now_ns(), last = atomic_load(&t->last_ok_ns);
            while (now > last && !atomic_compare_exchange_weak(&t->last_ok_ns, &last, now))
                ;
            uint64_t gap = now > last ? now - last : 0, prev = atomic_load(&t->max_gap_ns);
            while (gap > prev && !atomic_compare_exchange_weak(&t->max_gap_ns, &prev, gap))
                ;
            atomic_fetch_add(&t->rounds, 1);
        }
        close(fd);
    }
    return NULL;
}

/* Occurrences of `needle` in the part of spoked.log written since the last call with
 * advance set (every call counts from b->log_seen; advance moves it to the end). */
static int log_count(sbench *b, const char *needle, bool advance)
{
    char path[300];
    snprintf(path, sizeof(path), "%s/spoked.log", b->dir);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    int n = 0;
    char line[4096];
    if (fseek(f, (long)b->log_seen, SEEK_SET) == 0) {
        while (fgets(line, sizeof(line), f) != NULL) {
            if (strchr(line, '\n') == NULL)
                break; /* a line still being written: read it next time */
            if (strstr(line, needle) != NULL)
                n++;
            if (advance)
                b->log_seen += strlen(line);
        }
    }
    fclose(f);
    return n;
}

/* Wait until the new log lines hold one of `a` or `b_`: 1 for a, 2 for b_, -1 on timeout.
 * The lines read are consumed. */
static int log_wait(sbench *b, const char *a, const char *b_, double timeout_s)
{
    uint64_t t0 = spk_bench_now_ns();
    while ((double)(spk_bench_now_ns() - t0) / 1e9 < timeout_s) {
        int na = log_count(b, a, false), nb = b_ ? log_count(b, b_, false) : 0;
        if (na > 0 || nb > 0) {
            log_count(b, a, true);
            return na > 0 ? 1 : 2;
        }
        usleep(500);
    }
    return -1;
}

/* Descriptors open in process pid (/proc/pid/fd), or -1. */
static int count_fds(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* "N -> target" of every descriptor of pid, one per line, into out[cap]. */
static void fd_list(pid_t pid, char *out, size_t cap)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    out[0] = '\0';
    DIR *d = opendir(path);
    if (d == NULL)
        return;
    size_t used = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char lp[400], target[256];
        snprintf(lp, sizeof(lp), "%s/%s", path, e->d_name);
        ssize_t n = readlink(lp, target, sizeof(target) - 1);
        target[n > 0 ? n : 0] = '\0';
        int w = snprintf(out + used, cap - used, "%s -> %s\n", e->d_name, target);
        if (w < 0 || (size_t)w >= cap - used)
            break;
        used += (size_t)w;
    }
    closedir(d);
}

/* The worker pids a status report names, added to seen[*n] (no duplicates). */
static void note_workers(const sbench *b, pid_t *seen, size_t *n, size_t cap)
{
    static char buf[65536];
    if (read_status(b, buf, sizeof(buf)) <= 0)
        return;
    for (char *p = buf; (p = strstr(p, "  pid ")) != NULL; p += 6) {
        /* "worker N  pid P" lines, and the header's "spoked V  pid P" (the supervisor,
         * skipped below) */
        pid_t pid = (pid_t)atoi(p + 6);
        if (pid <= 0 || pid == b->spoked_pid)
            continue;
        size_t i;
        for (i = 0; i < *n && seen[i] != pid; i++)
            ;
        if (i == *n && *n < cap)
            seen[(*n)++] = pid;
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double quantile(const double *sorted, size_t n, double q)
{
    if (n == 0)
        return -1;
    size_t i = (size_t)(q * (double)(n - 1) + 0.5);
    return sorted[i < n ? i : n - 1];
}

/* One crash: CRASH on a fresh connection, then connections until one completes a round
 * trip. Returns ms from sending CRASH to that round trip, or -1 (none within 30 s). */
static double crash_once(sbench *b)
{
    uint8_t out[64], in[64];
    memset(out, 'x', sizeof(out));
    memcpy(out, "CRASH", 5);
    int fd = dial(b->edge_port, 5.0);
    if (fd < 0)
        return -1;
    uint64_t t0 = spk_bench_now_ns();
    if (send(fd, out, sizeof(out), MSG_NOSIGNAL) != (ssize_t)sizeof(out)) {
        close(fd);
        return -1;
    }
    /* The worker dies inside the hook: this connection ends without an answer. */
    ssize_t r = recv(fd, in, sizeof(in), 0);
    close(fd);
    if (r > 0)
        return -2; /* the chunk was forwarded: bench-crash is not running */
    memset(out, 'y', sizeof(out));
    while ((double)(spk_bench_now_ns() - t0) / 1e9 < 30) {
        fd = dial(b->edge_port, 5.0);
        if (fd >= 0 && round_trip(fd, out, in, sizeof(out)) == 0) {
            close(fd);
            return (double)(spk_bench_now_ns() - t0) / 1e6;
        }
        if (fd >= 0)
            close(fd);
        usleep(100);
    }
    return -1;
}

/* Rewrite the config (crash plugin as `mode`) and SIGHUP. Waits for the log's outcome
 * ("generation N serving (W workers); generation M draining" or "reload failed"):
 * 1 ok, 2 failed, -1 none within 30 s; *ms gets the time it took. */
static int reload_once(sbench *b, int mode, double *ms)
{
    b->crash_plugin = mode;
    if (write_config(b) != 0)
        return -1;
    log_count(b, "", true); /* skip what is logged so far */
    uint64_t t0 = spk_bench_now_ns();
    kill(b->spoked_pid, SIGHUP);
    int rc = log_wait(b, "workers); generation", "reload failed", 30);
    *ms = (double)(spk_bench_now_ns() - t0) / 1e6;
    return rc;
}

typedef struct soak_opts {
    int crashes, reloads, clients;
    double max_time_s;
    const char *json;
} soak_opts;

static int crash_run(sbench *b, const soak_opts *o)
{
    int rc = 0;
    enum { MAX_SEEN = 8192 };
    pid_t *seen = calloc(MAX_SEEN, sizeof(pid_t));
    double *served = calloc((size_t)o->crashes + 1, sizeof(double));
    /* the same split: the first crash of a fresh worker (the run's first, or the first
     * after an ok reload) and the crashes of workers restarted after a crash */
    double *fresh = calloc((size_t)o->crashes + 1, sizeof(double));
    double *again = calloc((size_t)o->crashes + 1, sizeof(double));
    size_t n_fresh = 0, n_again = 0;
    bool next_fresh = true;
    double *reload_ms = calloc((size_t)o->reloads + 1, sizeof(double));
    pthread_t *th = calloc((size_t)o->clients, sizeof(pthread_t));
    soak_traffic *t = calloc(1, sizeof(*t));
    if (seen == NULL || served == NULL || reload_ms == NULL || th == NULL || t == NULL ||
        fresh == NULL || again == NULL) {
        fprintf(stderr, "spoke-bench crash: out of memory\n");
        free(seen), free(served), free(reload_ms), free(th), free(t), free(fresh), free(again);
        return 1;
    }
    size_t n_seen = 0;
    usleep(200000);
    const int fds0 = count_fds(b->spoked_pid), kids0 = spk_bench_children(b->spoked_pid, NULL, 0);
    static char fdl0[16384], fdl1[16384];
    fd_list(b->spoked_pid, fdl0, sizeof(fdl0));
    note_workers(b, seen, &n_seen, MAX_SEEN);
    t->b = b;
    atomic_store(&t->last_ok_ns, spk_bench_now_ns());
    for (int i = 0; i < o->clients; i++)
        pthread_create(&th[i], NULL, soak_client, t);
    usleep(200000);
    atomic_store(&t->max_gap_ns, 0);

    /* Phase 1: crashes, with the reloads spread among them. */
    const int per_reload = o->reloads > 0 ? (o->crashes + o->reloads - 1) / o->reloads : 0;
    int done = 0, lost = 0, reloads = 0, reload_ok = 0, reload_failed = 0, reload_wrong = 0;
    uint64_t t_start = spk_bench_now_ns();
    bool timed_out = false;
    fprintf(stderr, "spoke-bench crash: %d crashes, %d reloads (every 4th failing), %d client "
                    "threads, at most %.0f s\n", o->crashes, o->reloads, o->clients, o->max_time_s);
    for (int k = 0; k < o->crashes; k++) {
        if ((double)(spk_bench_now_ns() - t_start) / 1e9 > o->max_time_s) {
            timed_out = true;
            break;
        }
        double ms = crash_once(b);
        if (ms == -2) {
            fprintf(stderr, "spoke-bench crash: crash %d: CRASH was forwarded (bench-crash not "
                            "loaded?); see %s/spoked.log\n", k + 1, b->dir);
            rc = 2;
            break;
        }
        if (ms < 0) {
            lost++;
        } else {
            served[done++] = ms;
            if (next_fresh)
                fresh[n_fresh++] = ms;
            else
                again[n_again++] = ms;
        }
        next_fresh = false;
        note_workers(b, seen, &n_seen, MAX_SEEN); /* the new worker, for the leak check */
        if (k % 100 == 99)
            fprintf(stderr, "spoke-bench crash: %d crashes, %d reloads, %.0f s\n", k + 1, reloads,
                    (double)(spk_bench_now_ns() - t_start) / 1e9);
        if (per_reload > 0 && reloads < o->reloads && k % per_reload == per_reload - 1) {
            bool fail = reloads % 4 == 3;
            int out = reload_once(b, fail ? 2 : 1, &reload_ms[reloads]);
            reloads++;
            if (out == 1) {
                reload_ok++;
                next_fresh = true; /* the new generation's worker has not crashed yet */
            }
            else if (out == 2)
                reload_failed++;
            if (out != (fail ? 2 : 1))
                reload_wrong++;
            if (fail) { /* back to the good config; the next reload picks it up */
                b->crash_plugin = 1;
                write_config(b);
            }
            note_workers(b, seen, &n_seen, MAX_SEEN);
        }
    }
    const double phase1_s = (double)(spk_bench_now_ns() - t_start) / 1e9;
    const uint64_t gap1 = atomic_load(&t->max_gap_ns);

    /* Phase 2: the quarantine. crash_limit 3 in 60 s: three crashes quarantine bench-crash;
     * then a CRASH chunk passes through to the echo. */
    b->crash_limit = 3;
    b->crash_window = "60s";
    double qms;
    int qreload = reload_once(b, 1, &qms);
    log_count(b, "", true);
    int qcrashes = 0;
    for (int k = 0; k < 3 && qreload == 1; k++)
        if (crash_once(b) >= 0)
            qcrashes++;
    bool quarantined = qreload == 1 && log_wait(b, "plugin crash quarantined", NULL, 10) == 1;
    double after_q = quarantined ? crash_once(b) : -1; /* -2: forwarded, as it should be */
    bool q_ok = quarantined && after_q == -2;
    note_workers(b, seen, &n_seen, MAX_SEEN);

    /* Stop the traffic; wait for the draining generations to go. */
    atomic_store(&t->stop, true);
    for (int i = 0; i < o->clients; i++)
        pthread_join(th[i], NULL);
    static char buf[65536];
    for (int i = 0; i < 200; i++) {
        if (read_status(b, buf, sizeof(buf)) > 0 && strstr(buf, "(draining)") == NULL &&
            strstr(buf, "ready") != NULL)
            break;
        usleep(50000);
    }
    usleep(200000);
    note_workers(b, seen, &n_seen, MAX_SEEN);
    const int fds1 = count_fds(b->spoked_pid), kids1 = spk_bench_children(b->spoked_pid, NULL, 0);
    fd_list(b->spoked_pid, fdl1, sizeof(fdl1));
    /* Name what is new, for whoever chases a leak (only then: a new generation's
     * descriptors may sit at other numbers). */
    for (char *l = fdl1, *nl; fds1 > fds0 && *l; l = nl + 1) {
        nl = strchr(l, '\n');
        if (nl == NULL)
            break;
        *nl = '\0';
        size_t ll = strlen(l);
        const char *hit = fdl0;
        while ((hit = strstr(hit, l)) != NULL &&
               ((hit != fdl0 && hit[-1] != '\n') || hit[ll] != '\n'))
            hit++;
        if (hit == NULL)
            printf("new supervisor descriptor at the end: %s\n", l);
        *nl = '\n';
    }

    /* Stop spoked; every worker seen must be gone with it. */
    kill(b->spoked_pid, SIGTERM);
    waitpid(b->spoked_pid, NULL, 0);
    b->spoked_pid = -1;
    usleep(200000);
    int left = 0;
    for (size_t i = 0; i < n_seen; i++) {
        char path[64], comm[64] = "";
        snprintf(path, sizeof(path), "/proc/%d/comm", (int)seen[i]);
        FILE *f = fopen(path, "r");
        if (f != NULL) {
            if (fgets(comm, sizeof(comm), f) != NULL && strncmp(comm, "spoked", 6) == 0)
                left++;
            fclose(f);
        }
    }

    qsort(served, (size_t)done, sizeof(double), cmp_double);
    qsort(fresh, n_fresh, sizeof(double), cmp_double);
    qsort(again, n_again, sizeof(double), cmp_double);
    qsort(reload_ms, (size_t)reloads, sizeof(double), cmp_double);
    const double p50 = quantile(served, (size_t)done, 0.5), p99 = quantile(served, (size_t)done, 0.99),
                 mx = done ? served[done - 1] : -1;
    const uint64_t rounds = atomic_load(&t->rounds), broken = atomic_load(&t->broken);
    /* --max-time is a budget, not a failure: the table says how many crashes ran. */
    bool ok = lost == 0 && reload_wrong == 0 && q_ok && fds0 == fds1 && kids0 == kids1 &&
              left == 0 && rc == 0;

    printf("| what | measured |\n|---|---:|\n");
    printf("| worker crashes (bench-crash SIGSEGV in a hook), 1 worker | %d of %d%s |\n", done + lost,
           o->crashes, timed_out ? " (stopped at --max-time)" : "");
    printf("| crash -> next connection served, p50 / p99 / max (ms) | %.1f / %.1f / %.1f |\n", p50,
           p99, mx);
    printf("| - the first crash of a fresh worker (run start, after an ok reload): p50 / p99 / max "
           "(ms), n | %.1f / %.1f / %.1f, %zu |\n", quantile(fresh, n_fresh, 0.5),
           quantile(fresh, n_fresh, 0.99), n_fresh ? fresh[n_fresh - 1] : -1, n_fresh);
    printf("| - a crash of a worker restarted after a crash (the crash loop): p50 / p99 / max "
           "(ms), n | %.1f / %.1f / %.1f, %zu |\n", quantile(again, n_again, 0.5),
           quantile(again, n_again, 0.99), n_again ? again[n_again - 1] : -1, n_again);
    printf("| crashes not followed by a served connection within 30 s | %d |\n", lost);
    printf("| reloads: ok / failed (every 4th is made to fail) / other outcome | %d / %d / %d |\n",
           reload_ok, reload_failed, reloads - reload_ok - reload_failed);
    printf("| reload SIGHUP -> outcome logged, p50 / max (ms) | %.1f / %.1f |\n",
           quantile(reload_ms, (size_t)reloads, 0.5), reloads ? reload_ms[reloads - 1] : -1);
    printf("| crash phase | %.1f s |\n", phase1_s);
    printf("| client round trips / connections / broken (%d threads, 512 B) | %llu / %llu / %llu |\n",
           o->clients, (unsigned long long)rounds, (unsigned long long)atomic_load(&t->conns),
           (unsigned long long)broken);
    printf("| longest time with no round trip served (crash phase) | %.1f ms |\n", (double)gap1 / 1e6);
    printf("| quarantine: crash_limit 3 -> quarantined, then CRASH forwarded | %s |\n",
           q_ok ? "yes" : quarantined ? "quarantined, but CRASH not forwarded" : "NO");
    printf("| supervisor descriptors before / after | %d / %d |\n", fds0, fds1);
    printf("| supervisor children before / after | %d / %d |\n", kids0, kids1);
    printf("| workers seen / alive after spoked exited | %zu / %d |\n", n_seen, left);
    if (ok) {
        printf("\nresult: ok%s\n", timed_out ? " (stopped at --max-time: the restart backoff "
                                               "decides how many crashes fit)" : "");
    } else {
        printf("\nresult: NOT OK:%s%s%s%s%s%s\n",
               lost ? " crashes not followed by service;" : "",
               reload_wrong ? " reloads with another outcome than asked;" : "",
               q_ok ? "" : " no quarantine;", fds0 != fds1 ? " descriptors leaked;" : "",
               kids0 != kids1 ? " children left;" : "", left ? " workers left alive;" : "");
    }

    if (o->json != NULL) {
        FILE *f = fopen(o->json, "w");
        if (f == NULL) {
            fprintf(stderr, "spoke-bench crash: %s: %s\n", o->json, strerror(errno));
            rc = 1;
        } else {
            fprintf(f, "{\"crashes_asked\":%d,\"crashes\":%d,\"timed_out\":%s,\"lost\":%d,"
                       "\"served_ms_p50\":%.3f,\"served_ms_p99\":%.3f,\"served_ms_max\":%.3f,"
                       "\"fresh_n\":%zu,\"fresh_ms_p50\":%.3f,\"fresh_ms_max\":%.3f,"
                       "\"again_n\":%zu,\"again_ms_p50\":%.3f,\"again_ms_max\":%.3f,"
                       "\"reloads\":%d,\"reloads_ok\":%d,\"reloads_failed\":%d,"
                       "\"reloads_unexpected\":%d,\"reload_ms_p50\":%.3f,\"phase_s\":%.3f,"
                       "\"rounds\":%llu,\"broken\":%llu,\"max_gap_ms\":%.3f,\"quarantine_ok\":%s,"
                       "\"fds_before\":%d,\"fds_after\":%d,\"children_before\":%d,"
                       "\"children_after\":%d,\"workers_seen\":%zu,\"workers_left\":%d,"
                       "\"ok\":%s}\n",
                    o->crashes, done + lost, timed_out ? "true" : "false", lost, p50, p99, mx,
                    n_fresh, quantile(fresh, n_fresh, 0.5), n_fresh ? fresh[n_fresh - 1] : -1,
                    n_again, quantile(again, n_again, 0.5), n_again ? again[n_again - 1] : -1,
                    reloads, reload_ok, reload_failed, reload_wrong,
                    quantile(reload_ms, (size_t)reloads, 0.5), phase1_s,
                    (unsigned long long)rounds, (unsigned long long)broken, (double)gap1 / 1e6,
                    q_ok ? "true" : "false", fds0, fds1, kids0, kids1, n_seen, left,
                    ok ? "true" : "false");
            fclose(f);
        }
    }
    free(seen), free(served), free(reload_ms), free(th), free(t), free(fresh), free(again);
    return rc != 0 ? rc : ok ? 0 : 2;
}

int spk_bench_supervisor(int argc, char **argv)
{
    sbench *b = calloc(1, sizeof(*b));
    if (b == NULL)
        return 1;
    bool is_crash = strcmp(argv[0], "crash") == 0;
    b->conns = is_crash ? 4 : 50;
    b->size = 1024;
    b->plugins = 1;
    b->workers = is_crash ? 1 : 2;
    uint64_t crashes = 1000, reloads = is_crash ? 100 : 5, v;
    double max_time = 600;
    const char *json = NULL;
    static const struct option opts[] = {
        {"conns", required_argument, NULL, 'c'},   {"size", required_argument, NULL, 's'},
        {"reloads", required_argument, NULL, 'r'}, {"crashes", required_argument, NULL, 'k'},
        {"plugins", required_argument, NULL, 'p'}, {"workers", required_argument, NULL, 'w'},
        {"max-time", required_argument, NULL, 'm'}, {"json", required_argument, NULL, 'j'},
        {"spoked", required_argument, NULL, 'S'},
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
            if (spk_bench_parse_uint(optarg, o == 'p' || o == 'r' ? 0 : 1, 100000, &v) != 0) {
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
            else if (o == 'r')
                reloads = v;
            else
                crashes = v;
            break;
        case 'm':
            if (spk_bench_parse_duration(optarg, 0, &max_time) != 0) {
                fprintf(stderr, "spoke-bench: --max-time: expected a duration, got '%s'\n", optarg);
                free(b);
                return 1;
            }
            break;
        case 'j': json = optarg; break;
        case 'S': b->spoked_bin = optarg; break;
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
    if (is_crash) {
        b->workers = 1; /* the soak's question: how long one worker's crash costs */
        b->crash_plugin = 1;
        /* Phase 1 never quarantines (100 crashes within 1 ms cannot happen: each needs a
         * new worker); phase 2 sets 3 in 60 s. 100 is within every tree's cap. */
        b->crash_limit = 100;
        b->crash_window = "1ms";
    }
    signal(SIGPIPE, SIG_IGN);
    int rc = 1;
    if (setup(b) == 0) {
        printf("spoke-bench %s: spoked with %d worker(s), %d passthrough plugin(s)%s, "
               "log in %s/spoked.log (removed at exit)\n\n",
               argv[0], b->workers, b->plugins, is_crash ? " and bench-crash" : "", b->dir);
        fflush(stdout);
        if (is_crash) {
            soak_opts so = {(int)crashes, (int)reloads, b->conns, max_time, json};
            rc = crash_run(b, &so);
        } else {
            rc = reload_run(b, (int)reloads, json);
        }
    }
    teardown(b);
    free(b);
    return rc;
}

void spk_bench_supervisor_usage(FILE *f) { usage(f); }
