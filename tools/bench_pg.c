/*
 * bench_pg.c -- `spoke-bench pg`: pgbench's select-only load through four paths, in one
 * run, against one throwaway PostgreSQL cluster:
 *
 *   direct      pgbench -> postgres
 *   pgbouncer   pgbench -> Debian's pgbouncer (session pooling) -> postgres
 *   query-log   pgbench -> spoked with pg-query-log -> postgres
 *   cache warm  pgbench -> spoked with pg-cache -> postgres, after a warm-up run that
 *               leaves every key cached (spoked is restarted in between: the cache is in
 *               its KV store and survives)
 *
 * It makes everything itself in a temporary directory: initdb and postgres (as `nobody`
 * when run as root: postgres and pgbouncer refuse root), `pgbench -i`, a pgbouncer.ini,
 * spoked configs. The load is pgbench's built-in select-only transaction, except that
 * the account is drawn from 1..--keys (default 1000) so that a warm cache can hold every
 * key: `\set aid random(1, KEYS)` then `SELECT abalance FROM pgbench_accounts WHERE aid =
 * :aid;`, with -M simple (pg-cache caches the simple protocol only). Per path it prints
 * pgbench's tps (without connection time) and average latency, the CPU time the process
 * in the middle (pgbouncer; spoked's supervisor, workers and uplink) used per transaction
 * (from /proc/PID/stat: steadier than throughput on a shared machine), and for pg-cache
 * the hits and misses of the measured run (from the plugin's `edge totals` log lines).
 */
#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

#define PG_USER "spoke"

typedef struct pgb {
    char dir[256], self_dir[512], bindir[256];
    int pg_port, bouncer_port, edge_port;
    pid_t pg_pid, bouncer_pid, spoked_pid;
    uid_t uid;
    gid_t gid;
    int as_other; /* run postgres and pgbouncer as `nobody` */
    unsigned clients, jobs, workers, keys, scale;
    double duration_s;
} pgb;

typedef struct result {
    double tps, latency_ms;
    double cpu_us; /* the middle process's CPU time per transaction; 0 when none */
    long long hits, misses;
    int ok;
} result;

/* Start argv (as b's other user when `other`), stdout and stderr into `log` (NULL: keep). */
static pid_t spawn(const pgb *b, char *const argv[], const char *log, int other)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    if (log != NULL) {
        FILE *f = freopen(log, "a", stdout);
        (void)f;
        dup2(STDOUT_FILENO, STDERR_FILENO);
    }
    if (other && b->as_other &&
        (setgroups(0, NULL) != 0 || setgid(b->gid) != 0 || setuid(b->uid) != 0)) {
        fprintf(stderr, "spoke-bench: cannot become nobody: %s\n", strerror(errno));
        _exit(127);
    }
    execvp(argv[0], argv);
    fprintf(stderr, "spoke-bench: exec %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

static int wait_exit(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static int run(const pgb *b, char *const argv[], const char *log, int other)
{
    pid_t pid = spawn(b, argv, log, other);
    return pid < 0 ? -1 : wait_exit(pid);
}

static void stop(pid_t *pid, int sig)
{
    if (*pid <= 0)
        return;
    kill(*pid, sig);
    wait_exit(*pid);
    *pid = 0;
}

static void path(const pgb *b, char *out, size_t cap, const char *name)
{
    snprintf(out, cap, "%s/%s", b->dir, name);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* psql -c `sql` against port; 0 when it succeeded. */
static int psql(const pgb *b, int port, const char *sql)
{
    char p[16], log[300];
    snprintf(p, sizeof(p), "%d", port);
    path(b, log, sizeof(log), "psql.log");
    char *argv[] = {"psql", "-X",    "-q", "-h",       "127.0.0.1", "-p",        p,
                    "-U",   PG_USER, "-d", "postgres", "-c",        (char *)sql, NULL};
    return run(b, argv, log, 0);
}

static int wait_ready(const pgb *b, int port, const char *what)
{
    for (int i = 0; i < 300; i++) {
        if (psql(b, port, "SELECT 1") == 0)
            return 0;
        sleep_ms(50);
    }
    fprintf(stderr, "spoke-bench: %s on port %d did not answer within 15 s (logs in %s)\n", what,
            port, b->dir);
    return -1;
}

static int write_file(const pgb *b, const char *name, const char *text)
{
    char p[300];
    path(b, p, sizeof(p), name);
    FILE *f = fopen(p, "w");
    if (f == NULL || fputs(text, f) < 0) {
        fprintf(stderr, "spoke-bench: cannot write %s: %s\n", p, strerror(errno));
        if (f != NULL)
            fclose(f);
        return -1;
    }
    fclose(f);
    return 0;
}

static int start_postgres(pgb *b)
{
    char data[300], sock[300], log[300], port[16], initlog[300];
    path(b, data, sizeof(data), "data");
    path(b, sock, sizeof(sock), "sock");
    path(b, log, sizeof(log), "postgres.log");
    path(b, initlog, sizeof(initlog), "initdb.log");
    mkdir(sock, 0755);
    if (b->as_other && chown(sock, b->uid, b->gid) != 0)
        return -1;
    char initdb[300], postgres[300];
    snprintf(initdb, sizeof(initdb), "%s/initdb", b->bindir);
    snprintf(postgres, sizeof(postgres), "%s/postgres", b->bindir);
    char *iargv[] = {initdb, "-D",   data,         "-U",        PG_USER, "--auth=trust",
                     "-E",   "UTF8", "--locale=C", "--no-sync", NULL};
    if (run(b, iargv, initlog, 1) != 0) {
        fprintf(stderr, "spoke-bench: initdb failed (see %s)\n", initlog);
        return -1;
    }
    snprintf(port, sizeof(port), "%d", b->pg_port);
    /* clang-format off */
    char *pargv[] = {postgres, "-D", data, "-k", sock, "-h", "127.0.0.1", "-p", port,
                     "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "max_connections=200", NULL};
    /* clang-format on */
    if ((b->pg_pid = spawn(b, pargv, log, 1)) < 0)
        return -1;
    return wait_ready(b, b->pg_port, "postgres");
}

static int start_pgbouncer(pgb *b)
{
    char ini[2048];
    snprintf(ini, sizeof(ini),
             "[databases]\npostgres = host=127.0.0.1 port=%d dbname=postgres\n"
             "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = %d\nunix_socket_dir =\n"
             "auth_type = trust\nauth_file = %s/userlist.txt\npool_mode = session\n"
             "max_client_conn = 500\ndefault_pool_size = %u\nlogfile = %s/pgbouncer.log\n"
             "pidfile = %s/pgbouncer.pid\n",
             b->pg_port, b->bouncer_port, b->dir, b->clients + 4, b->dir, b->dir);
    if (write_file(b, "pgbouncer.ini", ini) != 0 ||
        write_file(b, "userlist.txt", "\"" PG_USER "\" \"\"\n") != 0)
        return -1;
    char p[300];
    path(b, p, sizeof(p), "pgbouncer.ini");
    char *argv[] = {"pgbouncer", "-q", p, NULL};
    if ((b->bouncer_pid = spawn(b, argv, NULL, 1)) < 0)
        return -1;
    return wait_ready(b, b->bouncer_port, "pgbouncer");
}

/* spoked in front of postgres with one plugin entry; its KV store persists in dir/kv. */
static int start_spoked(pgb *b, const char *plugin)
{
    char cfg[2048];
    snprintf(cfg, sizeof(cfg),
             "edge: { id: bench-edge }\nuser: \"%s\"\n"
             "listen: { address: 127.0.0.1:%d, upstream: 127.0.0.1:%d, workers: %u }\n"
             "run_dir: %s/run\nqueue: { path: %s/queue }\nkv: { path: %s/kv }\n"
             "plugins:\n  dir: %s/plugins\n  list:\n    - %s\n",
             spk_bench_run_as(), b->edge_port, b->pg_port, b->workers, b->dir, b->dir, b->dir,
             b->self_dir, plugin);
    if (write_file(b, "spoke.yaml", cfg) != 0)
        return -1;
    char spoked[600], conf[300], log[300];
    snprintf(spoked, sizeof(spoked), "%s/spoked", b->self_dir);
    path(b, conf, sizeof(conf), "spoke.yaml");
    path(b, log, sizeof(log), "spoked.log");
    char *argv[] = {spoked, "-c", conf, NULL};
    if ((b->spoked_pid = spawn(b, argv, log, 0)) < 0)
        return -1;
    return wait_ready(b, b->edge_port, "spoked");
}

/* The last "edge totals: hits=H misses=M" pg-cache logged. */
static int last_totals(const pgb *b, long long *hits, long long *misses)
{
    char p[300], line[1024];
    path(b, p, sizeof(p), "spoked.log");
    FILE *f = fopen(p, "r");
    if (f == NULL)
        return -1;
    int found = -1;
    while (fgets(line, sizeof(line), f) != NULL) {
        const char *t = strstr(line, "edge totals: hits=");
        if (t != NULL && sscanf(t, "edge totals: hits=%lld misses=%lld", hits, misses) == 2)
            found = 0;
    }
    fclose(f);
    return found;
}

/* User + system CPU time of pid, in microseconds (/proc/PID/stat); 0 when it is gone. */
static double cpu_us_of(pid_t pid)
{
    char p[64], buf[1024];
    snprintf(p, sizeof(p), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(p, "r");
    if (f == NULL)
        return 0;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *c = strrchr(buf, ')'); /* the name may hold spaces */
    unsigned long long ut = 0, st = 0;
    if (c == NULL ||
        sscanf(c + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return 0;
    return (double)(ut + st) * 1e6 / (double)sysconf(_SC_CLK_TCK);
}

/* CPU time of pid and its children (spoked: the supervisor, its workers, the uplink). */
static double cpu_us_tree(pid_t pid)
{
    if (pid <= 0)
        return 0;
    double us = cpu_us_of(pid);
    char p[64];
    snprintf(p, sizeof(p), "/proc/%d/task/%d/children", (int)pid, (int)pid);
    FILE *f = fopen(p, "r");
    int child;
    while (f != NULL && fscanf(f, "%d", &child) == 1)
        us += cpu_us_of(child);
    if (f != NULL)
        fclose(f);
    return us;
}

/* One pgbench run; its tps and latency from its output; the CPU time `middle` (and its
 * children) used per transaction meanwhile. */
static int pgbench(const pgb *b, int port, const char *label, unsigned transactions, pid_t middle,
                   result *r)
{
    double cpu0 = cpu_us_tree(middle);
    char p[16], c[16], j[16], t[32], script[300], out[300];
    snprintf(p, sizeof(p), "%d", port);
    snprintf(c, sizeof(c), "%u", b->clients);
    snprintf(j, sizeof(j), "%u", b->jobs);
    path(b, script, sizeof(script), "select.sql");
    snprintf(out, sizeof(out), "%s/pgbench-%s.txt", b->dir, label);
    unlink(out);
    char *argv[16] = {"pgbench", "-n", "-M", "simple",    "-f", script, "-c", c,
                      "-j",      j,    "-h", "127.0.0.1", "-p", p,      "-U", PG_USER};
    char *full[20];
    memcpy(full, argv, sizeof(argv));
    if (transactions > 0) {
        snprintf(t, sizeof(t), "%u", transactions);
        full[16] = "-t";
    } else {
        snprintf(t, sizeof(t), "%.0f", b->duration_s);
        full[16] = "-T";
    }
    full[17] = t;
    full[18] = "postgres";
    full[19] = NULL;
    int rc = run(b, full, out, 0);
    double cpu = cpu_us_tree(middle) - cpu0;
    memset(r, 0, sizeof(*r));
    FILE *f = fopen(out, "r");
    char line[512];
    while (f != NULL && fgets(line, sizeof(line), f) != NULL) {
        sscanf(line, "latency average = %lf ms", &r->latency_ms);
        if (strncmp(line, "tps = ", 6) == 0 && strstr(line, "without initial") != NULL)
            sscanf(line, "tps = %lf", &r->tps);
    }
    if (f != NULL)
        fclose(f);
    r->ok = rc == 0 && r->tps > 0;
    long long done = 0;
    f = fopen(out, "r");
    while (f != NULL && fgets(line, sizeof(line), f) != NULL)
        if (sscanf(line, "number of transactions actually processed: %lld", &done) == 1)
            break;
    if (f != NULL)
        fclose(f);
    if (middle > 0 && done > 0)
        r->cpu_us = cpu / (double)done;
    if (!r->ok)
        fprintf(stderr, "spoke-bench: pgbench %s failed (exit %d; see %s)\n", label, rc, out);
    return r->ok ? 0 : -1;
}

static void usage(FILE *f)
{
    fprintf(f, "  pg [--duration 10s] [--clients 8] [--jobs 2] [--workers 2] [--keys 1000]\n"
               "     [--scale 1] [--bindir /usr/lib/postgresql/15/bin] [--keep]\n"
               "      pgbench select-only through: direct, pgbouncer, spoked + pg-query-log,\n"
               "      spoked + pg-cache (warm); starts its own PostgreSQL and pgbouncer\n");
}

void spk_bench_pg_usage(FILE *f)
{
    usage(f);
}

static void print_row(const char *name, const result *r)
{
    printf("%-28s %10.0f %12.3f", name, r->tps, r->latency_ms);
    if (r->cpu_us > 0)
        printf(" %14.1f", r->cpu_us);
    else
        printf(" %14s", "-");
    if (r->hits + r->misses > 0)
        printf("   hits %lld misses %lld", r->hits, r->misses);
    printf("\n");
}

int spk_bench_pg(int argc, char **argv)
{
    pgb b = {.clients = 8, .jobs = 2, .workers = 2, .keys = 1000, .scale = 1, .duration_s = 10};
    snprintf(b.bindir, sizeof(b.bindir), "/usr/lib/postgresql/15/bin");
    int keep = 0;
    static const struct option opts[] = {{"duration", 1, NULL, 'd'}, {"clients", 1, NULL, 'c'},
                                         {"jobs", 1, NULL, 'j'},     {"workers", 1, NULL, 'w'},
                                         {"keys", 1, NULL, 'k'},     {"scale", 1, NULL, 's'},
                                         {"bindir", 1, NULL, 'b'},   {"keep", 0, NULL, 'K'},
                                         {"help", 0, NULL, 'h'},     {NULL, 0, NULL, 0}};
    int o;
    uint64_t v;
    optind = 1;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        int bad = 0;
        switch (o) {
        case 'd':
            bad = spk_bench_parse_duration(optarg, 0, &b.duration_s);
            break;
        case 'c':
            bad = spk_bench_parse_uint(optarg, 1, 150, &v);
            b.clients = (unsigned)v;
            break;
        case 'j':
            bad = spk_bench_parse_uint(optarg, 1, 64, &v);
            b.jobs = (unsigned)v;
            break;
        case 'w':
            bad = spk_bench_parse_uint(optarg, 1, 64, &v);
            b.workers = (unsigned)v;
            break;
        case 'k':
            bad = spk_bench_parse_uint(optarg, 1, 100000, &v);
            b.keys = (unsigned)v;
            break;
        case 's':
            bad = spk_bench_parse_uint(optarg, 1, 100, &v);
            b.scale = (unsigned)v;
            break;
        case 'b':
            snprintf(b.bindir, sizeof(b.bindir), "%s", optarg);
            break;
        case 'K':
            keep = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 1;
        }
        if (bad) {
            fprintf(stderr, "spoke-bench pg: bad value '%s'\n", optarg);
            return 1;
        }
    }
    if (b.jobs > b.clients)
        b.jobs = b.clients;
    if (spk_bench_self_dir(b.self_dir, sizeof(b.self_dir)) != 0)
        return 1;
    snprintf(b.dir, sizeof(b.dir), "/tmp/spoke-bench-pg.XXXXXX");
    if (mkdtemp(b.dir) == NULL || chmod(b.dir, 0755) != 0) {
        fprintf(stderr, "spoke-bench pg: cannot make a temporary directory: %s\n", strerror(errno));
        return 1;
    }
    if (geteuid() == 0) {
        struct passwd *pw = getpwnam("nobody");
        if (pw == NULL) {
            fprintf(stderr, "spoke-bench pg: running as root and there is no user 'nobody' "
                            "to run postgres and pgbouncer as\n");
            return 1;
        }
        b.as_other = 1;
        b.uid = pw->pw_uid;
        b.gid = pw->pw_gid;
        if (chown(b.dir, b.uid, b.gid) != 0)
            return 1;
    }
    b.pg_port = spk_bench_free_port();
    b.bouncer_port = spk_bench_free_port();
    b.edge_port = spk_bench_free_port();
    signal(SIGPIPE, SIG_IGN);

    char script[200], init_scale[16], port[16], initlog[300];
    snprintf(script, sizeof(script),
             "\\set aid random(1, %u)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n",
             b.keys);
    snprintf(init_scale, sizeof(init_scale), "%u", b.scale);
    result rd = {0}, rb = {0}, rl = {0}, rc = {0}, warm = {0};
    int status = 1;
    if (write_file(&b, "select.sql", script) != 0 || start_postgres(&b) != 0)
        goto out;
    snprintf(port, sizeof(port), "%d", b.pg_port);
    path(&b, initlog, sizeof(initlog), "pgbench-init.log");
    char *iargv[] = {"pgbench", "-i", "-q", "-s",    init_scale, "-h", "127.0.0.1",
                     "-p",      port, "-U", PG_USER, "postgres", NULL};
    if (run(&b, iargv, initlog, 0) != 0) {
        fprintf(stderr, "spoke-bench pg: pgbench -i failed (see %s)\n", initlog);
        goto out;
    }
    printf("spoke-bench pg: pgbench -M simple -c %u -j %u -T %.0f, select-only over %u keys "
           "(scale %u); spoked with %u workers\n",
           b.clients, b.jobs, b.duration_s, b.keys, b.scale, b.workers);
    fflush(stdout);
    if (pgbench(&b, b.pg_port, "direct", 0, 0, &rd) != 0)
        goto out;
    if (start_pgbouncer(&b) != 0 ||
        pgbench(&b, b.bouncer_port, "pgbouncer", 0, b.bouncer_pid, &rb) != 0)
        goto out;
    stop(&b.bouncer_pid, SIGINT);
    if (start_spoked(&b, "{ name: pg-query-log, file: pg-query-log.so }") != 0 ||
        pgbench(&b, b.edge_port, "query-log", 0, b.spoked_pid, &rl) != 0)
        goto out;
    stop(&b.spoked_pid, SIGTERM);
    const char *cache = "{ name: pg-cache, id: 42, file: pg-cache.so, "
                        "config: { ttl: 1h, max_bytes: 256MiB, report_interval: 1s } }";
    /* warm-up: every key many times over; spoked stops (the cache stays in its KV) */
    if (start_spoked(&b, cache) != 0 ||
        pgbench(&b, b.edge_port, "warm-up", b.keys * 8 / b.clients + 1, 0, &warm) != 0)
        goto out;
    stop(&b.spoked_pid, SIGTERM);
    long long h0 = 0, m0 = 0, h1 = 0, m1 = 0;
    last_totals(&b, &h0, &m0);
    if (start_spoked(&b, cache) != 0 ||
        pgbench(&b, b.edge_port, "cache", 0, b.spoked_pid, &rc) != 0)
        goto out;
    stop(&b.spoked_pid, SIGTERM);
    if (last_totals(&b, &h1, &m1) == 0) {
        rc.hits = h1 - h0;
        rc.misses = m1 - m0;
    }
    printf("%-28s %10s %12s %14s\n", "path", "tps", "latency ms", "proxy CPU us/tx");
    print_row("direct", &rd);
    print_row("pgbouncer (session)", &rb);
    print_row("spoked + pg-query-log", &rl);
    print_row("spoked + pg-cache (warm)", &rc);
    status = 0;
out:
    stop(&b.spoked_pid, SIGTERM);
    stop(&b.bouncer_pid, SIGINT);
    stop(&b.pg_pid, SIGINT);
    if (keep || status != 0) {
        printf("files kept in %s\n", b.dir);
    } else {
        char *argv_rm[] = {"rm", "-rf", b.dir, NULL};
        run(&b, argv_rm, NULL, 0);
    }
    return status;
}
