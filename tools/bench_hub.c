/*
 * bench_hub.c -- `spoke-bench hub`: the batches and payloads per second one hubd
 * sustains from many concurrent gRPC clients, its CPU per 1,000 payloads, and Debian's
 * h2load against the same hubd with the same recorded request body, in one run.
 *
 * It starts hubd from a generated hub.yaml in a scratch directory (hub.listen on a free
 * loopback port, hub.workers N, the store there, one control plugin bench-sink with ID P
 * that counts deliveries into a shared file), then drives it with its own load client:
 * C h2c connections (HTTP/2 prior knowledge, nghttp2's client session on one epoll loop),
 * each keeping S SendPluginControlBatch calls in flight. A call carries B payloads of L
 * bytes; connection c is edge "bench-edge-c" and numbers its payloads 1, 2, 3..., so
 * every payload is new to the hub and goes the whole way: dedupe mark, plugin, group
 * commit. Every answer is checked: HTTP 200, grpc-status 0 in the trailers, B results in
 * order with the sequences sent, all ACCEPTED; anything else is an error (the first of
 * each kind printed). Latency is per call, from its submission to its stream's close.
 * The first `warmup` seconds are not counted. hubd's CPU (supervisor and workers, utime +
 * stime from /proc) is read at the start and the end of the timed part.
 *
 * Then h2load: the request of a fresh edge "h2load-edge" (sequences 1..B), with its 5-byte
 * gRPC prefix, written to a file and sent by `h2load -d FILE` on C connections with S
 * streams each. All of its requests after the first are DUPLICATEs of the first, so it
 * measures hubd's dedupe path, not delivery; and it counts HTTP 2xx, not grpc-status, so
 * the answers are checked another way: hubd's own counters (`hubd status`) before and
 * after say how many batches it committed and how many duplicates it found.
 *
 * The shared helpers of bench_hub.h (scratch dir, processes, /proc, status) live here too.
 */
#include "pbwire.h"
#include "bench_hub.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "bench_hist.h"
#include "bench_net.h"
#include "grpc.h"
#include "spoke/control/v1/control.pb-c.h"

#define BATCH_PATH "/spoke.control.v1.EdgeControl/SendPluginControlBatch"

/* ==== shared helpers (bench_hub.h) ===================================================== */

int spk_bh_path(char *out, size_t cap, const char *dir, const char *name)
{
    int n = snprintf(out, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap) {
        fprintf(stderr, "spoke-bench: path too long: %s/%s\n", dir, name);
        return -1;
    }
    return 0;
}

void spk_bh_print_file(FILE *out, const char *title, const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    fprintf(out, "%s (%s):\n", title, path);
    char line[1024];
    while (fgets(line, sizeof(line), f) != NULL)
        fprintf(out, "    %s", line);
    fclose(f);
}

static char g_bin_dir[PATH_MAX];

void spk_bh_set_bin_dir(const char *dir)
{
    snprintf(g_bin_dir, sizeof(g_bin_dir), "%s", dir);
}

const char *spk_bh_bin_dir(void)
{
    if (g_bin_dir[0] == '\0' && spk_bench_self_dir(g_bin_dir, sizeof(g_bin_dir)) != 0)
        snprintf(g_bin_dir, sizeof(g_bin_dir), ".");
    return g_bin_dir;
}

void spk_bh_machine_get(spk_bh_machine *m, const char *dir)
{
    memset(m, 0, sizeof(*m));
    m->cores = sysconf(_SC_NPROCESSORS_ONLN);
    snprintf(m->cpu, sizeof(m->cpu), "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[512];
    while (f != NULL && fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "model name", 10) == 0) {
            char *colon = strchr(line, ':');
            if (colon != NULL) {
                colon += strspn(colon + 1, " \t") + 1;
                colon[strcspn(colon, "\n")] = '\0';
                snprintf(m->cpu, sizeof(m->cpu), "%s", colon);
            }
            break;
        }
    }
    if (f != NULL)
        fclose(f);
    struct utsname u;
    if (uname(&u) == 0)
        snprintf(m->kernel, sizeof(m->kernel), "%.60s %.60s", u.sysname, u.release);
    struct statfs sf;
    snprintf(m->fs, sizeof(m->fs), "unknown");
    if (dir != NULL && statfs(dir, &sf) == 0) {
        switch ((unsigned long)sf.f_type) {
        case 0x01021994ul: snprintf(m->fs, sizeof(m->fs), "tmpfs"); break;
        case 0xEF53ul: snprintf(m->fs, sizeof(m->fs), "ext4"); break;
        case 0x58465342ul: snprintf(m->fs, sizeof(m->fs), "xfs"); break;
        case 0x9123683Eul: snprintf(m->fs, sizeof(m->fs), "btrfs"); break;
        case 0x794c7630ul: snprintf(m->fs, sizeof(m->fs), "overlayfs"); break;
        default: snprintf(m->fs, sizeof(m->fs), "0x%lx", (unsigned long)sf.f_type);
        }
    }
}

void spk_bh_machine_print(FILE *f, const spk_bh_machine *m)
{
    fprintf(f, "machine: %ld cores online, CPU \"%s\", %s; scratch on %s\n", m->cores, m->cpu,
            m->kernel, m->fs);
}

void spk_bh_machine_json(FILE *f, const spk_bh_machine *m)
{
    fprintf(f, "{\"cores\":%ld,\"cpu\":", m->cores);
    spk_bench_json_string(f, m->cpu);
    fprintf(f, ",\"kernel\":");
    spk_bench_json_string(f, m->kernel);
    fprintf(f, ",\"scratch_fs\":");
    spk_bench_json_string(f, m->fs);
    fprintf(f, "}");
}

int spk_bh_scratch(char *out, size_t cap)
{
    const char *tmp = getenv("TMPDIR");
    if (tmp == NULL || tmp[0] == '\0')
        tmp = "/tmp";
    if ((size_t)snprintf(out, cap, "%s/spoke-bench-hub.XXXXXX", tmp) >= cap ||
        mkdtemp(out) == NULL) {
        fprintf(stderr, "spoke-bench: cannot make a scratch directory in %s: %s\n", tmp,
                strerror(errno));
        return -1;
    }
    return 0;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

void spk_bh_scratch_remove(const char *dir)
{
    if (dir != NULL && dir[0] != '\0')
        nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

spk_bstats *spk_bh_stats_create(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, (off_t)sizeof(spk_bstats)) != 0) {
        fprintf(stderr, "spoke-bench: %s: %s\n", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    close(fd);
    spk_bstats *st = spk_bstats_map(path);
    if (st == NULL)
        fprintf(stderr, "spoke-bench: cannot map %s: %s\n", path, strerror(errno));
    return st;
}

int spk_bh_snap_take(const spk_bstats *st, spk_bh_snap *out)
{
    out->lat = malloc(SPK_BSTATS_LAT_BINS * sizeof(uint64_t));
    if (out->lat == NULL) {
        fprintf(stderr, "spoke-bench: out of memory\n");
        return -1;
    }
    out->count = atomic_load_explicit(&st->count, memory_order_relaxed);
    out->errors = atomic_load_explicit(&st->errors, memory_order_relaxed);
    out->queue_full = atomic_load_explicit(&st->queue_full, memory_order_relaxed);
    out->lat_sum_ms = atomic_load_explicit(&st->lat_sum_ms, memory_order_relaxed);
    for (size_t i = 0; i < SPK_BSTATS_LAT_BINS; i++)
        out->lat[i] = atomic_load_explicit(&st->lat_ms[i], memory_order_relaxed);
    return 0;
}

void spk_bh_snap_free(spk_bh_snap *s)
{
    free(s->lat);
    s->lat = NULL;
}

double spk_bh_snap_quantile(const spk_bh_snap *after, const spk_bh_snap *before, double q)
{
    uint64_t total = 0;
    for (size_t i = 0; i < SPK_BSTATS_LAT_BINS; i++)
        total += after->lat[i] - (before ? before->lat[i] : 0);
    if (total == 0)
        return -1;
    uint64_t rank = (uint64_t)ceil(q * (double)total);
    if (rank == 0)
        rank = 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < SPK_BSTATS_LAT_BINS; i++) {
        seen += after->lat[i] - (before ? before->lat[i] : 0);
        if (seen >= rank)
            return (double)i;
    }
    return (double)(SPK_BSTATS_LAT_BINS - 1);
}

int spk_bh_make_cert(const char *dir)
{
    char cmd[PATH_MAX * 2 + 512];
    int n = snprintf(cmd, sizeof(cmd),
                     "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
                     "-keyout '%s/key.pem' -out '%s/cert.pem' -days 2 -subj /CN=127.0.0.1 "
                     "-addext subjectAltName=IP:127.0.0.1 >/dev/null 2>&1",
                     dir, dir);
    if (n < 0 || (size_t)n >= sizeof(cmd) || system(cmd) != 0) {
        fprintf(stderr, "spoke-bench: could not make a certificate with openssl in %s\n", dir);
        return -1;
    }
    return 0;
}

int spk_bh_hub_config(const char *dir, int port, unsigned workers, uint32_t plugin_id,
                      const char *plugin_dir, const char *stats_path, char *cfg_out,
                      size_t cap)
{
    return spk_bh_hub_config_tls(dir, port, workers, plugin_id, plugin_dir, stats_path, false,
                                 cfg_out, cap);
}

int spk_bh_hub_config_tls(const char *dir, int port, unsigned workers, uint32_t plugin_id,
                          const char *plugin_dir, const char *stats_path, bool tls,
                          char *cfg_out, size_t cap)
{
    char run_dir[PATH_MAX];
    if (spk_bh_path(run_dir, sizeof(run_dir), dir, "hubrun") != 0 ||
        spk_bh_path(cfg_out, cap, dir, "hub.yaml") != 0)
        return -1;
    if ((mkdir(run_dir, 0700) != 0 && errno != EEXIST)) {
        fprintf(stderr, "spoke-bench: %s: %s\n", run_dir, strerror(errno));
        return -1;
    }
    FILE *f = fopen(cfg_out, "w");
    if (f == NULL) {
        fprintf(stderr, "spoke-bench: %s: %s\n", cfg_out, strerror(errno));
        return -1;
    }
    fprintf(f,
            "hub:\n"
            "  listen: \"127.0.0.1:%d\"\n"
            "  workers: %u\n"
            "  store: \"%s/hubstore\"\n"
            "  map_size: 8GiB\n"
            "plugins:\n"
            "  dir: \"%s\"\n"
            "  list:\n"
            "    - id: %u\n"
            "      name: bench-sink\n"
            "      file: bench_sink.so\n"
            "      config:\n"
            "        stats: \"%s\"\n"
            "log:\n"
            "  level: info\n"
            "run_dir: \"%s\"\n"
            "user: \"%s\"\n",
            port, workers, dir, plugin_dir, plugin_id, stats_path, run_dir, spk_bench_run_as());
    if (tls)
        fprintf(f, "tls:\n  cert: \"%s/cert.pem\"\n  key: \"%s/key.pem\"\n", dir, dir);
    return fclose(f) == 0 ? 0 : -1;
}

static bool file_contains(const char *path, const char *needle)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return false;
    char line[2048];
    bool found = false;
    while (!found && fgets(line, sizeof(line), f) != NULL)
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

static void print_log_tail(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    fseek(f, 0, SEEK_END);
    long end = ftell(f);
    fseek(f, end > 4000 ? end - 4000 : 0, SEEK_SET);
    char buf[4096];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = '\0';
    fclose(f);
    fprintf(stderr, "--- %s (tail) ---\n%s--- end ---\n", path, buf);
}

pid_t spk_bh_start(const char *prog, const char *config, const char *log, double timeout_s)
{
    char path[PATH_MAX];
    if (spk_bh_path(path, sizeof(path), spk_bh_bin_dir(), prog) != 0)
        return -1;
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "spoke-bench: fork: %s\n", strerror(errno));
        return -1;
    }
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        setpgid(0, 0); /* a ^C to spoke-bench reaches it through us, not twice */
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* and it does not outlive us */
        execl(path, path, "-c", config, (char *)NULL);
        fprintf(stderr, "spoke-bench: exec %s: %s\n", path, strerror(errno));
        _exit(127);
    }
    uint64_t deadline = spk_bench_now_ns() + (uint64_t)(timeout_s * 1e9);
    while (spk_bench_now_ns() < deadline) {
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            fprintf(stderr, "spoke-bench: %s exited at start (status %d)\n", prog, status);
            print_log_tail(log);
            return -1;
        }
        if (file_contains(log, " serving ("))
            return pid;
        usleep(20000);
    }
    fprintf(stderr, "spoke-bench: %s did not start serving within %.0f s\n", prog, timeout_s);
    print_log_tail(log);
    spk_bh_stop(pid);
    return -1;
}

int spk_bh_stop(pid_t pid)
{
    int status = 0;
    if (pid <= 0)
        return 0;
    kill(pid, SIGTERM);
    for (int i = 0; i < 1500; i++) {
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid || (w < 0 && errno != EINTR))
            return status;
        usleep(10000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return status;
}

/* utime + stime of one process (all its threads), in clock ticks; 0 if it is gone. */
static uint64_t proc_ticks(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* comm may hold spaces */
    if (p == NULL)
        return 0;
    unsigned long long ut = 0, st = 0;
    /* after ")": state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
     * utime(14) stime(15) */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return 0;
    return ut + st;
}

static uint64_t tree_ticks(pid_t pid, int depth)
{
    uint64_t t = proc_ticks(pid);
    if (depth > 4)
        return t;
    pid_t kids[256];
    int n = spk_bench_children(pid, kids, 256);
    for (int i = 0; i < n && i < 256; i++)
        t += tree_ticks(kids[i], depth + 1);
    return t;
}

/* Whether /proc/pid/cmdline's second argument is arg1. */
static bool arg1_is(pid_t pid, const char *arg1)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return false;
    buf[n] = '\0';
    size_t first = strlen(buf);
    return (ssize_t)first + 1 < n && strcmp(buf + first + 1, arg1) == 0;
}

double spk_bh_cpu_children_s(pid_t sup, const char *arg1)
{
    uint64_t t = 0;
    pid_t kids[256];
    int n = spk_bench_children(sup, kids, 256);
    for (int i = 0; i < n && i < 256; i++)
        if (arg1_is(kids[i], arg1))
            t += tree_ticks(kids[i], 1);
    return (double)t / (double)sysconf(_SC_CLK_TCK);
}

double spk_bh_cpu_s(pid_t pid)
{
    return (double)tree_ticks(pid, 0) / (double)sysconf(_SC_CLK_TCK);
}

static uint64_t field_after(const char *line, const char *word)
{
    const char *p = strstr(line, word);
    return p != NULL ? strtoull(p + strlen(word), NULL, 10) : 0;
}

int spk_bh_hub_status_get(const char *config, spk_bh_hub_status *out)
{
    memset(out, 0, sizeof(*out));
    char cmd[PATH_MAX * 2 + 32];
    snprintf(cmd, sizeof(cmd), "'%s/hubd' status -c '%s' 2>&1", spk_bh_bin_dir(), config);
    FILE *p = popen(cmd, "r");
    if (p == NULL) {
        fprintf(stderr, "spoke-bench: hubd status: %s\n", strerror(errno));
        return -1;
    }
    char line[1024];
    bool seen = false;
    while (fgets(line, sizeof(line), p) != NULL) {
        if (strncmp(line, "hub: batches ", 13) == 0) {
            seen = true;
            out->batches = field_after(line, "batches ");
            out->delivered = field_after(line, "delivered ");
            out->duplicates = field_after(line, "duplicates ");
            out->no_receiver = field_after(line, "no receiver ");
            out->refused = field_after(line, "refused ");
        } else if (strstr(line, "  worker ") != NULL && strstr(line, "(total ") != NULL) {
            out->connections += field_after(line, "(total ");
        }
    }
    int rc = pclose(p);
    if (!seen || rc != 0) {
        fprintf(stderr, "spoke-bench: `hubd status -c %s` failed or printed no hub line\n",
                config);
        return -1;
    }
    return 0;
}

/* ==== the request ======================================================================= */

static int64_t unix_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The most bytes a request of `batch` payloads of `size` bytes takes, prefix included. */
static size_t request_cap(unsigned batch, size_t size)
{
    return SPK_GRPC_PREFIX + 2 * (2 + 10 + 64) + (size_t)batch * (size + 64);
}

/* Encode a SendPluginControlBatchRequest by hand (as the uplink does: cheaper than
 * building protobuf-c structs per payload, so the client stays out of the way): edge
 * `edge`, payloads sequences seq0.. of `size` bytes for plugin `plugin_id`, stamped now.
 * Writes the 5-byte prefix too; returns the total length. out has request_cap() bytes. */
static size_t encode_request(uint8_t *out, const char *edge, uint32_t plugin_id,
                             const uint8_t *payload, size_t size, unsigned batch, uint64_t seq0)
{
    uint8_t *p = out + SPK_GRPC_PREFIX;
    p = spk_pb_put_bytes(p, 1, edge, strlen(edge));
    p = spk_pb_put_bytes(p, 2, "bench", 5);
    int64_t now = unix_ms();
    for (unsigned i = 0; i < batch; i++) {
        uint64_t seq = seq0 + i;
        size_t inner = 1 + spk_pb_varint_len(plugin_id) + 1 + spk_pb_varint_len(size) + size + 1 +
                       spk_pb_varint_len((uint64_t)now) + 1 + spk_pb_varint_len(seq);
        p = spk_pb_put_varint(p, 3u << 3 | 2);
        p = spk_pb_put_varint(p, inner);
        p = spk_pb_put_uint(p, 1, plugin_id);
        p = spk_pb_put_bytes(p, 2, payload, size);
        p = spk_pb_put_uint(p, 5, (uint64_t)now);
        p = spk_pb_put_uint(p, 6, seq);
    }
    size_t len = (size_t)(p - out);
    spk_grpc_prefix(out, (uint32_t)(len - SPK_GRPC_PREFIX));
    return len;
}

/* ==== the load client ===================================================================== */

typedef struct hc_opts {
    unsigned conns, streams, batch, workers;
    size_t size;
    uint32_t plugin_id;
    double duration_s, warmup_s;
    bool per_call;          /* --conn-per-call: one call per connection, as the uplink on h2c */
    bool h2load;            /* run h2load after the client */
    const char *json_path;
} hc_opts;

enum hc_err { HE_CONNECT, HE_RESET, HE_HTTP, HE_GRPC, HE_DECODE, HE_RESULT, HE_STALLED, HE_N };

static const char *const hc_err_names[HE_N] = {"connect", "reset", "http_status", "grpc_status",
                                               "decode", "result", "stalled"};

struct hc;
struct hc_conn;

typedef struct hc_stream {
    struct hc_conn *c;
    int32_t id;              /* 0: slot free */
    uint64_t t0;
    uint64_t seq0;
    uint8_t *req;
    size_t req_len, req_off;
    int http_status;
    int grpc_status;         /* -1: none seen */
    char grpc_message[128];
    spk_grpc_body body;
} hc_stream;

typedef struct hc_conn {
    struct hc *h;
    int fd;
    bool connecting, want_out, closing;
    unsigned idx;
    char edge[32];
    uint64_t next_seq;
    uint64_t connect_t0, retry_at;
    bool got_settings;       /* the server's first SETTINGS arrived on this connection */
    nghttp2_session *s;
    const uint8_t *pend;     /* bytes from nghttp2 not yet written */
    size_t pend_len;
    hc_stream *streams;      /* opts.streams slots */
    unsigned inflight;
} hc_conn;

typedef struct hc {
    const hc_opts *o;
    int port;
    char authority[32];
    int ep;
    hc_conn *conns;
    uint8_t *payload;
    uint64_t t_measure, t_end;
    bool submitting;
    spk_bench_hist h;        /* call latency, calls completed in the window */
    spk_bench_hist setup;    /* connect() to the server's SETTINGS, connections of the window */
    uint64_t batches, payloads;         /* in the window */
    uint64_t batches_all, connects;     /* whole run */
    uint64_t errors[HE_N];
    bool err_printed[HE_N];
} hc;

static void hc_error(hc *h, enum hc_err k, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void hc_error(hc *h, enum hc_err k, const char *fmt, ...)
{
    h->errors[k]++;
    if (h->err_printed[k])
        return;
    h->err_printed[k] = true;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "spoke-bench: hub: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (first %s error; all are counted)\n", hc_err_names[k]);
    va_end(ap);
}

static ssize_t read_body(nghttp2_session *s, int32_t id, uint8_t *buf, size_t len,
                         uint32_t *flags, nghttp2_data_source *src, void *ud)
{
    (void)s, (void)id, (void)ud;
    hc_stream *st = src->ptr;
    size_t n = st->req_len - st->req_off;
    if (n > len)
        n = len;
    memcpy(buf, st->req + st->req_off, n);
    st->req_off += n;
    if (st->req_off == st->req_len)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

#define NV(n, v)                                                                           \
    { (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE }

/* Start one call on c in free slot st. Returns 0 or -1. */
static int hc_submit(hc_conn *c, hc_stream *st, uint64_t t0)
{
    hc *h = c->h;
    st->req_len = encode_request(st->req, c->edge, h->o->plugin_id, h->payload, h->o->size,
                                 h->o->batch, c->next_seq);
    st->seq0 = c->next_seq;
    c->next_seq += h->o->batch;
    st->req_off = 0;
    st->http_status = 0;
    st->grpc_status = -1;
    st->grpc_message[0] = '\0';
    st->body.len = 0;
    st->t0 = t0;
    const nghttp2_nv hdrs[] = {
        NV(":method", "POST"), NV(":scheme", "http"), NV(":path", BATCH_PATH),
        NV(":authority", h->authority), NV("content-type", SPK_GRPC_CONTENT_TYPE),
        NV("te", "trailers"), NV("user-agent", "spoke-bench/" SPOKE_VERSION),
    };
    nghttp2_data_provider dp = {.source.ptr = st, .read_callback = read_body};
    int32_t id = nghttp2_submit_request(c->s, NULL, hdrs, sizeof(hdrs) / sizeof(hdrs[0]), &dp, st);
    if (id < 0) {
        hc_error(h, HE_RESET, "nghttp2_submit_request: %s", nghttp2_strerror(id));
        return -1;
    }
    st->id = id;
    c->inflight++;
    return 0;
}

static void hc_fill(hc_conn *c, uint64_t now)
{
    if (!c->h->submitting || c->closing || c->s == NULL)
        return;
    unsigned want = c->h->o->per_call ? 1 : c->h->o->streams;
    for (unsigned i = 0; i < c->h->o->streams && c->inflight < want; i++)
        if (c->streams[i].id == 0 && hc_submit(c, &c->streams[i], c->h->o->per_call ? c->connect_t0 : now) != 0)
            return;
}

/* Check a finished call's answer; count it. */
static void hc_finish(hc_conn *c, hc_stream *st, uint32_t error_code)
{
    hc *h = c->h;
    uint64_t now = spk_bench_now_ns();
    const hc_opts *o = h->o;
    c->inflight--;
    st->id = 0;
    if (error_code != 0) {
        hc_error(h, HE_RESET, "connection %u: stream reset (%s)", c->idx,
                 nghttp2_http2_strerror(error_code));
        return;
    }
    if (st->http_status != 200) {
        hc_error(h, HE_HTTP, "connection %u: HTTP status %d", c->idx, st->http_status);
        return;
    }
    if (st->grpc_status != 0) {
        hc_error(h, HE_GRPC, "connection %u: grpc-status %d (%s): %s", c->idx, st->grpc_status,
                 st->grpc_status < 0 ? "none" : spk_grpc_code_name(st->grpc_status),
                 st->grpc_message);
        return;
    }
    const uint8_t *msg;
    size_t len;
    spk_errbuf eb;
    if (spk_grpc_body_finish(&st->body, &msg, &len, &eb) != SPK_GRPC_OK) {
        hc_error(h, HE_DECODE, "connection %u: answer: %s", c->idx, eb.msg);
        return;
    }
    Spoke__Control__V1__SendPluginControlBatchResponse *r =
        spoke__control__v1__send_plugin_control_batch_response__unpack(NULL, len, msg);
    if (r == NULL) {
        hc_error(h, HE_DECODE, "connection %u: the answer does not decode", c->idx);
        return;
    }
    bool ok = r->n_results == o->batch && r->accepted == o->batch;
    for (size_t i = 0; ok && i < r->n_results; i++)
        ok = r->results[i]->sequence == st->seq0 + i &&
             r->results[i]->outcome == SPOKE__CONTROL__V1__PAYLOAD_RESULT__OUTCOME__ACCEPTED;
    if (!ok)
        hc_error(h, HE_RESULT, "connection %u: %zu results, %u accepted, first outcome %d, for "
                 "a batch of %u from sequence %llu", c->idx, r->n_results, r->accepted,
                 r->n_results ? (int)r->results[0]->outcome : -1, o->batch,
                 (unsigned long long)st->seq0);
    spoke__control__v1__send_plugin_control_batch_response__free_unpacked(r, NULL);
    if (!ok)
        return;
    h->batches_all++;
    if (now >= h->t_measure && now < h->t_end) {
        h->batches++;
        h->payloads += o->batch;
        spk_bench_hist_record(&h->h, now - st->t0);
    }
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *ud)
{
    (void)flags, (void)ud;
    if (f->hd.type != NGHTTP2_HEADERS)
        return 0;
    hc_stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (st == NULL)
        return 0;
    if (namelen == 7 && memcmp(name, ":status", 7) == 0) {
        st->http_status = (int)strtol((const char *)value, NULL, 10);
    } else if (namelen == 11 && memcmp(name, "grpc-status", 11) == 0) {
        st->grpc_status = (int)strtol((const char *)value, NULL, 10);
    } else if (namelen == 12 && memcmp(name, "grpc-message", 12) == 0) {
        spk_grpc_message_decode((const char *)value, valuelen, st->grpc_message,
                                sizeof(st->grpc_message));
    }
    return 0;
}

static int on_data(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data,
                   size_t len, void *ud)
{
    (void)flags, (void)ud;
    hc_stream *st = nghttp2_session_get_stream_user_data(s, id);
    if (st == NULL)
        return 0;
    spk_errbuf eb;
    if (spk_grpc_body_append(&st->body, data, len, &eb) != SPK_GRPC_OK)
        st->grpc_status = SPK_GRPC_INTERNAL; /* checked at the close */
    return 0;
}

static int on_frame(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    (void)s;
    hc_conn *c = ud;
    if (f->hd.type == NGHTTP2_SETTINGS && !(f->hd.flags & NGHTTP2_FLAG_ACK) && !c->got_settings) {
        c->got_settings = true;
        uint64_t now = spk_bench_now_ns();
        if (now >= c->h->t_measure && now < c->h->t_end)
            spk_bench_hist_record(&c->h->setup, now - c->connect_t0);
    }
    return 0;
}

static int on_close(nghttp2_session *s, int32_t id, uint32_t error_code, void *ud)
{
    hc_conn *c = ud;
    hc_stream *st = nghttp2_session_get_stream_user_data(s, id);
    if (st == NULL)
        return 0;
    hc_finish(c, st, error_code);
    if (c->h->o->per_call)
        c->closing = true; /* the next call gets a new connection */
    return 0;
}

static void hc_close(hc_conn *c, uint64_t now, uint64_t retry_ns)
{
    if (c->s != NULL) {
        /* calls still open fail with the connection */
        for (unsigned i = 0; i < c->h->o->streams; i++) {
            if (c->streams[i].id != 0) {
                c->streams[i].id = 0;
                if (!c->closing)
                    hc_error(c->h, HE_RESET, "connection %u: lost with a call in flight", c->idx);
            }
        }
        nghttp2_session_del(c->s);
        c->s = NULL;
    }
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->inflight = 0;
    c->pend = NULL;
    c->pend_len = 0;
    c->connecting = c->want_out = c->closing = c->got_settings = false;
    c->retry_at = now + retry_ns;
}

static int hc_interest(hc_conn *c, bool out)
{
    if (c->want_out == out)
        return 0;
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    c->want_out = out;
    return epoll_ctl(c->h->ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Write what nghttp2 has until it has nothing or the socket is full. Returns 0 or -1. */
static int hc_flush(hc_conn *c)
{
    for (;;) {
        if (c->pend_len == 0) {
            ssize_t n = nghttp2_session_mem_send(c->s, &c->pend);
            if (n < 0)
                return -1;
            if (n == 0)
                break;
            c->pend_len = (size_t)n;
        }
        ssize_t w = send(c->fd, c->pend, c->pend_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return hc_interest(c, true);
        if (w < 0)
            return -1;
        c->pend += w;
        c->pend_len -= (size_t)w;
    }
    return hc_interest(c, false);
}

static void hc_connect(hc_conn *c, uint64_t now)
{
    hc *h = c->h;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)h->port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    c->connect_t0 = now;
    if (fd < 0 || setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0 ||
        (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0 && errno != EINPROGRESS)) {
        hc_error(h, HE_CONNECT, "connect 127.0.0.1:%d: %s", h->port, strerror(errno));
        if (fd >= 0)
            close(fd);
        c->retry_at = now + 100 * NS_PER_MS;
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(h->ep, EPOLL_CTL_ADD, fd, &ev);
    c->fd = fd;
    c->connecting = true;
    c->want_out = true;
    h->connects++;
}

static nghttp2_session_callbacks *g_cbs;

static int hc_connected(hc_conn *c)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
        hc_error(c->h, HE_CONNECT, "connect 127.0.0.1:%d: %s", c->h->port, strerror(err));
        return -1;
    }
    c->connecting = false;
    if (nghttp2_session_client_new(&c->s, g_cbs, c) != 0)
        return -1;
    const nghttp2_settings_entry set[] = {
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1u << 20},
    };
    nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, set, 2);
    nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, 4u << 20);
    hc_fill(c, spk_bench_now_ns());
    return hc_flush(c);
}

static void hc_event(hc_conn *c, uint32_t events, uint8_t *rbuf, size_t rcap)
{
    uint64_t now = spk_bench_now_ns();
    if (c->connecting) {
        if (hc_connected(c) != 0)
            hc_close(c, now, 100 * NS_PER_MS);
        return;
    }
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        for (;;) {
            ssize_t n = recv(c->fd, rbuf, rcap, MSG_DONTWAIT);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            if (n <= 0) {
                if (c->inflight > 0)
                    hc_error(c->h, HE_RESET, "connection %u: closed by hubd with %u calls "
                             "in flight", c->idx, c->inflight);
                hc_close(c, now, 50 * NS_PER_MS);
                return;
            }
            if (nghttp2_session_mem_recv(c->s, rbuf, (size_t)n) < 0) {
                hc_error(c->h, HE_RESET, "connection %u: HTTP/2 error from hubd", c->idx);
                hc_close(c, now, 50 * NS_PER_MS);
                return;
            }
            if ((size_t)n < rcap)
                break;
        }
    }
    if (c->closing) {
        hc_close(c, now, 0);
        if (c->h->submitting)
            hc_connect(c, now); /* --conn-per-call: the next call at once */
        return;
    }
    hc_fill(c, now);
    if (hc_flush(c) != 0) {
        hc_error(c->h, HE_RESET, "connection %u: write failed", c->idx);
        hc_close(c, now, 50 * NS_PER_MS);
    }
}

typedef struct hc_window {
    double cpu0, cpu1;           /* hubd's CPU seconds at the window's start and end */
    spk_bh_snap sink0, sink1;    /* the sink's counters then */
    double seconds;
    double client_cpu_s;         /* this process, the window */
} hc_window;

static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

/* Run the client against 127.0.0.1:port; fill h's counters and w. Returns 0 or -1. */
static int hc_run(hc *h, pid_t hubd, const spk_bstats *sink, hc_window *w)
{
    const hc_opts *o = h->o;
    uint8_t *rbuf = malloc(256 * 1024);
    h->conns = calloc(o->conns, sizeof(hc_conn));
    h->payload = malloc(o->size);
    h->ep = epoll_create1(EPOLL_CLOEXEC);
    if (rbuf == NULL || h->conns == NULL || h->payload == NULL || h->ep < 0) {
        fprintf(stderr, "spoke-bench: hub: out of memory\n");
        return -1;
    }
    for (size_t i = 0; i < o->size; i++)
        h->payload[i] = (uint8_t)('a' + i % 26);
    for (unsigned i = 0; i < o->conns; i++) {
        hc_conn *c = &h->conns[i];
        c->h = h;
        c->fd = -1;
        c->idx = i;
        c->next_seq = 1;
        snprintf(c->edge, sizeof(c->edge), "bench-edge-%u", i);
        c->streams = calloc(o->streams, sizeof(hc_stream));
        if (c->streams == NULL)
            return -1;
        for (unsigned j = 0; j < o->streams; j++) {
            c->streams[j].c = c;
            c->streams[j].req = malloc(request_cap(o->batch, o->size));
            spk_grpc_body_init(&c->streams[j].body, 16u << 20);
            if (c->streams[j].req == NULL)
                return -1;
        }
    }
    uint64_t start = spk_bench_now_ns();
    h->t_measure = start + (uint64_t)(o->warmup_s * 1e9);
    h->t_end = h->t_measure + (uint64_t)(o->duration_s * 1e9);
    h->submitting = true;
    for (unsigned i = 0; i < o->conns; i++)
        hc_connect(&h->conns[i], start);
    bool measuring = false, done = false;
    uint64_t drain_until = 0;
    struct epoll_event evs[256];
    while (!spk_bench_stop) {
        uint64_t now = spk_bench_now_ns();
        if (!measuring && now >= h->t_measure) {
            measuring = true;
            w->cpu0 = spk_bh_cpu_s(hubd);
            w->client_cpu_s = self_cpu_s();
            if (spk_bh_snap_take(sink, &w->sink0) != 0)
                return -1;
        }
        if (measuring && !done && now >= h->t_end) {
            done = true;
            w->cpu1 = spk_bh_cpu_s(hubd);
            w->client_cpu_s = self_cpu_s() - w->client_cpu_s;
            if (spk_bh_snap_take(sink, &w->sink1) != 0)
                return -1;
            w->seconds = (double)(now - h->t_measure) / 1e9;
            h->submitting = false;
            drain_until = now + 5 * NS_PER_S;
        }
        if (done) {
            unsigned left = 0;
            for (unsigned i = 0; i < o->conns; i++)
                left += h->conns[i].inflight;
            if (left == 0)
                break;
            if (now >= drain_until) {
                hc_error(h, HE_STALLED, "%u calls still unanswered 5 s after the end", left);
                h->errors[HE_STALLED] += left - 1;
                break;
            }
        }
        for (unsigned i = 0; h->submitting && i < o->conns; i++)
            if (h->conns[i].fd < 0 && h->conns[i].retry_at <= now)
                hc_connect(&h->conns[i], now);
        int n = epoll_wait(h->ep, evs, 256, 5);
        if (n < 0 && errno != EINTR) {
            fprintf(stderr, "spoke-bench: epoll_wait: %s\n", strerror(errno));
            return -1;
        }
        for (int i = 0; i < n; i++)
            hc_event(evs[i].data.ptr, evs[i].events, rbuf, 256 * 1024);
    }
    for (unsigned i = 0; i < o->conns; i++) {
        hc_conn *c = &h->conns[i];
        c->closing = true;
        hc_close(c, 0, 0);
        for (unsigned j = 0; j < o->streams; j++) {
            free(c->streams[j].req);
            spk_grpc_body_free(&c->streams[j].body);
        }
        free(c->streams);
    }
    free(h->conns);
    h->conns = NULL;
    free(h->payload);
    free(rbuf);
    close(h->ep);
    return done ? 0 : -1;
}

/* ==== h2load ================================================================================ */

typedef struct h2l_result {
    bool ran;
    int exit_status;
    double rps, seconds;
    uint64_t total, done, succeeded, failed, errored, timeout, s2xx;
    double cpu_s;                 /* hubd's, over the whole h2load run */
    spk_bh_hub_status st0, st1;   /* hubd's counters before and after */
    char cmd[1024];
} h2l_result;

static int run_h2load(const hc_opts *o, int port, const char *dir, pid_t hubd,
                      const char *cfg, h2l_result *r)
{
    memset(r, 0, sizeof(*r));
    char body[PATH_MAX], out[PATH_MAX];
    if (spk_bh_path(body, sizeof(body), dir, "h2load-request.bin") != 0 ||
        spk_bh_path(out, sizeof(out), dir, "h2load.out") != 0)
        return -1;
    uint8_t *req = malloc(request_cap(o->batch, o->size));
    uint8_t *payload = malloc(o->size);
    if (req == NULL || payload == NULL) {
        free(req);
        free(payload);
        return -1;
    }
    for (size_t i = 0; i < o->size; i++)
        payload[i] = (uint8_t)('a' + i % 26);
    size_t len = encode_request(req, "h2load-edge", o->plugin_id, payload, o->size, o->batch, 1);
    FILE *f = fopen(body, "wb");
    bool wrote = f != NULL && fwrite(req, 1, len, f) == len;
    if (f != NULL && fclose(f) != 0)
        wrote = false;
    free(req);
    free(payload);
    if (!wrote) {
        fprintf(stderr, "spoke-bench: hub: cannot write %s\n", body);
        return -1;
    }
    char dur[32], warm[32];
    snprintf(dur, sizeof(dur), "%.0f", o->duration_s < 1 ? 1 : o->duration_s);
    snprintf(warm, sizeof(warm), "%.0f", o->warmup_s < 1 ? 1 : o->warmup_s);
    int cn = snprintf(r->cmd, sizeof(r->cmd),
             "h2load -d %s -H 'content-type: application/grpc' -H 'te: trailers' -c %u -m %u "
             "-D %s --warm-up-time %s http://127.0.0.1:%d" BATCH_PATH,
             body, o->conns, o->streams, dur, warm, port);
    if (cn < 0 || (size_t)cn >= sizeof(r->cmd))
        return -1;
    if (spk_bh_hub_status_get(cfg, &r->st0) != 0)
        return -1;
    double cpu0 = spk_bh_cpu_s(hubd);
    char shell[sizeof(r->cmd) + PATH_MAX + 16];
    cn = snprintf(shell, sizeof(shell), "%s > '%s' 2>&1", r->cmd, out);
    if (cn < 0 || (size_t)cn >= sizeof(shell))
        return -1;
    int st = system(shell);
    r->cpu_s = spk_bh_cpu_s(hubd) - cpu0;
    r->ran = true;
    r->exit_status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    if (spk_bh_hub_status_get(cfg, &r->st1) != 0)
        return -1;
    f = fopen(out, "r");
    char line[1024];
    while (f != NULL && fgets(line, sizeof(line), f) != NULL) {
        unsigned long long a[7];
        double secs, rps;
        if (sscanf(line, "finished in %lfs, %lf req/s", &secs, &rps) == 2) {
            r->seconds = secs;
            r->rps = rps;
        } else if (sscanf(line, "requests: %llu total, %*u started, %llu done, %llu succeeded, "
                                "%llu failed, %llu errored, %llu timeout",
                          &a[0], &a[1], &a[2], &a[3], &a[4], &a[5]) == 6) {
            r->total = a[0];
            r->done = a[1];
            r->succeeded = a[2];
            r->failed = a[3];
            r->errored = a[4];
            r->timeout = a[5];
        } else if (sscanf(line, "status codes: %llu 2xx", &a[6]) == 1) {
            r->s2xx = a[6];
        }
    }
    if (f != NULL)
        fclose(f);
    if (r->exit_status != 0 || r->rps == 0) {
        fprintf(stderr, "spoke-bench: hub: h2load failed (exit %d); its output:\n",
                r->exit_status);
        print_log_tail(out);
        return -1;
    }
    return 0;
}

/* ==== the subcommand ======================================================================= */

void spk_bench_hub_usage(FILE *f)
{
    fprintf(f, "  hub [--workers 2] [--conns 16] [--streams 8] [--batch 100] [--size 256]\n"
               "      [--duration 10s] [--warmup 1s] [--plugin-id 7] [--conn-per-call]\n"
               "      [--no-h2load] [--group-commit on] [--bin-dir DIR] [--json FILE]\n"
               "      starts hubd (a scratch hub.yaml, the bench-sink control plugin) and\n"
               "      drives it with an h2c gRPC client (nghttp2): CONNS connections x STREAMS\n"
               "      calls in flight, each SendPluginControlBatch of BATCH new payloads of SIZE\n"
               "      bytes, every answer checked; then h2load with one recorded request (its\n"
               "      requests after the first are duplicates). Prints batches/s, payloads/s,\n"
               "      call latency, errors and hubd's CPU per 1,000 payloads. --conn-per-call:\n"
               "      one call per connection (as the uplink on h2c). --bin-dir: hubd and\n"
               "      bench-plugins/ from another build.\n");
}

static int hub_bad(const char *opt, const char *want, const char *got)
{
    fprintf(stderr, "spoke-bench: hub: %s: expected %s, got '%s'\n", opt, want, got);
    return 1;
}

static int parse_hub_opts(int argc, char **argv, hc_opts *o)
{
    static const struct option opts[] = {
        {"workers", required_argument, NULL, 'W'}, {"conns", required_argument, NULL, 'c'},
        {"streams", required_argument, NULL, 's'}, {"batch", required_argument, NULL, 'b'},
        {"size", required_argument, NULL, 'l'},    {"duration", required_argument, NULL, 'd'},
        {"warmup", required_argument, NULL, 'w'},  {"plugin-id", required_argument, NULL, 'P'},
        {"conn-per-call", no_argument, NULL, 'n'}, {"no-h2load", no_argument, NULL, 'H'},
        {"group-commit", required_argument, NULL, 'g'}, {"json", required_argument, NULL, 'j'},
        {"bin-dir", required_argument, NULL, 'B'},  {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    uint64_t v;
    int ch;
    optind = 0;
    while ((ch = getopt_long(argc, argv, "W:c:s:b:l:d:w:P:nHg:j:B:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'W':
            if (spk_bench_parse_uint(optarg, 1, 64, &v) != 0)
                return hub_bad("--workers", "1..64", optarg);
            o->workers = (unsigned)v;
            break;
        case 'c':
            if (spk_bench_parse_uint(optarg, 1, 4096, &v) != 0)
                return hub_bad("--conns", "1..4096", optarg);
            o->conns = (unsigned)v;
            break;
        case 's':
            if (spk_bench_parse_uint(optarg, 1, 100, &v) != 0)
                return hub_bad("--streams", "1..100 (hubd's limits.max_streams)", optarg);
            o->streams = (unsigned)v;
            break;
        case 'b':
            if (spk_bench_parse_uint(optarg, 1, 10000, &v) != 0)
                return hub_bad("--batch", "1..10000", optarg);
            o->batch = (unsigned)v;
            break;
        case 'l':
            if (spk_bench_parse_uint(optarg, 1, 1u << 20, &v) != 0)
                return hub_bad("--size", "1 byte..1MiB", optarg);
            o->size = (size_t)v;
            break;
        case 'd':
            if (spk_bench_parse_duration(optarg, 0, &o->duration_s) != 0)
                return hub_bad("--duration", "a duration such as 10s", optarg);
            break;
        case 'w':
            if (spk_bench_parse_duration(optarg, 1, &o->warmup_s) != 0)
                return hub_bad("--warmup", "a duration such as 1s or 0", optarg);
            break;
        case 'P':
            if (spk_bench_parse_uint(optarg, 1, UINT32_MAX, &v) != 0)
                return hub_bad("--plugin-id", "1..4294967295", optarg);
            o->plugin_id = (uint32_t)v;
            break;
        case 'n': o->per_call = true; break;
        case 'H': o->h2load = false; break;
        case 'g':
            if (strcmp(optarg, "on") == 0)
                break;
            if (strcmp(optarg, "off") == 0) {
                fprintf(stderr, "spoke-bench: hub: --group-commit off: hubd has no setting to "
                                "turn group commit off (every loop turn's batches share one "
                                "LMDB commit, core/hub.c); only 'on' can be measured\n");
                return 1;
            }
            return hub_bad("--group-commit", "on or off", optarg);
        case 'j': o->json_path = optarg; break;
        case 'B': spk_bh_set_bin_dir(optarg); break;
        case 'h': spk_bench_hub_usage(stdout); return -1;
        default: spk_bench_hub_usage(stderr); return 1;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "spoke-bench: hub: unexpected argument '%s'\n", argv[optind]);
        return 1;
    }
    if (o->batch * (o->size + 64) > (15u << 20))
        return hub_bad("--batch x --size", "a request under hubd's 16 MiB message limit",
                       "more");
    return 0;
}

static void pct(const spk_bench_hist *h, double us[3])
{
    us[0] = (double)spk_bench_hist_quantile(h, 0.50) / 1e3;
    us[1] = (double)spk_bench_hist_quantile(h, 0.99) / 1e3;
    us[2] = (double)spk_bench_hist_quantile(h, 0.999) / 1e3;
}

typedef struct hub_report {
    const hc_opts *o;
    const spk_bh_machine *m;
    const hc *h;
    const hc_window *w;
    const h2l_result *hl;
    uint64_t errors;
    uint64_t sink_delivered;      /* the sink's count over the window */
    char hubd_cmd[PATH_MAX + 64];
} hub_report;

static void print_report(const hub_report *r)
{
    const hc_opts *o = r->o;
    const hc_window *w = r->w;
    const hc *h = r->h;
    double bps = (double)h->batches / w->seconds, pps = (double)h->payloads / w->seconds;
    double cpu = w->cpu1 - w->cpu0;
    double us[3];
    pct(&h->h, us);
    printf("\nspoke-bench hub\n");
    spk_bh_machine_print(stdout, r->m);
    printf("hubd: %s  (hub.workers %u, store on the scratch dir, sync on, group commit on: "
           "hubd has no switch for it; one control plugin bench-sink, ID %u)\n",
           r->hubd_cmd, o->workers, o->plugin_id);
    printf("load: %u h2c connections x %u streams, SendPluginControlBatch of %u payloads x %zu "
           "bytes, new (edge, sequence) each; %.1f s measured after %.1f s warm-up%s\n",
           o->conns, o->per_call ? 1 : o->streams, o->batch, o->size, w->seconds, o->warmup_s,
           o->per_call ? "; ONE CALL PER CONNECTION (connect, call, close), as the uplink on "
                         "h2c with libcurl 7.88" : "");
    printf("\n  %-28s %14s %14s\n", "", "spoke-bench", "h2load");
    printf("  %-28s %14.0f", "batches/s (calls/s)", bps);
    if (r->hl->ran)
        printf(" %14.0f", r->hl->rps);
    printf("\n  %-28s %14.0f", "payloads/s", pps);
    if (r->hl->ran)
        printf(" %14.0f", r->hl->rps * o->batch);
    printf("\n  %-28s %14s %14s\n", "what the hub did", "deliver",
           r->hl->ran ? "dedupe (dups)" : "");
    printf("  %-28s %14.1f", "hubd CPU ms / 1,000 payloads",
           pps > 0 ? cpu * 1e3 / ((double)h->payloads / 1000.0) : 0.0);
    if (r->hl->ran) {
        uint64_t dups = r->hl->st1.duplicates - r->hl->st0.duplicates;
        printf(" %14.1f", dups ? r->hl->cpu_s * 1e3 / ((double)dups / 1000.0) : 0.0);
    }
    printf("\n  %-28s %14.2f", "hubd CPU (cores busy)", cpu / w->seconds);
    if (r->hl->ran && r->hl->seconds > 0)
        printf(" %14.2f", r->hl->cpu_s / r->hl->seconds);
    printf("\n  call latency ms p50 %.2f  p99 %.2f  p99.9 %.2f  (%llu calls)\n", us[0] / 1e3,
           us[1] / 1e3, us[2] / 1e3, (unsigned long long)h->h.total);
    if (h->setup.total > 0)
        printf("  connection set-up ms (connect() to hubd's SETTINGS) p50 %.3f  p99 %.3f  "
               "(%llu connections)\n", (double)spk_bench_hist_quantile(&h->setup, 0.5) / 1e6,
               (double)spk_bench_hist_quantile(&h->setup, 0.99) / 1e6,
               (unsigned long long)h->setup.total);
    printf("  errors %llu (", (unsigned long long)r->errors);
    for (int k = 0; k < HE_N; k++)
        printf("%s%s %llu", k ? ", " : "", hc_err_names[k], (unsigned long long)h->errors[k]);
    printf(")\n  connections opened %llu; the sink counted %llu deliveries in the window "
           "(client: %llu accepted)\n  client CPU %.2f cores\n",
           (unsigned long long)h->connects, (unsigned long long)r->sink_delivered,
           (unsigned long long)h->payloads, w->client_cpu_s / w->seconds);
    if (!r->hl->ran)
        return;
    const h2l_result *hl = r->hl;
    printf("\nh2load: %s\n", hl->cmd);
    printf("  %.0f req/s (after its warm-up; %.2f s in all); requests %llu total, %llu done, %llu succeeded, %llu "
           "failed, %llu errored, %llu timeout; %llu 2xx\n",
           hl->rps, hl->seconds, (unsigned long long)hl->total, (unsigned long long)hl->done,
           (unsigned long long)hl->succeeded, (unsigned long long)hl->failed,
           (unsigned long long)hl->errored, (unsigned long long)hl->timeout,
           (unsigned long long)hl->s2xx);
    printf("  hubd meanwhile (warm-up included): %llu batches committed, %llu delivered, %llu "
           "duplicates, %llu refused; CPU %.2f s\n",
           (unsigned long long)(hl->st1.batches - hl->st0.batches),
           (unsigned long long)(hl->st1.delivered - hl->st0.delivered),
           (unsigned long long)(hl->st1.duplicates - hl->st0.duplicates),
           (unsigned long long)(hl->st1.refused - hl->st0.refused), hl->cpu_s);
    printf("  NOTE: h2load sends the same body every time, so every request after the first "
           "is all DUPLICATEs\n  (the hub's dedupe path: mark lookups, no plugin call, no "
           "mark written); and h2load counts\n  HTTP 2xx, not grpc-status: hubd's counters "
           "above are the check (batches committed vs 2xx).\n");
}

static void write_json(const hub_report *r, FILE *f)
{
    const hc_opts *o = r->o;
    const hc_window *w = r->w;
    const hc *h = r->h;
    double us[3];
    pct(&h->h, us);
    double cpu = w->cpu1 - w->cpu0;
    fprintf(f, "{\"bench\":\"hub\",\"machine\":");
    spk_bh_machine_json(f, r->m);
    fprintf(f, ",\"config\":{\"workers\":%u,\"conns\":%u,\"streams\":%u,\"batch\":%u,"
               "\"size\":%zu,\"duration_s\":%.3f,\"warmup_s\":%.3f,\"plugin_id\":%u,"
               "\"conn_per_call\":%s,\"group_commit\":\"on (no switch in hubd)\","
               "\"hubd\":",
            o->workers, o->conns, o->per_call ? 1 : o->streams, o->batch, o->size,
            w->seconds, o->warmup_s, o->plugin_id, o->per_call ? "true" : "false");
    spk_bench_json_string(f, r->hubd_cmd);
    fprintf(f, "},\"client\":{\"batches\":%llu,\"payloads\":%llu,\"batches_per_s\":%.1f,"
               "\"payloads_per_s\":%.1f,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"p999_ms\":%.3f,"
               "\"errors\":%llu",
            (unsigned long long)h->batches, (unsigned long long)h->payloads,
            (double)h->batches / w->seconds, (double)h->payloads / w->seconds, us[0] / 1e3,
            us[1] / 1e3, us[2] / 1e3, (unsigned long long)r->errors);
    for (int k = 0; k < HE_N; k++)
        fprintf(f, ",\"errors_%s\":%llu", hc_err_names[k], (unsigned long long)h->errors[k]);
    fprintf(f, ",\"setup_p50_ms\":%.3f,\"setup_p99_ms\":%.3f",
            (double)spk_bench_hist_quantile(&h->setup, 0.5) / 1e6,
            (double)spk_bench_hist_quantile(&h->setup, 0.99) / 1e6);
    fprintf(f, ",\"connections\":%llu,\"sink_delivered\":%llu,\"hubd_cpu_s\":%.3f,"
               "\"hubd_cpu_ms_per_1000_payloads\":%.3f,\"client_cpu_cores\":%.3f}",
            (unsigned long long)h->connects, (unsigned long long)r->sink_delivered, cpu,
            h->payloads ? cpu * 1e6 / (double)h->payloads : 0.0,
            w->client_cpu_s / w->seconds);
    if (r->hl->ran) {
        const h2l_result *hl = r->hl;
        uint64_t dups = hl->st1.duplicates - hl->st0.duplicates;
        fprintf(f, ",\"h2load\":{\"command\":");
        spk_bench_json_string(f, hl->cmd);
        fprintf(f, ",\"requests_per_s\":%.1f,\"seconds\":%.3f,\"done\":%llu,\"succeeded\":%llu,"
                   "\"failed\":%llu,\"errored\":%llu,\"status_2xx\":%llu,"
                   "\"hub_batches\":%llu,\"hub_duplicates\":%llu,\"hub_delivered\":%llu,"
                   "\"hubd_cpu_s\":%.3f,\"hubd_cpu_ms_per_1000_payloads\":%.3f,"
                   "\"note\":\"every request after the first is all duplicates (dedupe path); "
                   "h2load counts HTTP 2xx, not grpc-status\"}",
                hl->rps, hl->seconds, (unsigned long long)hl->done,
                (unsigned long long)hl->succeeded, (unsigned long long)hl->failed,
                (unsigned long long)hl->errored, (unsigned long long)hl->s2xx,
                (unsigned long long)(hl->st1.batches - hl->st0.batches),
                (unsigned long long)dups,
                (unsigned long long)(hl->st1.delivered - hl->st0.delivered), hl->cpu_s,
                dups ? hl->cpu_s * 1e6 / (double)dups : 0.0);
    }
    fprintf(f, "}\n");
}

int spk_bench_hub(int argc, char **argv)
{
    hc_opts o = {.conns = 16, .streams = 8, .batch = 100, .size = 256, .workers = 2,
                 .plugin_id = 7, .duration_s = 10, .warmup_s = 1, .h2load = true};
    int rc = parse_hub_opts(argc, argv, &o);
    if (rc != 0)
        return rc < 0 ? 0 : rc;
    spk_bench_raise_nofile();
    if (spk_bench_install_signals() != 0)
        return 1;
    static nghttp2_session_callbacks *cbs;
    if (nghttp2_session_callbacks_new(&cbs) != 0)
        return 1;
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_close);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame);
    g_cbs = cbs;

    char dir[PATH_MAX], cfg[PATH_MAX], stats_path[PATH_MAX], log[PATH_MAX], plugin_dir[PATH_MAX];
    if (spk_bh_scratch(dir, sizeof(dir)) != 0)
        return 1;
    if (spk_bh_path(stats_path, sizeof(stats_path), dir, "sink.stats") != 0 ||
        spk_bh_path(log, sizeof(log), dir, "hubd.log") != 0 ||
        spk_bh_path(plugin_dir, sizeof(plugin_dir), spk_bh_bin_dir(), "bench-plugins") != 0)
        return 1;
    spk_bh_machine m;
    spk_bh_machine_get(&m, dir);
    hc *h = calloc(1, sizeof(*h));
    hc_window w = {0};
    h2l_result hl = {0};
    spk_bstats *sink = spk_bh_stats_create(stats_path);
    int port = spk_bench_free_port();
    pid_t hubd = -1;
    rc = 1;
    if (h == NULL || sink == NULL || port < 0 ||
        spk_bh_hub_config(dir, port, o.workers, o.plugin_id, plugin_dir, stats_path, cfg,
                          sizeof(cfg)) != 0)
        goto out;
    spk_bh_print_file(stdout, "hubd config", cfg);
    fflush(stdout);
    if ((hubd = spk_bh_start("hubd", cfg, log, 20)) < 0)
        goto out;
    h->o = &o;
    h->port = port;
    snprintf(h->authority, sizeof(h->authority), "127.0.0.1:%d", port);
    if (hc_run(h, hubd, sink, &w) != 0)
        goto out;
    if (o.h2load && !spk_bench_stop && run_h2load(&o, port, dir, hubd, cfg, &hl) != 0)
        hl.ran = false;
    hub_report r = {.o = &o, .m = &m, .h = h, .w = &w, .hl = &hl,
                    .sink_delivered = w.sink1.count - w.sink0.count};
    if (spk_bh_path(r.hubd_cmd, sizeof(r.hubd_cmd), spk_bh_bin_dir(), "hubd -c hub.yaml") != 0)
        r.hubd_cmd[0] = '\0';
    for (int k = 0; k < HE_N; k++)
        r.errors += h->errors[k];
    print_report(&r);
    if (o.json_path != NULL) {
        FILE *f = fopen(o.json_path, "w");
        if (f == NULL) {
            fprintf(stderr, "spoke-bench: hub: %s: %s\n", o.json_path, strerror(errno));
        } else {
            write_json(&r, f);
            fclose(f);
        }
    }
    rc = r.errors > 0 || h->batches == 0 || (o.h2load && !hl.ran) ? 2 : 0;
out:
    if (hubd > 0) {
        int st = spk_bh_stop(hubd);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "spoke-bench: hub: hubd exited with status %d\n", st);
            print_log_tail(log);
        } else if (rc == 1) {
            print_log_tail(log);
        }
    }
    spk_bh_snap_free(&w.sink0);
    spk_bh_snap_free(&w.sink1);
    spk_bstats_unmap(sink);
    free(h);
    nghttp2_session_callbacks_del(cbs);
    if (getenv("SPOKE_BENCH_KEEP") == NULL)
        spk_bh_scratch_remove(dir);
    else
        fprintf(stderr, "spoke-bench: hub: kept %s\n", dir);
    return rc;
}
