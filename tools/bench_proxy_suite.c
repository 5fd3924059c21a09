/*
 * bench_proxy_suite.c -- `spoke-bench proxy` without --target: the proxy benchmark of
 * docs/benchmarks.md, with everything it needs started here (this replaces the
 * orchestration of scripts/bench-proxy.sh).
 *
 * One echo upstream (spoke-bench echo's server, one thread, a child of this process) and
 * five paths to it, all on 127.0.0.1 and all running for the whole suite:
 *
 *   direct      straight to the echo server (the floor: no proxy at all)
 *   haproxy     HAProxy, mode tcp, nbthread 1 (the baseline of every ratio)
 *   spoked0/1/4 spoked, listen.workers: 1, with 0, 1 and 4 passthrough plugins
 *
 * Closed loop: per round and size, the load generator (bench_proxy.c, in this process)
 * runs against each path in turn, each round starting one path later (interleaved), so a
 * burst of other work on the machine skews one run, not one path; each row is the round
 * with the median req/s of its path. Proxy CPU per request is the user + system time of
 * the proxy's processes (spoked: supervisor and worker; /proc/PID/stat) during the run
 * over the requests completed.
 *
 * Open loop: at each offered load (by default 10..90 % of HAProxy's closed-loop req/s at
 * the first size, measured just before), each path in turn, rotated per load: p50/p99
 * latency counted from when each request was due. With --plot PREFIX, PREFIX.dat holds
 * them and gnuplot draws PREFIX.png and PREFIX.svg.
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <unistd.h>

#include "bench.h"
#include "bench_net.h"
#include "bench_proxy.h"

enum { P_DIRECT, P_HAPROXY, P_SPOKED0, P_SPOKED1, P_SPOKED4, N_PATHS };
static const char *const path_key[N_PATHS] = {"direct", "haproxy", "spoked0", "spoked1",
                                              "spoked4"};
static const char *const path_label[N_PATHS] = {
    "direct to echo (no proxy)", "HAProxy, nbthread 1", "spoked, 1 worker, 0 plugins",
    "spoked, 1 worker, 1 passthrough", "spoked, 1 worker, 4 passthrough"};
static const int path_plugins[N_PATHS] = {0, 0, 0, 1, 4};

#define MAX_SIZES 4
#define MAX_RATES 12
#define MAX_ROUNDS 9

typedef struct run {
    bool ok;
    double rps, mib_s, p50, p99, p999, cpu_us, client_cpu_us;
    uint64_t errors;
} run;

typedef struct suite {
    char dir[64], self_dir[512];
    char addr[N_PATHS][64];
    pid_t pid[N_PATHS];       /* the proxy's process (0 for direct) */
    const char *skip[N_PATHS]; /* why a path does not run, or NULL */
    pid_t echo_pid;
    spk_addr echo_addr;
    char echo_text[64];
    const char *haproxy;
    unsigned conns;
    double duration_s, warmup_s, rate_duration_s;
    int rounds, n_sizes, n_rates;
    uint64_t sizes[MAX_SIZES];
    double rate_pct[MAX_RATES], rate_abs[MAX_RATES];
    bool rates_absolute;
    const char *json, *plot;
    run closed[MAX_SIZES][N_PATHS][MAX_ROUNDS];
    run open[MAX_RATES][N_PATHS];
    double offered[MAX_RATES];
} suite;

/* Fork and exec argv with stdout and stderr into `log`; the child dies with us. */
static pid_t spawn(char *const argv[], const char *log)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        FILE *f = freopen(log, "w", stderr);
        if (f != NULL)
            dup2(fileno(f), STDOUT_FILENO);
        execv(argv[0], argv);
        fprintf(stderr, "spoke-bench: exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    return pid;
}

/* Wait up to 10 s until addr accepts connections; -1 if pid died first. */
static int wait_listen(const char *text, pid_t pid)
{
    spk_addr a;
    spk_errbuf eb;
    if (spk_addr_parse(text, &a, &eb) != 0)
        return -1;
    for (int i = 0; i < 1000; i++) {
        int fd = spk_connect_start(&a);
        if (fd >= 0) {
            /* non-blocking connect to loopback: poll for the answer */
            for (int k = 0; k < 100; k++) {
                int err = 0;
                socklen_t len = sizeof(err);
                struct sockaddr_storage peer;
                socklen_t plen = sizeof(peer);
                if (getpeername(fd, (struct sockaddr *)&peer, &plen) == 0) {
                    close(fd);
                    return 0;
                }
                if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err != 0)
                    break;
                usleep(100);
            }
            close(fd);
        }
        if (pid > 0 && waitpid(pid, NULL, WNOHANG) == pid)
            return -1;
        usleep(10000);
    }
    return -1;
}

static void stop_pid(pid_t pid)
{
    if (pid <= 0)
        return;
    kill(pid, SIGTERM);
    for (int i = 0; i < 500; i++) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return;
        usleep(10000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* utime + stime + cutime + cstime of one process, in clock ticks. */
static uint64_t proc_ticks(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (p == NULL)
        return 0;
    unsigned long long v[17] = {0};
    /* after ") ": state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17) */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %llu %llu",
               &v[0], &v[1], &v[2], &v[3]) != 4)
        return 0;
    return v[0] + v[1] + v[2] + v[3];
}

/* CPU ticks of pid and its children (spoked: the supervisor and its workers). */
static uint64_t tree_ticks(pid_t pid)
{
    uint64_t t = proc_ticks(pid);
    pid_t kids[256];
    int n = spk_bench_children(pid, kids, 256);
    for (int i = 0; i < n && i < 256; i++)
        t += proc_ticks(kids[i]);
    return t;
}

static int start_haproxy(suite *s)
{
    int port = spk_bench_free_port();
    char cfg[128], log[128];
    snprintf(cfg, sizeof(cfg), "%s/haproxy.cfg", s->dir);
    snprintf(log, sizeof(log), "%s/haproxy.log", s->dir);
    FILE *f = fopen(cfg, "w");
    if (f == NULL || port < 0) {
        if (f != NULL)
            fclose(f);
        return -1;
    }
    unsigned maxconn = s->conns + 1000;
    fprintf(f, "global\n    nbthread 1\n    maxconn %u\n\ndefaults\n    mode tcp\n"
               "    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
               "    maxconn %u\n\nlisten bench\n    bind 127.0.0.1:%d\n    server echo %s\n",
            maxconn, maxconn, port, s->echo_text);
    fclose(f);
    snprintf(s->addr[P_HAPROXY], sizeof(s->addr[0]), "127.0.0.1:%d", port);
    char *argv[] = {(char *)s->haproxy, "-db", "-f", cfg, NULL};
    s->pid[P_HAPROXY] = spawn(argv, log);
    if (s->pid[P_HAPROXY] < 0 || wait_listen(s->addr[P_HAPROXY], s->pid[P_HAPROXY]) != 0) {
        fprintf(stderr, "spoke-bench proxy: HAProxy did not start; see %s\n", log);
        return -1;
    }
    return 0;
}

static int start_spoked(suite *s, int p)
{
    int port = spk_bench_free_port();
    char cfg[128], log[128];
    snprintf(cfg, sizeof(cfg), "%s/%s.yaml", s->dir, path_key[p]);
    snprintf(log, sizeof(log), "%s/%s.log", s->dir, path_key[p]);
    FILE *f = fopen(cfg, "w");
    if (f == NULL || port < 0) {
        if (f != NULL)
            fclose(f);
        return -1;
    }
    fprintf(f, "run_dir: %s/run-%s\nedge: { id: bench }\nuser: \"%s\"\n"
               "listen: { address: 127.0.0.1:%d, upstream: %s, workers: 1 }\n"
               "log: { level: warn }\nqueue: { path: %s/queue-%s }\nplugins:\n  dir: %s/plugins\n",
            s->dir, path_key[p], spk_bench_run_as(), port, s->echo_text, s->dir, path_key[p],
            s->self_dir);
    if (path_plugins[p] > 0) {
        fprintf(f, "  list:\n");
        for (int i = 1; i <= path_plugins[p]; i++)
            fprintf(f, "    - { name: passthrough-%d, file: passthrough.so }\n", i);
    }
    fclose(f);
    snprintf(s->addr[p], sizeof(s->addr[0]), "127.0.0.1:%d", port);
    char spoked[600];
    snprintf(spoked, sizeof(spoked), "%s/spoked", s->self_dir);
    char *argv[] = {spoked, "-c", cfg, NULL};
    s->pid[p] = spawn(argv, log);
    if (s->pid[p] < 0 || wait_listen(s->addr[p], s->pid[p]) != 0) {
        fprintf(stderr, "spoke-bench proxy: spoked (%s) did not start; see %s\n", path_key[p],
                log);
        return -1;
    }
    return 0;
}

/* One load run against path p; 0 or -1 (setup failure). */
static int one_run(suite *s, int p, uint64_t size, double rate, double duration, double warmup,
                   run *out)
{
    memset(out, 0, sizeof(*out));
    lg_opts o = {.conns = s->conns, .threads = 1, .pipeline = 1, .size = size,
                 .duration_s = duration, .warmup_s = warmup, .rate = rate};
    spk_errbuf eb;
    if (spk_addr_parse(s->addr[p], &o.target, &eb) != 0)
        return -1;
    lg_result *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return -1;
    uint64_t t0 = s->pid[p] > 0 ? tree_ticks(s->pid[p]) : 0;
    int rc = spk_bench_lg_run(&o, r);
    uint64_t t1 = s->pid[p] > 0 ? tree_ticks(s->pid[p]) : 0;
    if (rc == 0) {
        double secs = r->seconds > 0 ? r->seconds : 1e-9;
        out->ok = r->h.total > 0;
        out->rps = (double)r->h.total / secs;
        out->mib_s = (double)r->bytes_out / secs / 1048576.0;
        out->p50 = (double)spk_bench_hist_quantile(&r->h, 0.50) / 1e3;
        out->p99 = (double)spk_bench_hist_quantile(&r->h, 0.99) / 1e3;
        out->p999 = (double)spk_bench_hist_quantile(&r->h, 0.999) / 1e3;
        out->errors = r->errors_total;
        out->client_cpu_us = r->cpu_us_per_req;
        long hz = sysconf(_SC_CLK_TCK);
        out->cpu_us = s->pid[p] > 0 && r->requests_all > 0 && hz > 0
                          ? (double)(t1 - t0) / (double)hz * 1e6 / (double)r->requests_all
                          : -1;
    }
    free(r);
    return rc;
}

static int cmp_rps(const void *a, const void *b)
{
    const run *x = a, *y = b;
    return x->rps < y->rps ? -1 : x->rps > y->rps;
}

/* The round with the median req/s of path p at size index z. */
static const run *median_run(const suite *s, int z, int p)
{
    static run sorted[MAX_ROUNDS];
    int n = 0;
    for (int r = 0; r < s->rounds; r++)
        if (s->closed[z][p][r].ok)
            sorted[n++] = s->closed[z][p][r];
    if (n == 0)
        return NULL;
    qsort(sorted, (size_t)n, sizeof(run), cmp_rps);
    return &sorted[(n - 1) / 2];
}

static void ratio(char *buf, size_t cap, double a, double b)
{
    if (a > 0 && b > 0)
        snprintf(buf, cap, "%.2fx", a / b);
    else
        snprintf(buf, cap, "-");
}

static void print_closed(const suite *s)
{
    for (int z = 0; z < s->n_sizes; z++) {
        printf("\n#### %llu-byte requests, %u connections, closed loop\n\n",
               (unsigned long long)s->sizes[z], s->conns);
        printf("| path | req/s | MiB/s each way | p50 µs | p99 µs | p99.9 µs | errors | "
               "proxy CPU µs/req | client CPU µs/req | req/s vs HAProxy | p99 vs HAProxy | "
               "CPU/req vs HAProxy |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        run ha = {0};
        const run *hp = median_run(s, z, P_HAPROXY);
        if (hp != NULL)
            ha = *hp;
        for (int p = 0; p < N_PATHS; p++) {
            if (s->skip[p] != NULL) {
                printf("| %s | skipped: %s | | | | | | | | | | |\n", path_label[p], s->skip[p]);
                continue;
            }
            const run *m = median_run(s, z, p);
            if (m == NULL) {
                printf("| %s | failed (see the messages above) | | | | | | | | | | |\n",
                       path_label[p]);
                continue;
            }
            run r = *m;
            char cpu[32] = "-", r1[16] = "", r2[16] = "", r3[16] = "";
            if (r.cpu_us >= 0)
                snprintf(cpu, sizeof(cpu), "%.2f", r.cpu_us);
            if (p >= P_SPOKED0 && ha.ok) {
                ratio(r1, sizeof(r1), r.rps, ha.rps);
                ratio(r2, sizeof(r2), r.p99, ha.p99);
                ratio(r3, sizeof(r3), r.cpu_us, ha.cpu_us);
            }
            printf("| %s | %.0f | %.1f | %.1f | %.1f | %.1f | %llu | %s | %.2f | %s | %s | %s |\n",
                   path_label[p], r.rps, r.mib_s, r.p50, r.p99, r.p999,
                   (unsigned long long)r.errors, cpu, r.client_cpu_us, r1, r2, r3);
        }
    }
}

static void print_open(const suite *s)
{
    printf("\n#### Open loop: latency at offered loads, %llu-byte requests, %u connections\n\n",
           (unsigned long long)s->sizes[0], s->conns);
    printf("p50 / p99 µs, counted from when each request was due; \"achieved\" is the req/s "
           "completed.\n\n| offered req/s |");
    for (int p = 0; p < N_PATHS; p++)
        printf(" %s |", path_label[p]);
    printf("\n|--:|");
    for (int p = 0; p < N_PATHS; p++)
        printf("--:|");
    printf("\n");
    for (int k = 0; k < s->n_rates; k++) {
        printf("| %.0f |", s->offered[k]);
        for (int p = 0; p < N_PATHS; p++) {
            const run *r = &s->open[k][p];
            if (!r->ok)
                printf(" %s |", s->skip[p] ? "skipped" : "failed");
            else
                printf(" %.1f / %.1f (achieved %.0f%s) |", r->p50, r->p99, r->rps,
                       r->errors ? ", errors" : "");
        }
        printf("\n");
    }
}

static void write_json(const suite *s)
{
    FILE *f = fopen(s->json, "w");
    if (f == NULL) {
        fprintf(stderr, "spoke-bench proxy: %s: %s\n", s->json, strerror(errno));
        return;
    }
    fprintf(f, "{\"conns\":%u,\"duration_s\":%.3f,\"warmup_s\":%.3f,\"rounds\":%d,"
               "\"rate_duration_s\":%.3f,\"closed\":[",
            s->conns, s->duration_s, s->warmup_s, s->rounds, s->rate_duration_s);
    bool first = true;
    for (int z = 0; z < s->n_sizes; z++)
        for (int p = 0; p < N_PATHS; p++)
            for (int r = 0; r < s->rounds; r++) {
                const run *x = &s->closed[z][p][r];
                if (!x->ok)
                    continue;
                fprintf(f, "%s{\"path\":\"%s\",\"size\":%llu,\"round\":%d,\"rps\":%.1f,"
                           "\"mib_s\":%.3f,\"p50_us\":%.2f,\"p99_us\":%.2f,\"p999_us\":%.2f,"
                           "\"errors\":%llu,\"proxy_cpu_us_per_req\":%.3f,"
                           "\"client_cpu_us_per_req\":%.3f}",
                        first ? "" : ",", path_key[p], (unsigned long long)s->sizes[z], r + 1,
                        x->rps, x->mib_s, x->p50, x->p99, x->p999,
                        (unsigned long long)x->errors, x->cpu_us, x->client_cpu_us);
                first = false;
            }
    fprintf(f, "],\"open\":[");
    first = true;
    for (int k = 0; k < s->n_rates; k++)
        for (int p = 0; p < N_PATHS; p++) {
            const run *x = &s->open[k][p];
            if (!x->ok)
                continue;
            fprintf(f, "%s{\"path\":\"%s\",\"size\":%llu,\"offered_rps\":%.0f,"
                       "\"achieved_rps\":%.1f,\"p50_us\":%.2f,\"p99_us\":%.2f,\"p999_us\":%.2f,"
                       "\"errors\":%llu}",
                    first ? "" : ",", path_key[p], (unsigned long long)s->sizes[0],
                    s->offered[k], x->rps, x->p50, x->p99, x->p999,
                    (unsigned long long)x->errors);
            first = false;
        }
    fprintf(f, "]}\n");
    fclose(f);
}

/* PREFIX.dat (one block per path: offered, p50, p99), PREFIX.gp, then gnuplot draws
 * PREFIX.png and PREFIX.svg. Returns 0 or -1. */
static int write_plot(const suite *s)
{
    char dat[600], gp[600];
    snprintf(dat, sizeof(dat), "%s.dat", s->plot);
    snprintf(gp, sizeof(gp), "%s.gp", s->plot);
    FILE *f = fopen(dat, "w");
    if (f == NULL) {
        fprintf(stderr, "spoke-bench proxy: %s: %s\n", dat, strerror(errno));
        return -1;
    }
    fprintf(f, "# spoke-bench proxy: open-loop latency, %llu-byte requests, %u connections\n"
               "# offered_rps p50_us p99_us, one block per path: %s %s %s %s %s\n",
            (unsigned long long)s->sizes[0], s->conns, path_key[0], path_key[1], path_key[2],
            path_key[3], path_key[4]);
    for (int p = 0; p < N_PATHS; p++) {
        fprintf(f, "# %s\n", path_key[p]);
        for (int k = 0; k < s->n_rates; k++)
            if (s->open[k][p].ok)
                fprintf(f, "%.0f %.2f %.2f\n", s->offered[k], s->open[k][p].p50,
                        s->open[k][p].p99);
        fprintf(f, "\n\n");
    }
    fclose(f);
    const char *base = strrchr(dat, '/') ? strrchr(dat, '/') + 1 : dat;
    f = fopen(gp, "w");
    if (f == NULL)
        return -1;
    fprintf(f, "# gnuplot script written by spoke-bench proxy --plot (run from this directory)\n"
               "set title \"Proxy latency against offered load (%llu B requests, %u connections,"
               " open loop)\"\n"
               "set xlabel \"offered load (requests/s)\"\n"
               "set ylabel \"latency (us, log scale): solid p99, dashed p50\"\n"
               "set logscale y\nset key below\nset grid\n",
            (unsigned long long)s->sizes[0], s->conns);
    const char *png = strrchr(s->plot, '/') ? strrchr(s->plot, '/') + 1 : s->plot;
    for (int t = 0; t < 2; t++) {
        if (t == 0)
            fprintf(f, "set terminal pngcairo size 1000,680\nset output \"%s.png\"\n", png);
        else
            fprintf(f, "set terminal svg size 1000,680 dynamic\nset output \"%s.svg\"\n", png);
        fprintf(f, "plot ");
        for (int p = 0; p < N_PATHS; p++)
            fprintf(f, "\"%s\" index %d using 1:3 with linespoints lw 2 lc %d title \"%s p99\", "
                       "\"%s\" index %d using 1:2 with linespoints dt 2 lc %d notitle%s",
                    base, p, p + 1, path_label[p], base, p, p + 1, p + 1 < N_PATHS ? ", \\\n  " : "\n");
    }
    fclose(f);
    char dir[600];
    snprintf(dir, sizeof(dir), "%s", s->plot);
    char *slash = strrchr(dir, '/');
    if (slash != NULL)
        *slash = '\0';
    else
        snprintf(dir, sizeof(dir), ".");
    char cmd[2000];
    snprintf(cmd, sizeof(cmd), "cd '%s' && gnuplot '%s.gp'", dir, png);
    int rc = system(cmd);
    if (rc != 0) {
        fprintf(stderr, "spoke-bench proxy: gnuplot failed (exit %d): %s\n", rc, cmd);
        return -1;
    }
    return 0;
}

static int parse_list(const char *text, double *out, int cap)
{
    int n = 0;
    const char *p = text;
    while (*p && n < cap) {
        char *end;
        double v = strtod(p, &end);
        if (end == p || v <= 0)
            return -1;
        out[n++] = v;
        p = *end == ',' ? end + 1 : end;
        if (*end != ',' && *end != '\0')
            return -1;
    }
    return n;
}

static void suite_usage(FILE *f) { spk_bench_proxy_usage(f); }

int spk_bench_proxy_suite(int argc, char **argv)
{
    suite *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return 1;
    s->conns = 64;
    s->duration_s = 5;
    s->warmup_s = 1;
    s->rate_duration_s = 3;
    s->rounds = 1;
    s->n_sizes = 2;
    s->sizes[0] = 128;
    s->sizes[1] = 16384;
    s->n_rates = 5;
    const double pct[] = {10, 30, 50, 70, 90};
    memcpy(s->rate_pct, pct, sizeof(pct));
    s->haproxy = "/usr/sbin/haproxy";
    const char *bin_dir = NULL;
    static const struct option opts[] = {
        {"sizes", required_argument, NULL, 'S'},     {"conns", required_argument, NULL, 'c'},
        {"duration", required_argument, NULL, 'd'},  {"warmup", required_argument, NULL, 'w'},
        {"rounds", required_argument, NULL, 'R'},    {"rates", required_argument, NULL, 'r'},
        {"rates-abs", required_argument, NULL, 'A'}, {"rate-duration", required_argument, NULL, 'D'},
        {"bin-dir", required_argument, NULL, 'b'},   {"json", required_argument, NULL, 'j'},
        {"plot", required_argument, NULL, 'P'},      {"haproxy", required_argument, NULL, 'H'},
        {NULL, 0, NULL, 0},
    };
    int c;
    uint64_t v;
    double list[MAX_RATES];
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        int n;
        switch (c) {
        case 'S':
            n = parse_list(optarg, list, MAX_SIZES);
            if (n <= 0)
                goto bad;
            s->n_sizes = n;
            for (int i = 0; i < n; i++)
                s->sizes[i] = (uint64_t)list[i];
            break;
        case 'c':
            if (spk_bench_parse_uint(optarg, 1, 100000, &v) != 0)
                goto bad;
            s->conns = (unsigned)v;
            break;
        case 'd':
            if (spk_bench_parse_duration(optarg, 0, &s->duration_s) != 0)
                goto bad;
            break;
        case 'w':
            if (spk_bench_parse_duration(optarg, 1, &s->warmup_s) != 0)
                goto bad;
            break;
        case 'D':
            if (spk_bench_parse_duration(optarg, 0, &s->rate_duration_s) != 0)
                goto bad;
            break;
        case 'R':
            if (spk_bench_parse_uint(optarg, 1, MAX_ROUNDS, &v) != 0)
                goto bad;
            s->rounds = (int)v;
            break;
        case 'r':
        case 'A':
            n = parse_list(optarg, c == 'r' ? s->rate_pct : s->rate_abs, MAX_RATES);
            if (n <= 0)
                goto bad;
            s->n_rates = n;
            s->rates_absolute = c == 'A';
            break;
        case 'b': bin_dir = optarg; break;
        case 'j': s->json = optarg; break;
        case 'P': s->plot = optarg; break;
        case 'H': s->haproxy = optarg; break;
        default:
            suite_usage(stderr);
            free(s);
            return 1;
        }
        continue;
    bad:
        fprintf(stderr, "spoke-bench proxy: bad value '%s' (see spoke-bench help)\n", optarg);
        free(s);
        return 1;
    }
    if (bin_dir != NULL)
        snprintf(s->self_dir, sizeof(s->self_dir), "%s", bin_dir);
    else if (spk_bench_self_dir(s->self_dir, sizeof(s->self_dir)) != 0) {
        free(s);
        return 1;
    }
    spk_bench_raise_nofile();
    if (spk_bench_install_signals() != 0) {
        free(s);
        return 1;
    }
    snprintf(s->dir, sizeof(s->dir), "/tmp/spoke-bench-proxy.XXXXXX");
    if (mkdtemp(s->dir) == NULL) {
        fprintf(stderr, "spoke-bench proxy: mkdtemp: %s\n", strerror(errno));
        free(s);
        return 1;
    }
    int rc = 0;
    int eport = spk_bench_free_port();
    snprintf(s->echo_text, sizeof(s->echo_text), "127.0.0.1:%d", eport);
    s->echo_pid = spk_bench_echo_start(s->echo_text, &s->echo_addr);
    if (s->echo_pid < 0) {
        rc = 1;
        goto out;
    }
    snprintf(s->addr[P_DIRECT], sizeof(s->addr[0]), "%s", s->echo_text);
    if (access(s->haproxy, X_OK) != 0)
        s->skip[P_HAPROXY] = "haproxy is not installed (apt-get install haproxy)";
    else if (start_haproxy(s) != 0)
        s->skip[P_HAPROXY] = "HAProxy did not start";
    for (int p = P_SPOKED0; p < N_PATHS; p++)
        if (start_spoked(s, p) != 0)
            s->skip[p] = "spoked did not start";

    fprintf(stderr, "spoke-bench proxy: %d round(s) x %d size(s) x %d paths of %.0f s, then %d "
                    "offered loads x %d paths of %.0f s\n",
            s->rounds, s->n_sizes, N_PATHS, s->duration_s + s->warmup_s, s->n_rates, N_PATHS,
            s->rate_duration_s + 0.5);
    for (int r = 0; r < s->rounds && !spk_bench_stop; r++)
        for (int z = 0; z < s->n_sizes && !spk_bench_stop; z++)
            for (int i = 0; i < N_PATHS && !spk_bench_stop; i++) {
                int p = (i + r) % N_PATHS;
                if (s->skip[p] != NULL)
                    continue;
                fprintf(stderr, "spoke-bench proxy: round %d/%d, %llu B, %s\n", r + 1, s->rounds,
                        (unsigned long long)s->sizes[z], path_key[p]);
                if (one_run(s, p, s->sizes[z], 0, s->duration_s, s->warmup_s,
                            &s->closed[z][p][r]) != 0)
                    rc = 2;
                if (s->closed[z][p][r].errors > 0)
                    rc = 2;
            }
    /* The offered loads: percentages of HAProxy's closed-loop req/s (else the fastest
     * proxy's), measured above. */
    double base = 0;
    const run *hb = median_run(s, 0, P_HAPROXY);
    for (int p = P_HAPROXY; p < N_PATHS && hb == NULL; p++)
        hb = median_run(s, 0, p);
    if (hb != NULL)
        base = hb->rps;
    for (int k = 0; k < s->n_rates; k++)
        s->offered[k] = s->rates_absolute ? s->rate_abs[k] : base * s->rate_pct[k] / 100.0;
    for (int k = 0; k < s->n_rates && !spk_bench_stop; k++) {
        if (s->offered[k] < 1)
            continue;
        for (int i = 0; i < N_PATHS && !spk_bench_stop; i++) {
            int p = (i + k) % N_PATHS;
            if (s->skip[p] != NULL)
                continue;
            fprintf(stderr, "spoke-bench proxy: open loop %.0f req/s, %s\n", s->offered[k],
                    path_key[p]);
            if (one_run(s, p, s->sizes[0], s->offered[k], s->rate_duration_s, 0.5,
                        &s->open[k][p]) != 0)
                rc = 2;
        }
    }
    char hv[128] = "?";
    if (s->skip[P_HAPROXY] == NULL) {
        char cmd[700];
        snprintf(cmd, sizeof(cmd), "'%s' -v 2>/dev/null | head -1", s->haproxy);
        FILE *pf = popen(cmd, "r");
        if (pf != NULL) {
            if (fgets(hv, sizeof(hv), pf) != NULL)
                hv[strcspn(hv, "\n")] = '\0';
            pclose(pf);
        }
    }
    printf("- load: spoke-bench proxy's load generator, %u connections, one client thread, "
           "request/response round trips checked byte for byte; closed loop %.1f s after %.1f s "
           "warmup per run, %d round(s) interleaved (each round starts one path later; each row "
           "is the round with the median req/s); open loop %.1f s after 0.5 s per offered load\n",
           s->conns, s->duration_s, s->warmup_s, s->rounds, s->rate_duration_s);
    printf("- upstream: spoke-bench echo, one thread; all on 127.0.0.1\n");
    printf("- spoked: `listen.workers: 1`, `log.level: warn`, N passthrough plugins; HAProxy: "
           "%s, `mode tcp`, `nbthread 1`\n", hv);
    printf("- proxy CPU µs/req: user + system CPU of the proxy's processes during the run "
           "(warmup included) over the requests completed; client CPU µs/req: the same for "
           "the load generator (getrusage)\n");
    print_closed(s);
    print_open(s);
    if (s->plot != NULL && write_plot(s) != 0)
        rc = rc ? rc : 2;
    if (s->json != NULL)
        write_json(s);
out:
    for (int p = 0; p < N_PATHS; p++)
        stop_pid(s->pid[p]);
    if (s->echo_pid > 0)
        spk_bench_echo_stop(s->echo_pid, &s->echo_addr);
    char cmd[200];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", s->dir);
    if (system(cmd) != 0)
        fprintf(stderr, "spoke-bench proxy: could not remove %s\n", s->dir);
    free(s);
    return rc;
}
