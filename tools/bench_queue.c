/*
 * bench_queue.c -- `spoke-bench queue`: throughput of the durable queue, beside the
 * reference design's way of doing the same work (one SQLite insert per payload, WAL).
 *
 * For each payload size (256 B, 4 KiB), durability policy and process count (1, 2) it
 * runs, each in a fresh directory:
 *   lmdb       send_to_control below the plugin's context as spoked runs it
 *              (spk_host_queue_send: the host's policy, then the queue's journal)
 *   sqlite     INSERT of (plugin, ts, correlation, metadata, payload) in autocommit mode,
 *              journal_mode=WAL, synchronous=NORMAL beside the interval policy and
 *              synchronous=FULL beside `always`
 * Writers are forked processes that each open their own handle after fork, as workers
 * do; they append to the queue's journal. A further process plays spoked's supervisor:
 * it polls spk_queue_sync_due() every SPK_QUEUE_SYNC_POLL_MS and calls spk_queue_sync()
 * (move the journal into LMDB, flush, free journal space) when it says so. With `always`
 * each append is flushed before it returns (group commit, queue/journal.c). enq/s is all writers' calls over the wall
 * time of the run, and for the spoke rows that wall time ends only after a last
 * spk_queue_sync() has moved every record into LMDB and flushed it: the deferred work is
 * counted. ns/call is the mean latency of one call as a writer sees it. When --dir is on
 * a block device, each row also says what that device did during the timed pass: bytes
 * written per enqueue and the share of the time it was busy (its io_ticks counter, which
 * counts every process's I/O on it: run on an otherwise idle disk).
 *
 * Beside them, per size and policy, the ceiling: what the disk under --dir does itself
 * for the same bytes, one process writing records of that size (plus the queue's 56 bytes
 * of headers) back to back in a preallocated file -- `always`: one pwrite() and one
 * fdatasync() per record; interval: the records gathered in 1 MiB writes, fdatasync()
 * every 100 ms -- no queue, no encoding, no index. It is measured just before and just
 * after the rows of its size and policy (the mean of both is the ceiling), and every row
 * is reported as a fraction of it, beside its ratio to SQLite.
 *
 * Then the hot path as a plugin sees it: host->send_to_control() from the host's own
 * services table (core/host.c), called on behalf of a plugin set up as the loader sets it
 * up, in one process, interval policy: the mean and the median of batches.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "host.h"
#include "host.h"
#include "loader.h"
#include "queue.h"

enum store { ST_LMDB, ST_SQLITE };
static const char *store_name[] = {"lmdb", "sqlite"};

typedef struct bq_case {
    enum store store;
    bool always;
    size_t size;
    int procs;
    uint64_t ops;      /* per process */
    uint64_t warm_ops; /* per process, untimed, then deleted; 0 = a fresh store */
} bq_case;

typedef struct bq_result {
    double rate;   /* enqueues per second, all processes */
    double ns;     /* mean ns per call */
    uint64_t errors;
    bool disk;          /* the disk figures below were read */
    double disk_bytes;  /* bytes the disk wrote per enqueue, during the timed pass */
    double disk_busy;   /* share of the timed pass the disk was busy (io_ticks), 0..1 */
} bq_result;

/* The counters of the block device that holds --dir (/sys/dev/block/MAJ:MIN/stat, the
 * kernel's Documentation/block/stat.rst): what the disk did while a pass ran. */
typedef struct disk_stat {
    uint64_t sectors_written; /* field 7, 512-byte units */
    uint64_t io_ticks_ms;     /* field 10: ms with at least one request in flight */
} disk_stat;

static char disk_stat_path[64]; /* "" when --dir is not on a block device */

static void disk_stat_find(const char *dir)
{
    struct stat st;
    disk_stat_path[0] = '\0';
    if (stat(dir, &st) != 0 || major(st.st_dev) == 0)
        return; /* tmpfs, overlay...: no device counters to read */
    snprintf(disk_stat_path, sizeof(disk_stat_path), "/sys/dev/block/%u:%u/stat",
             major(st.st_dev), minor(st.st_dev));
    if (access(disk_stat_path, R_OK) != 0)
        disk_stat_path[0] = '\0';
}

static bool disk_stat_read(disk_stat *d)
{
    unsigned long long v[10];
    FILE *f = disk_stat_path[0] ? fopen(disk_stat_path, "r") : NULL;
    if (f == NULL)
        return false;
    int n = fscanf(f, "%llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                   &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9]);
    fclose(f);
    if (n != 10)
        return false;
    d->sectors_written = v[6];
    d->io_ticks_ms = v[9];
    return true;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void bq_usage(FILE *f)
{
    fprintf(f, "usage: spoke-bench queue [--dir DIR] [--ops N] [--always-ops N]\n"
               "  --dir DIR         where to create the test stores (default: .); put it on\n"
               "                    the disk you want to measure\n"
               "  --ops N           enqueues per process with the interval policy (20000)\n"
               "  --always-ops N    enqueues per process with sync always (300)\n"
               "  --hot-ops N       host->send_to_control calls for the hot-path figure\n"
               "                    (200000)\n"
               "  --hot-only        only the hot-path figure\n"
               "  --policy P        only the `interval` or the `always` rows\n"
               "  --size N          only the rows of payload size N (256 or 4096)\n"
               "  --warm            steady state: each store first takes an untimed pass\n"
               "                    (a full lap of the journal) whose records are then\n"
               "                    deleted, as if an uplink kept up; default: fresh stores\n"
               "  --json FILE       also write every figure to FILE as JSON\n"
               "Each row is shown against SQLite and as a fraction of the disk's own rate for\n"
               "the same write pattern (the ceiling), measured in the same run.\n");
}

static spk_queue_opts case_opts(const bq_case *c)
{
    spk_queue_opts o;
    spk_queue_opts_init(&o);
    o.sync_always = c->always;
    o.map_size = 8192ull * 1024 * 1024; /* sparse; blocks are allocated as it fills */
    o.max_pending = 0;
    o.max_bytes = 0;
    return o;
}

/* One writer process: returns through `fd` its total ns and error count. */
static void writer(const bq_case *c, const char *path, int id, int fd)
{
    uint64_t out[2] = {0, 0};
    char *payload = malloc(c->size);
    if (payload == NULL)
        _exit(1);
    memset(payload, 'a' + id, c->size);
    spoke_kv md[] = {{"type", "bench"}, {"source", "spoke-bench"}};

    if (c->store == ST_SQLITE) {
        sqlite3 *db = NULL;
        sqlite3_stmt *st = NULL;
        if (sqlite3_open(path, &db) != SQLITE_OK)
            _exit(1);
        sqlite3_busy_timeout(db, 10000);
        sqlite3_exec(db, c->always ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL",
                     NULL, NULL, NULL);
        if (sqlite3_prepare_v2(db, "INSERT INTO q(plugin_id, ts, correlation_id, metadata, "
                               "payload) VALUES (?, ?, ?, ?, ?)", -1, &st, NULL) != SQLITE_OK)
            _exit(1);
        uint64_t t0 = now_ns();
        for (uint64_t i = 0; i < c->ops; i++) {
            sqlite3_bind_int(st, 1, 42);
            sqlite3_bind_int64(st, 2, (sqlite3_int64)time(NULL) * 1000);
            sqlite3_bind_text(st, 3, "req-12345", -1, SQLITE_STATIC);
            sqlite3_bind_text(st, 4, "{\"type\":\"bench\",\"source\":\"spoke-bench\"}", -1,
                              SQLITE_STATIC);
            sqlite3_bind_blob(st, 5, payload, (int)c->size, SQLITE_STATIC);
            if (sqlite3_step(st) != SQLITE_DONE)
                out[1]++;
            sqlite3_reset(st);
        }
        out[0] = now_ns() - t0;
        sqlite3_finalize(st);
        sqlite3_close(db);
    } else {
        spk_queue_opts o = case_opts(c);
        spk_queue *q = NULL;
        spk_errbuf eb = {{0}};
        if (spk_queue_open(path, &o, &q, &eb) != 0) {
            fprintf(stderr, "spoke-bench queue: %s\n", eb.msg);
            _exit(1);
        }
        uint64_t t0 = now_ns();
        for (uint64_t i = 0; i < c->ops; i++)
            if (spk_host_queue_send(q, 42, "edge-bench", payload, c->size, "req-12345", md,
                                    2, false, -1, NULL, NULL, &eb) != 0)
                out[1]++;
        out[0] = now_ns() - t0;
        spk_queue_close(q);
    }
    free(payload);
    if (write(fd, out, sizeof(out)) != (ssize_t)sizeof(out))
        _exit(1);
    _exit(0);
}

/* The supervisor's timer (core/supervisor.c, on_qsync): the queue's sync policy, polled
 * every SPK_QUEUE_SYNC_POLL_MS, until killed. */
static void syncer(const bq_case *c, const char *path)
{
    spk_queue_opts o = case_opts(c);
    spk_queue *q = NULL;
    if (spk_queue_open(path, &o, &q, NULL) != 0)
        _exit(1);
    uint64_t last = now_ns();
    for (;;) {
        struct timespec ts = {0, SPK_QUEUE_SYNC_POLL_MS * 1000000L};
        nanosleep(&ts, NULL);
        if (!spk_queue_sync_due(q, (now_ns() - last) / 1000000u))
            continue;
        last = now_ns();
        spk_queue_sync(q, NULL);
    }
}

/* The disk's own rate for the same work (see the top): records per second. */
static double disk_ceiling(const char *dir, size_t size, bool always, uint64_t ops)
{
    char path[4100];
    snprintf(path, sizeof(path), "%s/spoke-bench-disk.%d", dir, (int)getpid());
    size_t rec = size + 56, chunk = always ? rec : (1u << 20) / rec * rec;
    uint8_t *buf = malloc(chunk);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    double rate = 0;
    if (buf == NULL || fd < 0 || fallocate(fd, 0, 0, (off_t)(rec * ops)) != 0 ||
        fdatasync(fd) != 0)
        goto done;
    memset(buf, 'd', chunk);
    uint64_t t0 = now_ns(), last = t0;
    for (uint64_t i = 0; i < ops; i += chunk / rec) {
        size_t n = ops - i < chunk / rec ? (size_t)(ops - i) * rec : chunk;
        if (pwrite(fd, buf, n, (off_t)(i * rec)) != (ssize_t)n)
            goto done;
        if (always || now_ns() - last >= 100 * 1000000ull) {
            if (fdatasync(fd) != 0)
                goto done;
            last = now_ns();
        }
    }
    if (fdatasync(fd) != 0)
        goto done;
    rate = (double)ops * 1e9 / (double)(now_ns() - t0);
done:
    if (fd >= 0)
        close(fd);
    unlink(path);
    free(buf);
    return rate;
}

/* Remove a store: an LMDB directory or an SQLite file with its -wal and -shm. */
static void remove_store(const char *path)
{
    if (access(path, F_OK) != 0)
        return;
    static const char *suffix[] = {"/data.mdb", "/lock.mdb", "/journal", "/journal.ctl",
                                   "-wal", "-shm"};
    char f[4100];
    for (size_t i = 0; i < sizeof(suffix) / sizeof(suffix[0]); i++) {
        snprintf(f, sizeof(f), "%s%s", path, suffix[i]);
        unlink(f);
    }
    if (rmdir(path) != 0 && unlink(path) != 0)
        fprintf(stderr, "spoke-bench queue: could not remove %s\n", path);
}

/* One timed pass: the syncer (spoke rows), `procs` writers of `ops` calls each, then the
 * final move. */
static int run_pass(const bq_case *c, const char *path, uint64_t ops, bq_result *r)
{
    bq_case pc = *c;
    pc.ops = ops;
    memset(r, 0, sizeof(*r));
    pid_t sync_pid = -1;
    if (c->store != ST_SQLITE) {
        sync_pid = fork();
        if (sync_pid == 0)
            syncer(c, path);
    }
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    pid_t pids[2] = {-1, -1};
    disk_stat d0 = {0, 0}, d1 = {0, 0};
    bool disk = disk_stat_read(&d0);
    uint64_t t0 = now_ns();
    for (int i = 0; i < c->procs; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            close(fds[0]);
            writer(&pc, path, i, fds[1]);
        }
    }
    close(fds[1]);
    uint64_t total_ns = 0;
    int failed = 0;
    for (int i = 0; i < c->procs; i++) {
        int st;
        waitpid(pids[i], &st, 0);
        uint64_t out[2];
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0 ||
            read(fds[0], out, sizeof(out)) != (ssize_t)sizeof(out)) {
            failed = 1;
            continue;
        }
        total_ns += out[0];
        r->errors += out[1];
    }
    close(fds[0]);
    if (sync_pid > 0) {
        /* kill -9 may land inside a move: the queue is built to take that */
        kill(sync_pid, SIGKILL);
        waitpid(sync_pid, NULL, 0);
        spk_queue_opts o = case_opts(c);
        spk_queue *q = NULL;
        spk_errbuf eb = {{0}};
        if (spk_queue_open(path, &o, &q, &eb) != 0 || spk_queue_sync(q, &eb) != 0) {
            fprintf(stderr, "spoke-bench queue: final move: %s\n", eb.msg);
            failed = 1;
        }
        spk_queue_close(q);
    }
    uint64_t wall = now_ns() - t0;
    disk = disk && disk_stat_read(&d1);
    if (failed)
        return -1;
    uint64_t n = ops * (uint64_t)c->procs;
    r->rate = (double)n / ((double)wall / 1e9);
    r->ns = (double)total_ns / (double)n;
    if (disk) {
        r->disk = true;
        r->disk_bytes = (double)(d1.sectors_written - d0.sectors_written) * 512.0 / (double)n;
        r->disk_busy = (double)(d1.io_ticks_ms - d0.io_ticks_ms) / ((double)wall / 1e6);
        if (r->disk_busy > 1.0)
            r->disk_busy = 1.0; /* the counters tick in whole ms */
    }
    return 0;
}

/* After a warm-up pass: delete its records, as an uplink that keeps up would have. Both
 * stores keep their files and reuse the freed pages. */
static int reset_store(const bq_case *c, const char *path)
{
    if (c->store == ST_SQLITE) {
        sqlite3 *db = NULL;
        int rc = sqlite3_open(path, &db) == SQLITE_OK &&
                         sqlite3_exec(db, "DELETE FROM q", NULL, NULL, NULL) == SQLITE_OK
                     ? 0 : -1;
        sqlite3_close(db);
        return rc;
    }
    spk_queue_opts o = case_opts(c);
    spk_queue *q = NULL;
    spk_errbuf eb = {{0}};
    int rc = spk_queue_open(path, &o, &q, &eb) == 0 && spk_queue_purge(q, NULL, &eb) == 0 &&
                     spk_queue_sync(q, &eb) == 0
                 ? 0 : -1;
    if (rc != 0)
        fprintf(stderr, "spoke-bench queue: reset: %s\n", eb.msg);
    spk_queue_close(q);
    return rc;
}

static int run_case(const bq_case *c, const char *base, int idx, bq_result *r)
{
    char path[4000];
    memset(r, 0, sizeof(*r));
    snprintf(path, sizeof(path), "%s/spoke-bench-queue-%d-%d", base, (int)getpid(), idx);
    remove_store(path);
    if (c->store == ST_SQLITE) {
        sqlite3 *db = NULL;
        if (sqlite3_open(path, &db) != SQLITE_OK ||
            sqlite3_exec(db, "PRAGMA journal_mode=WAL; CREATE TABLE q(seq INTEGER PRIMARY "
                         "KEY, plugin_id INTEGER, ts INTEGER, correlation_id TEXT, metadata "
                         "TEXT, payload BLOB)", NULL, NULL, NULL) != SQLITE_OK) {
            fprintf(stderr, "spoke-bench queue: sqlite %s: %s\n", path, sqlite3_errmsg(db));
            sqlite3_close(db);
            return -1;
        }
        sqlite3_close(db);
    } else {
        spk_queue_opts o = case_opts(c);
        spk_queue *q = NULL;
        spk_errbuf eb = {{0}};
        if (spk_queue_open(path, &o, &q, &eb) != 0) { /* create before forking */
            fprintf(stderr, "spoke-bench queue: %s\n", eb.msg);
            return -1;
        }
        spk_queue_close(q);
    }
    int rc = 0;
    if (c->warm_ops > 0) {
        bq_result warm;
        rc = run_pass(c, path, c->warm_ops, &warm);
        if (rc == 0)
            rc = reset_store(c, path);
    }
    if (rc == 0)
        rc = run_pass(c, path, c->ops, r);
    remove_store(path);
    return rc;
}

/* Calls per process that fill the default 64 MiB journal once (records of about size + 110
 * bytes): the warm-up that leaves every page of it in the page cache. */
static uint64_t warm_ops(size_t size)
{
    return (64ull << 20) / (size + 110) + 1;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* host->send_to_control, as a plugin calls it: ns per call, mean and median of batches. */
/* host->send_to_control, as a plugin calls it: ns per call, mean and median of batches
 * of 1000, on a fresh journal (`pass` 0: every page is touched for the first time) and
 * then again (`pass` 1: the journal's pages are in memory, the steady state of a running
 * edge). A syncer process plays the supervisor, as in the throughput rows. */
static int hot_path(const char *base, size_t size, uint64_t ops, double mean[2],
                    double median[2])
{
    char path[4000];
    snprintf(path, sizeof(path), "%s/spoke-bench-hot-%d-%zu", base, (int)getpid(), size);
    spk_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.queue_path = path;
    cfg.queue_max_pending = 0;
    cfg.queue_max_bytes = 0;
    cfg.queue_retention_ms = 24ull * 3600 * 1000;
    cfg.queue_sync_interval_ms = 100;
    cfg.queue_map_size = 4096ull * 1024 * 1024;
    cfg.queue_journal_size = 64ull * 1024 * 1024;
    cfg.edge_id = "edge-bench";

    struct ev_loop *loop = ev_default_loop(0);
    spk_host_env env;
    spk_host_env_init(&env, loop, &cfg, SPOKE_ROLE_EDGE);
    spk_errbuf eb;
    if (spk_host_queue_open(&env, &eb) != 0) {
        fprintf(stderr, "spoke-bench queue: %s\n", eb.msg);
        return -1;
    }
    bq_case sc = {ST_LMDB, false, size, 1, 0, 0};
    pid_t sync_pid = fork();
    if (sync_pid == 0)
        syncer(&sc, path);
    spk_plugin p;
    memset(&p, 0, sizeof(p));
    p.id = 42;
    p.env = &env;
    p.ctx.plugin = &p;
    p.slot = &p.own_slot; /* as the loader does for a plugin loaded bare */
    snprintf(p.log_prefix, sizeof(p.log_prefix), "plugin bench: ");
    const spoke_host *host = spk_host_table();
    char *payload = malloc(size);
    enum { BATCH = 1000 };
    size_t nb = (size_t)(ops / BATCH);
    double *per = calloc(nb ? nb : 1, sizeof(double));
    if (payload == NULL || per == NULL) {
        free(payload);
        free(per);
        spk_queue_close(env.queue);
        return -1;
    }
    memset(payload, 'p', size);
    spoke_kv md[] = {{"type", "bench"}, {"source", "spoke-bench"}};
    uint64_t errors = 0;
    for (int pass = 0; pass < 2; pass++) {
        uint64_t total = 0;
        for (size_t b = 0; b < nb; b++) {
            uint64_t t0 = now_ns();
            for (int i = 0; i < BATCH; i++) {
                uint64_t pending;
                if (host->send_to_control(&p.ctx, payload, size, "req-12345", md, 2,
                                          &pending) != 0)
                    errors++;
            }
            uint64_t dt = now_ns() - t0;
            total += dt;
            per[b] = (double)dt / BATCH;
        }
        qsort(per, nb, sizeof(double), cmp_double);
        mean[pass] = (double)total / (double)(nb * BATCH);
        median[pass] = per[nb / 2];
    }
    kill(sync_pid, SIGKILL);
    waitpid(sync_pid, NULL, 0);
    free(payload);
    free(per);
    spk_queue_close(env.queue);
    remove_store(path);
    return errors ? -1 : 0;
}

int spk_bench_queue(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"dir", required_argument, NULL, 'd'},
        {"ops", required_argument, NULL, 'n'},
        {"always-ops", required_argument, NULL, 'a'},
        {"hot-ops", required_argument, NULL, 'o'},
        {"hot-only", no_argument, NULL, 'H'},
        {"policy", required_argument, NULL, 'p'},
        {"size", required_argument, NULL, 's'},
        {"warm", no_argument, NULL, 'w'},
        {"json", required_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *dir = ".", *json = NULL;
    uint64_t ops = 20000, always_ops = 300, hot_ops = 200000;
    bool only_hot = false;
    int policy = -1; /* -1 both, 0 interval, 1 always */
    size_t only_size = 0;
    bool warm = false;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "d:n:a:o:Hp:s:whj:", longopts, NULL)) != -1) {
        char *end;
        switch (ch) {
        case 'd':
            dir = optarg;
            break;
        case 'H':
            only_hot = true;
            break;
        case 'p':
            if (strcmp(optarg, "interval") != 0 && strcmp(optarg, "always") != 0) {
                fprintf(stderr, "spoke-bench queue: --policy interval|always\n");
                return 1;
            }
            policy = strcmp(optarg, "always") == 0;
            break;
        case 's':
            only_size = (size_t)strtoul(optarg, NULL, 10);
            break;
        case 'w':
            warm = true;
            break;
        case 'j':
            json = optarg;
            break;
        case 'n':
        case 'o':
        case 'a': {
            errno = 0;
            unsigned long long v = strtoull(optarg, &end, 10);
            if (errno != 0 || *end != '\0' || v == 0) {
                fprintf(stderr, "spoke-bench queue: bad number '%s'\n", optarg);
                return 1;
            }
            if (ch == 'n')
                ops = v;
            else if (ch == 'o')
                hot_ops = v < 1000 ? 1000 : v;
            else
                always_ops = v;
            break;
        }
        case 'h':
            bq_usage(stdout);
            return 0;
        default:
            bq_usage(stderr);
            return 1;
        }
    }

    static const size_t sizes[] = {256, 4096};
    int errors = 0, idx = 0;
    disk_stat_find(dir);
    FILE *jf = NULL;
    if (json != NULL && (jf = fopen(json, "w")) == NULL) {
        fprintf(stderr, "spoke-bench queue: %s: %s\n", json, strerror(errno));
        return 1;
    }
    if (jf != NULL)
        fprintf(jf, "{\"dir\":\"%s\",\"ops\":%llu,\"always_ops\":%llu,\"rows\":[", dir,
                (unsigned long long)ops, (unsigned long long)always_ops);
    bool jfirst = true;
    printf("Each row: enqueues per second from all writer processes (the deferred move into "
           "LMDB included), the mean ns per call, and two ratios: against SQLite doing the same "
           "(same size, processes and durability), and as a fraction of the disk's ceiling for "
           "the same write pattern (measured just before and just after the rows of its size "
           "and policy, in this run; the mean of both is the ceiling).\n\n");
    printf("| store | sync | size | procs | enq/s | ns/call | vs SQLite | of the disk's ceiling "
           "| disk B/enq | disk busy |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for (int a = 0; a < 2 && !only_hot; a++) {
        bool always = a == 1;
        if (policy >= 0 && policy != a)
            continue;
        for (size_t s = 0; s < 2; s++) {
            if (only_size != 0 && sizes[s] != only_size)
                continue;
            uint64_t n_ops = always ? always_ops : ops;
            double before = disk_ceiling(dir, sizes[s], always, n_ops);
            bq_result res[2][2]; /* [procs - 1][store] */
            for (int procs = 1; procs <= 2; procs++) {
                for (int st = ST_SQLITE; st >= ST_LMDB; st--) { /* sqlite first: baseline */
                    bq_case c = {(enum store)st, always, sizes[s], procs,
                                 always ? always_ops : ops,
                                 warm ? (always ? always_ops : warm_ops(sizes[s])) : 0};
                    if (run_case(&c, dir, idx++, &res[procs - 1][st]) != 0) {
                        fprintf(stderr, "spoke-bench queue: %s run failed\n", store_name[st]);
                        return 1;
                    }
                    if (res[procs - 1][st].errors > 0)
                        errors = 1;
                }
            }
            double after = disk_ceiling(dir, sizes[s], always, n_ops);
            double ceiling = (before + after) / 2;
            const char *pol = always ? "always" : "100ms";
            printf("| disk ceiling: %s | %s | %zu | 1 | %.0f | - | - | 1 (before %.0f, after "
                   "%.0f) | - | - |\n",
                   always ? "pwrite + fdatasync each" : "1 MiB pwrites, fdatasync per 100 ms",
                   pol, sizes[s], ceiling, before, after);
            for (int procs = 1; procs <= 2; procs++) {
                for (int st = ST_SQLITE; st >= ST_LMDB; st--) {
                    const bq_result *r = &res[procs - 1][st];
                    char vs[32] = "1 (baseline)", bytes[32] = "-", busy[32] = "-";
                    if (st != ST_SQLITE)
                        snprintf(vs, sizeof(vs), "%.2fx",
                                 r->rate / res[procs - 1][ST_SQLITE].rate);
                    if (r->disk) {
                        snprintf(bytes, sizeof(bytes), "%.0f", r->disk_bytes);
                        snprintf(busy, sizeof(busy), "%.0f%%", 100.0 * r->disk_busy);
                    }
                    printf("| %s%s | %s | %zu | %d | %.0f | %.0f | %s | %.3f | %s | %s |\n",
                           st == ST_SQLITE ? (always ? "sqlite (synchronous=FULL)"
                                                     : "sqlite (synchronous=NORMAL)")
                                           : "spoke queue (journal + LMDB)",
                           r->errors ? " ERRORS" : "", pol, sizes[s], procs, r->rate, r->ns, vs,
                           ceiling > 0 ? r->rate / ceiling : 0, bytes, busy);
                    if (jf != NULL) {
                        fprintf(jf, "%s{\"store\":\"%s\",\"sync\":\"%s\",\"size\":%zu,"
                                    "\"procs\":%d,\"enq_s\":%.1f,\"ns_call\":%.1f,"
                                    "\"vs_sqlite\":%.4f,\"disk_ceiling_enq_s\":%.1f,"
                                    "\"ceiling_before\":%.1f,\"ceiling_after\":%.1f,"
                                    "\"of_ceiling\":%.4f,\"disk_bytes_per_enq\":%.1f,"
                                    "\"disk_busy\":%.3f,\"errors\":%llu}",
                                jfirst ? "" : ",", store_name[st], pol, sizes[s], procs, r->rate,
                                r->ns, r->rate / res[procs - 1][ST_SQLITE].rate, ceiling, before,
                                after, ceiling > 0 ? r->rate / ceiling : 0,
                                r->disk ? r->disk_bytes : -1, r->disk ? r->disk_busy : -1,
                                (unsigned long long)r->errors);
                        jfirst = false;
                    }
                }
            }
            fflush(stdout);
        }
    }
    if (jf != NULL)
        fprintf(jf, "],\"hot\":[");
    jfirst = true;
    printf("\nhost->send_to_control, one process, sync 100ms (%llu calls of 256 B, a quarter "
           "of that of 4 KiB; batches of 1000):\n\n", (unsigned long long)hot_ops);
    printf("| size | journal | mean ns | median ns |\n|--:|---|--:|--:|\n");
    for (size_t s = 0; s < 2; s++) {
        double mean[2], median[2];
        /* A quarter of the calls for 4 KiB keeps the bytes written near the 256 B run's. */
        uint64_t n = sizes[s] > 1024 ? hot_ops / 4 : hot_ops;
        if (hot_path(dir, sizes[s], n < 1000 ? 1000 : n, mean, median) != 0) {
            fprintf(stderr, "spoke-bench queue: hot-path run failed\n");
            return 1;
        }
        for (int pass = 0; pass < 2; pass++) {
            printf("| %zu | %s | %.0f | %.0f |\n", sizes[s], pass ? "warm" : "fresh", mean[pass],
                   median[pass]);
            if (jf != NULL) {
                fprintf(jf, "%s{\"size\":%zu,\"journal\":\"%s\",\"mean_ns\":%.1f,"
                            "\"median_ns\":%.1f}",
                        jfirst ? "" : ",", sizes[s], pass ? "warm" : "fresh", mean[pass],
                        median[pass]);
                jfirst = false;
            }
        }
        fflush(stdout);
    }
    if (jf != NULL) {
        fprintf(jf, "]}\n");
        fclose(jf);
    }
    return errors ? 2 : 0;
}
