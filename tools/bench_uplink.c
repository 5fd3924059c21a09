/*
 * bench_uplink.c -- `spoke-bench uplink`: payloads per second from an edge plugin's
 * send_to_control (committed to the edge's queue) to a control plugin's
 * accept_edge_payload in hubd, and the delivery latency, for E edges (1 and 16 by
 * default, one run each).
 *
 * Each run starts, in a fresh scratch directory, one hubd with the bench-sink control
 * plugin (ID P) and E spoked, each with one worker running the bench-source edge plugin
 * (same ID) and an `uplink:` section pointing at hubd (http://, h2c) with the given
 * heartbeat and batch size. bench-source sends payloads of L bytes from a 1 ms timer at R
 * payloads/s per edge (0: as fast as the queue takes them) while spoke-bench's `go` flag
 * is set; both plugins count into shared files (bench_plugins/bench_stats.h). After the
 * warm-up, the sink's and the sources' counters, hubd's counters (`hubd status`: batches,
 * connections accepted) and the CPU time of hubd and of the spoked process trees are read
 * at the start and the end of the timed part:
 *
 *   enqueued/s    payloads send_to_control accepted (the source), and refusals because
 *                 the queue was full (the edge side is then the limit);
 *   delivered/s   payloads the sink received;
 *   latency       received_timestamp_ms - edge_timestamp_ms of the payloads delivered in
 *                 the window (ms resolution, both stamped by the hosts' CLOCK_REALTIME);
 *   per batch     payloads per batch call, and connections hubd accepted per batch call
 *                 (the uplink on h2c opens one per call with libcurl 7.88: heartbeats are
 *                 calls too, so the ratio is a little over 1).
 */
#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "bench_hub.h"
#include "bench_net.h"

#define MAX_EDGES 256
#define MAX_RUNS 8

typedef struct ub_opts {
    unsigned edges[MAX_RUNS];
    size_t n_runs;
    uint64_t rate;           /* per edge; 0: as fast as the queue takes them */
    size_t size;
    uint64_t heartbeat_ms;
    unsigned batch;
    unsigned hub_workers;
    uint32_t plugin_id;
    double duration_s, warmup_s;
    bool tls;                /* https:// (TLS, ALPN h2, one reused connection) */
    const char *json_path;
} ub_opts;

typedef struct ub_result {
    unsigned edges;
    double seconds;
    uint64_t enqueued, queue_full, send_errors, delivered;
    double lat_p50, lat_p99, lat_p999, lat_max, lat_mean;
    uint64_t batches, connections, hub_refused, hub_no_receiver;
    double hub_cpu_s, edges_cpu_s, uplinks_cpu_s;
    uint64_t backlog_end;    /* enqueued - delivered, over the whole run, at the end */
    double drain_s;          /* how long the backlog took to clear after the end (or -1) */
    int failed;              /* setup failure */
} ub_result;

static void sleep_s(double s)
{
    uint64_t end = spk_bench_now_ns() + (uint64_t)(s * 1e9);
    while (!spk_bench_stop) {
        uint64_t now = spk_bench_now_ns();
        if (now >= end)
            return;
        uint64_t left = end - now;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)(left > 20000000 ? 20000000 : left)};
        nanosleep(&ts, NULL);
    }
}

static int edge_config(const ub_opts *o, const char *dir, unsigned i, int hub_port,
                       const char *plugin_dir, const char *stats, char *cfg, size_t cap)
{
    char edir[PATH_MAX], name[32];
    snprintf(name, sizeof(name), "edge-%u", i);
    if (spk_bh_path(edir, sizeof(edir), dir, name) != 0 || spk_bh_path(cfg, cap, edir, "spoke.yaml") != 0)
        return -1;
    if (mkdir(edir, 0700) != 0 && errno != EEXIST) {
        fprintf(stderr, "spoke-bench: %s: %s\n", edir, strerror(errno));
        return -1;
    }
    int port = spk_bench_free_port();
    FILE *f = fopen(cfg, "w");
    if (port < 0 || f == NULL) {
        if (f != NULL)
            fclose(f);
        return -1;
    }
    fprintf(f,
            "edge:\n"
            "  id: bench-edge-%u\n"
            "  namespace: bench\n"
            "listen:\n"
            "  address: \"127.0.0.1:%d\"\n"
            "  upstream: \"127.0.0.1:9\"\n"
            "  workers: 1\n"
            "plugins:\n"
            "  dir: \"%s\"\n"
            "  list:\n"
            "    - id: %u\n"
            "      name: bench-source\n"
            "      file: bench_source.so\n"
            "      config:\n"
            "        stats: \"%s\"\n"
            "        rate: %llu\n"
            "        size: %zu\n"
            "queue:\n"
            "  path: \"%s/queue\"\n"
            "uplink:\n"
            "  url: \"%s://127.0.0.1:%d\"\n"
            "  heartbeat: %llums\n"
            "  batch_size: %u\n"
            "%s%s%s"
            "log:\n"
            "  level: info\n"
            "run_dir: \"%s/run\"\n"
            "user: \"%s\"\n",
            i, port, plugin_dir, o->plugin_id, stats, (unsigned long long)o->rate, o->size,
            edir, o->tls ? "https" : "http", hub_port, (unsigned long long)o->heartbeat_ms,
            o->batch, o->tls ? "  ca: \"" : "", o->tls ? dir : "", o->tls ? "/cert.pem\"\n" : "",
            edir, spk_bench_run_as());
    return fclose(f) == 0 ? 0 : -1;
}

/* One run with E edges. */
static void ub_run(const ub_opts *o, unsigned E, ub_result *r, bool print_configs)
{
    memset(r, 0, sizeof(*r));
    r->edges = E;
    r->failed = 1;
    r->drain_s = -1;
    char dir[PATH_MAX], hub_cfg[PATH_MAX], sink_path[PATH_MAX], src_path[PATH_MAX];
    char hub_log[PATH_MAX], plugin_dir[PATH_MAX];
    if (spk_bh_scratch(dir, sizeof(dir)) != 0)
        return;
    pid_t hubd = -1, edges[MAX_EDGES];
    for (unsigned i = 0; i < E; i++)
        edges[i] = -1;
    spk_bstats *sink = NULL, *src = NULL;
    spk_bh_snap k0 = {0}, k1 = {0}, s0 = {0}, s1 = {0};
    int hub_port = spk_bench_free_port();
    if (hub_port < 0 || spk_bh_path(sink_path, sizeof(sink_path), dir, "sink.stats") != 0 ||
        spk_bh_path(src_path, sizeof(src_path), dir, "source.stats") != 0 ||
        spk_bh_path(hub_log, sizeof(hub_log), dir, "hubd.log") != 0 ||
        spk_bh_path(plugin_dir, sizeof(plugin_dir), spk_bh_bin_dir(), "bench-plugins") != 0)
        goto out;
    if ((sink = spk_bh_stats_create(sink_path)) == NULL ||
        (src = spk_bh_stats_create(src_path)) == NULL)
        goto out;
    if ((o->tls && spk_bh_make_cert(dir) != 0) ||
        spk_bh_hub_config_tls(dir, hub_port, o->hub_workers, o->plugin_id, plugin_dir,
                              sink_path, o->tls, hub_cfg, sizeof(hub_cfg)) != 0 ||
        (hubd = spk_bh_start("hubd", hub_cfg, hub_log, 20)) < 0)
        goto out;
    for (unsigned i = 0; i < E; i++) {
        char cfg[PATH_MAX], log[PATH_MAX], name[32];
        snprintf(name, sizeof(name), "edge-%u/spoked.log", i);
        if (edge_config(o, dir, i, hub_port, plugin_dir, src_path, cfg, sizeof(cfg)) != 0 ||
            spk_bh_path(log, sizeof(log), dir, name) != 0)
            goto out;
        if (i == 0 && print_configs) {
            spk_bh_print_file(stdout, "hubd config", hub_cfg);
            spk_bh_print_file(stdout, "spoked config of edge 0 (the others differ in id, ports, paths)",
                       cfg);
        }
        if ((edges[i] = spk_bh_start("spoked", cfg, log, 20)) < 0)
            goto out;
    }
    if (atomic_load(&src->instances) != E) {
        fprintf(stderr, "spoke-bench: uplink: %u of %u bench-source plugins started\n",
                atomic_load(&src->instances), E);
        goto out;
    }
    atomic_store(&src->go, 1);
    sleep_s(o->warmup_s);
    spk_bh_hub_status st0, st1;
    double cpu_h0 = spk_bh_cpu_s(hubd), cpu_e0 = 0, cpu_u0 = 0;
    for (unsigned i = 0; i < E; i++) {
        cpu_e0 += spk_bh_cpu_s(edges[i]);
        cpu_u0 += spk_bh_cpu_children_s(edges[i], "--uplink");
    }
    if (spk_bh_snap_take(sink, &k0) != 0 || spk_bh_snap_take(src, &s0) != 0 ||
        spk_bh_hub_status_get(hub_cfg, &st0) != 0)
        goto out;
    uint64_t t0 = spk_bench_now_ns();
    sleep_s(o->duration_s);
    if (spk_bench_stop)
        goto out;
    r->seconds = (double)(spk_bench_now_ns() - t0) / 1e9;
    r->hub_cpu_s = spk_bh_cpu_s(hubd) - cpu_h0;
    for (unsigned i = 0; i < E; i++) {
        r->edges_cpu_s += spk_bh_cpu_s(edges[i]);
        r->uplinks_cpu_s += spk_bh_cpu_children_s(edges[i], "--uplink");
    }
    r->edges_cpu_s -= cpu_e0;
    r->uplinks_cpu_s -= cpu_u0;
    if (spk_bh_snap_take(sink, &k1) != 0 || spk_bh_snap_take(src, &s1) != 0 ||
        spk_bh_hub_status_get(hub_cfg, &st1) != 0)
        goto out;
    atomic_store(&src->go, 0);
    r->enqueued = s1.count - s0.count;
    r->queue_full = s1.queue_full - s0.queue_full;
    r->send_errors = s1.errors - s0.errors;
    r->delivered = k1.count - k0.count;
    r->lat_p50 = spk_bh_snap_quantile(&k1, &k0, 0.50);
    r->lat_p99 = spk_bh_snap_quantile(&k1, &k0, 0.99);
    r->lat_p999 = spk_bh_snap_quantile(&k1, &k0, 0.999);
    r->lat_max = spk_bh_snap_quantile(&k1, &k0, 1.0);
    r->lat_mean = r->delivered ? (double)(k1.lat_sum_ms - k0.lat_sum_ms) / (double)r->delivered
                               : -1;
    r->batches = st1.batches - st0.batches;
    r->connections = st1.connections - st0.connections;
    r->hub_refused = st1.refused - st0.refused;
    r->hub_no_receiver = st1.no_receiver - st0.no_receiver;
    /* After the end: how long the edges' backlog takes to reach the hub (at most 5 s). */
    uint64_t te = spk_bench_now_ns();
    for (;;) {
        uint64_t sent = atomic_load(&src->count), got = atomic_load(&sink->count);
        if (got >= sent) {
            r->drain_s = (double)(spk_bench_now_ns() - te) / 1e9;
            break;
        }
        if (spk_bench_now_ns() - te > 5 * NS_PER_S || spk_bench_stop) {
            r->backlog_end = sent - got;
            break;
        }
        sleep_s(0.01);
    }
    r->failed = 0;
out:
    for (unsigned i = 0; i < E; i++)
        if (edges[i] > 0)
            spk_bh_stop(edges[i]);
    if (hubd > 0)
        spk_bh_stop(hubd);
    spk_bh_snap_free(&k0);
    spk_bh_snap_free(&k1);
    spk_bh_snap_free(&s0);
    spk_bh_snap_free(&s1);
    spk_bstats_unmap(sink);
    spk_bstats_unmap(src);
    if (getenv("SPOKE_BENCH_KEEP") == NULL)
        spk_bh_scratch_remove(dir);
    else
        fprintf(stderr, "spoke-bench: uplink: kept %s\n", dir);
}

/* ---- report ------------------------------------------------------------------------------ */

static void print_results(const ub_opts *o, const ub_result *rs, size_t n)
{
    printf("\n  %-34s", "edges");
    for (size_t i = 0; i < n; i++)
        printf(" %12u", rs[i].edges);
    printf("\n");
#define ROW(label, fmt, expr)                                                              \
    do {                                                                                   \
        printf("  %-34s", label);                                                          \
        for (size_t i = 0; i < n; i++) {                                                   \
            const ub_result *r = &rs[i];                                                   \
            if (r->failed)                                                                 \
                printf(" %12s", "failed");                                                 \
            else                                                                           \
                printf(" " fmt, expr);                                                     \
        }                                                                                  \
        printf("\n");                                                                      \
    } while (0)
    ROW("enqueued payloads/s (all edges)", "%12.0f", (double)r->enqueued / r->seconds);
    ROW("  refused: queue full /s", "%12.0f", (double)r->queue_full / r->seconds);
    ROW("delivered payloads/s at the hub", "%12.0f", (double)r->delivered / r->seconds);
    ROW("delivered per edge /s", "%12.0f", (double)r->delivered / r->seconds / r->edges);
    ROW("batch calls/s at the hub", "%12.0f", (double)r->batches / r->seconds);
    ROW("payloads per batch", "%12.1f", r->batches ? (double)r->delivered / (double)r->batches : 0.0);
    ROW("connections per batch call", "%12.2f",
        r->batches ? (double)r->connections / (double)r->batches : 0.0);
    ROW("delivery latency ms p50", "%12.0f", r->lat_p50);
    ROW("delivery latency ms p99", "%12.0f", r->lat_p99);
    ROW("delivery latency ms p99.9", "%12.0f", r->lat_p999);
    ROW("delivery latency ms max", "%12.0f", r->lat_max);
    ROW("p99 / heartbeat", "%12.2f", r->lat_p99 / (double)o->heartbeat_ms);
    ROW("hubd CPU ms / 1,000 payloads", "%12.1f",
        r->delivered ? r->hub_cpu_s * 1e6 / (double)r->delivered : 0.0);
    ROW("hubd CPU (cores busy)", "%12.2f", r->hub_cpu_s / r->seconds);
    ROW("spoked CPU, all edges (cores)", "%12.2f", r->edges_cpu_s / r->seconds);
    ROW("  of which the uplinks (cores)", "%12.2f", r->uplinks_cpu_s / r->seconds);
    ROW("uplink CPU us/batch call (+beats)", "%12.0f",
        r->batches ? r->uplinks_cpu_s * 1e6 / (double)r->batches : 0.0);
    ROW("s to clear the backlog at the end", "%12.2f", r->drain_s); /* -1: not in 5 s */
    ROW("  payloads still queued after 5 s", "%12llu", (unsigned long long)r->backlog_end);
    ROW("errors (send, refused, no receiver)", "%12llu",
        (unsigned long long)(r->send_errors + r->hub_refused + r->hub_no_receiver));
#undef ROW
    printf("\n  targets (issue 11): 300,000 payloads/s into one hubd with group commit on; "
           "delivery p99 under\n  1.5 heartbeats (%.0f ms here).",
           1.5 * (double)o->heartbeat_ms);
    for (size_t i = 0; i < n; i++) {
        const ub_result *r = &rs[i];
        if (r->failed)
            continue;
        double pps = (double)r->delivered / r->seconds;
        printf("\n  %u edge%s: %.0f payloads/s = %.1f%% of 300,000; p99 %.0f ms = %.2f "
               "heartbeats (%s)",
               r->edges, r->edges == 1 ? "" : "s", pps, pps / 3000.0, r->lat_p99,
               r->lat_p99 / (double)o->heartbeat_ms,
               r->lat_p99 < 1.5 * (double)o->heartbeat_ms ? "met" : "missed");
    }
    printf("\n  bounds: each edge's uplink has one batch call in flight at a time (at most "
           "batch_size\n  payloads per round trip)%s.\n",
           o->tls ? "; over TLS libcurl keeps one connection"
                  : ", and on h2c each call opens its own connection (libcurl 7.88)");
}

static void write_json(const ub_opts *o, const spk_bh_machine *m, const ub_result *rs,
                       size_t n, FILE *f)
{
    fprintf(f, "{\"bench\":\"uplink\",\"machine\":");
    spk_bh_machine_json(f, m);
    fprintf(f, ",\"config\":{\"rate_per_edge\":%llu,\"size\":%zu,\"heartbeat_ms\":%llu,"
               "\"batch_size\":%u,\"hub_workers\":%u,\"plugin_id\":%u,\"duration_s\":%.3f,"
               "\"warmup_s\":%.3f,\"uplink\":\"%s\"},\"runs\":[",
            (unsigned long long)o->rate, o->size, (unsigned long long)o->heartbeat_ms, o->batch,
            o->hub_workers, o->plugin_id, o->duration_s, o->warmup_s,
            o->tls ? "https:// (TLS)" : "http:// (h2c)");
    for (size_t i = 0; i < n; i++) {
        const ub_result *r = &rs[i];
        fprintf(f, "%s{\"edges\":%u,\"ok\":%s", i ? "," : "", r->edges, r->failed ? "false" : "true");
        if (!r->failed)
            fprintf(f, ",\"seconds\":%.3f,\"enqueued\":%llu,\"queue_full\":%llu,"
                       "\"send_errors\":%llu,\"delivered\":%llu,\"delivered_per_s\":%.1f,"
                       "\"batches\":%llu,\"connections\":%llu,\"latency_ms\":{\"p50\":%.0f,"
                       "\"p99\":%.0f,\"p999\":%.0f,\"max\":%.0f,\"mean\":%.1f},"
                       "\"hub_refused\":%llu,\"hub_no_receiver\":%llu,\"hubd_cpu_s\":%.3f,"
                       "\"hubd_cpu_ms_per_1000_payloads\":%.3f,\"spoked_cpu_s\":%.3f,"
                       "\"uplinks_cpu_s\":%.3f,\"drain_s\":%.3f,\"backlog_end\":%llu",
                    r->seconds, (unsigned long long)r->enqueued,
                    (unsigned long long)r->queue_full, (unsigned long long)r->send_errors,
                    (unsigned long long)r->delivered, (double)r->delivered / r->seconds,
                    (unsigned long long)r->batches, (unsigned long long)r->connections,
                    r->lat_p50, r->lat_p99, r->lat_p999, r->lat_max, r->lat_mean,
                    (unsigned long long)r->hub_refused, (unsigned long long)r->hub_no_receiver,
                    r->hub_cpu_s, r->delivered ? r->hub_cpu_s * 1e6 / (double)r->delivered : 0.0,
                    r->edges_cpu_s, r->uplinks_cpu_s, r->drain_s,
                    (unsigned long long)r->backlog_end);
        fprintf(f, "}");
    }
    fprintf(f, "]}\n");
}

/* ---- the subcommand ------------------------------------------------------------------------ */

void spk_bench_uplink_usage(FILE *f)
{
    fprintf(f, "  uplink [--edges 1,16] [--rate 0] [--size 256] [--heartbeat 100ms] [--batch 100]\n"
               "      [--hub-workers 2] [--duration 10s] [--warmup 2s] [--plugin-id 7]\n"
               "      [--tls] [--bin-dir DIR] [--json FILE]\n"
               "      for each edge count E: one hubd (bench-sink) and E spoked (bench-source\n"
               "      sending RATE payloads/s each, 0 = as fast as the queue takes them, and an\n"
               "      h2c uplink to hubd). Prints enqueued and delivered payloads/s, batch calls\n"
               "      and connections per call, delivery latency p50/p99 (edge to hub, ms) and\n"
               "      CPU, against the issue's targets. --tls: https:// with a self-signed\n"
               "      certificate (libcurl reuses the connection; h2c opens one per call).\n"
               "      --bin-dir: hubd, spoked and bench-plugins/ from another build.\n");
}

static int ub_bad(const char *opt, const char *want, const char *got)
{
    fprintf(stderr, "spoke-bench: uplink: %s: expected %s, got '%s'\n", opt, want, got);
    return 1;
}

static int parse_edges(const char *text, ub_opts *o)
{
    char buf[128];
    snprintf(buf, sizeof(buf), "%s", text);
    o->n_runs = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok != NULL;
         tok = strtok_r(NULL, ",", &save)) {
        uint64_t v;
        if (o->n_runs == MAX_RUNS || spk_bench_parse_uint(tok, 1, MAX_EDGES, &v) != 0)
            return -1;
        o->edges[o->n_runs++] = (unsigned)v;
    }
    return o->n_runs > 0 ? 0 : -1;
}

static int parse_uplink_opts(int argc, char **argv, ub_opts *o)
{
    static const struct option opts[] = {
        {"edges", required_argument, NULL, 'E'},     {"rate", required_argument, NULL, 'r'},
        {"size", required_argument, NULL, 'l'},      {"heartbeat", required_argument, NULL, 'H'},
        {"batch", required_argument, NULL, 'b'},     {"hub-workers", required_argument, NULL, 'W'},
        {"duration", required_argument, NULL, 'd'},  {"warmup", required_argument, NULL, 'w'},
        {"plugin-id", required_argument, NULL, 'P'}, {"json", required_argument, NULL, 'j'},
        {"bin-dir", required_argument, NULL, 'B'},   {"tls", no_argument, NULL, 'T'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    uint64_t v;
    double d;
    int ch;
    optind = 0;
    while ((ch = getopt_long(argc, argv, "E:r:l:H:b:W:d:w:P:j:B:Th", opts, NULL)) != -1) {
        switch (ch) {
        case 'E':
            if (parse_edges(optarg, o) != 0)
                return ub_bad("--edges", "a list such as 1,16 (each 1..256, at most 8)", optarg);
            break;
        case 'r':
            if (strcmp(optarg, "0") == 0)
                o->rate = 0;
            else if (spk_bench_parse_uint(optarg, 1, 10000000, &o->rate) != 0)
                return ub_bad("--rate", "payloads/s per edge, 0 = unlimited", optarg);
            break;
        case 'l':
            if (spk_bench_parse_uint(optarg, 1, 1u << 20, &v) != 0)
                return ub_bad("--size", "1 byte..1MiB", optarg);
            o->size = (size_t)v;
            break;
        case 'H':
            if (spk_bench_parse_duration(optarg, 0, &d) != 0 || d < 0.001)
                return ub_bad("--heartbeat", "a duration such as 100ms", optarg);
            o->heartbeat_ms = (uint64_t)(d * 1000.0 + 0.5);
            break;
        case 'b':
            if (spk_bench_parse_uint(optarg, 1, 10000, &v) != 0)
                return ub_bad("--batch", "1..10000", optarg);
            o->batch = (unsigned)v;
            break;
        case 'W':
            if (spk_bench_parse_uint(optarg, 1, 64, &v) != 0)
                return ub_bad("--hub-workers", "1..64", optarg);
            o->hub_workers = (unsigned)v;
            break;
        case 'd':
            if (spk_bench_parse_duration(optarg, 0, &o->duration_s) != 0)
                return ub_bad("--duration", "a duration such as 10s", optarg);
            break;
        case 'w':
            if (spk_bench_parse_duration(optarg, 1, &o->warmup_s) != 0)
                return ub_bad("--warmup", "a duration such as 2s or 0", optarg);
            break;
        case 'P':
            if (spk_bench_parse_uint(optarg, 1, UINT32_MAX, &v) != 0)
                return ub_bad("--plugin-id", "1..4294967295", optarg);
            o->plugin_id = (uint32_t)v;
            break;
        case 'j': o->json_path = optarg; break;
        case 'B': spk_bh_set_bin_dir(optarg); break;
        case 'T': o->tls = true; break;
        case 'h': spk_bench_uplink_usage(stdout); return -1;
        default: spk_bench_uplink_usage(stderr); return 1;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "spoke-bench: uplink: unexpected argument '%s'\n", argv[optind]);
        return 1;
    }
    return 0;
}

int spk_bench_uplink(int argc, char **argv)
{
    ub_opts o = {.edges = {1, 16}, .n_runs = 2, .rate = 0, .size = 256, .heartbeat_ms = 100,
                 .batch = 100, .hub_workers = 2, .plugin_id = 7, .duration_s = 10,
                 .warmup_s = 2};
    int rc = parse_uplink_opts(argc, argv, &o);
    if (rc != 0)
        return rc < 0 ? 0 : rc;
    spk_bench_raise_nofile();
    if (spk_bench_install_signals() != 0)
        return 1;
    const char *tmp = getenv("TMPDIR");
    spk_bh_machine m;
    spk_bh_machine_get(&m, tmp != NULL && tmp[0] ? tmp : "/tmp");
    printf("spoke-bench uplink\n");
    spk_bh_machine_print(stdout, &m);
    printf("load: bench-source in each edge, %s, %zu-byte payloads; uplink %s, "
           "heartbeat %llu ms, batch_size %u; hubd %u workers with bench-sink; %.1f s measured "
           "after %.1f s warm-up\n",
           o.rate ? "a fixed rate per edge" : "as fast as the queue takes them", o.size,
           o.tls ? "https:// (TLS, ALPN h2)" : "http:// (h2c)", (unsigned long long)o.heartbeat_ms, o.batch, o.hub_workers, o.duration_s,
           o.warmup_s);
    if (o.rate)
        printf("      rate %llu payloads/s per edge\n", (unsigned long long)o.rate);
    ub_result rs[MAX_RUNS];
    bool any_failed = false;
    for (size_t i = 0; i < o.n_runs && !spk_bench_stop; i++) {
        ub_run(&o, o.edges[i], &rs[i], i == 0);
        any_failed |= rs[i].failed != 0;
        fflush(stdout);
    }
    size_t n = o.n_runs;
    print_results(&o, rs, n);
    if (o.json_path != NULL) {
        FILE *f = fopen(o.json_path, "w");
        if (f == NULL) {
            fprintf(stderr, "spoke-bench: uplink: %s: %s\n", o.json_path, strerror(errno));
        } else {
            write_json(&o, &m, rs, n, f);
            fclose(f);
        }
    }
    if (any_failed || spk_bench_stop)
        return 1;
    for (size_t i = 0; i < n; i++)
        if (rs[i].delivered == 0 || rs[i].send_errors + rs[i].hub_refused + rs[i].hub_no_receiver)
            return 2;
    return 0;
}
