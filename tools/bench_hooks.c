/*
 * bench_hooks.c -- `spoke-bench hooks`: what the plugin chain costs per hook call,
 * measured in-process through the same internal API a worker uses.
 *
 * For 0, 1, 4 and 16 plugins it opens the passthrough plugin that many times
 * (spk_plugin_open loads a private copy each time, so these are N distinct plugins named
 * passthrough-1..N), initialises the set, builds the chain and times spk_chain_run
 * (on_traffic_from_client) over a 128-byte buffer in a tight loop: `iterations` runs per
 * repetition, several repetitions, the best one reported (the least disturbed by the rest
 * of the machine). spk_chain_run lives in another translation unit, so the compiler
 * cannot fold the loop away; each run's verdict is checked.
 *
 * Reported: ns per chain run; ns per hook call (run / N), and ns per hook above the empty
 * chain ((run(N) - run(0)) / N), which takes the loop and the call into spk_chain_run out
 * and leaves what one more plugin costs: its indirect call, the watchdog slot stores and
 * the call count. Each count runs twice, interleaved: with the latency histogram off
 * (calls counted, none timed) and on (1 in --hook-sample calls timed, as a worker does
 * with metrics.hook_sample), both counting into a hook stats table like a worker's.
 */
#include <getopt.h>
#include <limits.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <ev.h>

#include "bench.h"
#include "chain.h"
#include "config.h"
#include "host.h"
#include "loader.h"

#define BUF_SIZE 128

static const unsigned plugin_counts[] = {0, 1, 4, 16};
#define N_COUNTS (sizeof(plugin_counts) / sizeof(plugin_counts[0]))

typedef struct hooks_opts {
    char plugin[PATH_MAX];
    uint64_t iterations;
    unsigned repetitions;
    unsigned hook_sample; /* the histogram's "on": time 1 in this many calls */
    bool json;
} hooks_opts;

typedef struct hooks_env {
    struct ev_loop *loop;
    spk_config *cfg;
    spk_host_env host;
    spk_hookstats *hs; /* where the hooks count, as in a worker's status slot */
} hooks_env;

/* Open `n` copies of the plugin as passthrough-1..n, initialise them. */
static int open_set(const hooks_opts *o, hooks_env *he, unsigned n, spk_plugin_set *set)
{
    spk_errbuf eb;
    set->v = n ? calloc(n, sizeof(*set->v)) : NULL;
    set->n = 0;
    if (n && set->v == NULL) {
        fprintf(stderr, "spoke-bench: hooks: out of memory\n");
        return -1;
    }
    for (unsigned i = 0; i < n; i++) {
        spk_plugin *p;
        if (spk_plugin_open(o->plugin, NULL, spk_host_table(), &p, &eb) != 0) {
            fprintf(stderr, "spoke-bench: hooks: %s\n", eb.msg);
            return -1;
        }
        set->v[set->n++] = p;
        char name[32];
        snprintf(name, sizeof(name), "passthrough-%u", i + 1);
        char *copy = strdup(name);
        if (copy == NULL) {
            fprintf(stderr, "spoke-bench: hooks: out of memory\n");
            return -1;
        }
        free(p->name);
        p->name = copy;
        snprintf(p->log_prefix, sizeof(p->log_prefix), "plugin %s: ", p->name);
        p->index = i;
        p->env = &he->host;
    }
    if (spk_plugin_set_init(set, SPOKE_ROLE_EDGE, &eb) != 0) {
        fprintf(stderr, "spoke-bench: hooks: %s\n", eb.msg);
        return -1;
    }
    return 0;
}

/* Best ns per spk_chain_run over o->repetitions runs of o->iterations. */
static int time_chain(const hooks_opts *o, const spk_chain *ch, spoke_conn *conn,
                      spk_buf *buf, double *best_ns)
{
    *best_ns = -1;
    for (unsigned r = 0; r < o->repetitions; r++) {
        unsigned acc = 0;
        uint64_t t0 = spk_bench_now_ns();
        for (uint64_t i = 0; i < o->iterations; i++)
            acc |= (unsigned)spk_chain_run(ch, SPK_HOOK_FROM_CLIENT, conn, buf);
        uint64_t t1 = spk_bench_now_ns();
        if (acc != SPOKE_CONTINUE || buf->pub.len != BUF_SIZE) {
            fprintf(stderr, "spoke-bench: hooks: the chain returned verdict bits %u and a "
                            "%zu-byte buffer; passthrough should continue and change "
                            "nothing\n", acc, buf->pub.len);
            return -1;
        }
        double ns = (double)(t1 - t0) / (double)o->iterations;
        if (*best_ns < 0 || ns < *best_ns)
            *best_ns = ns;
    }
    return 0;
}

/* Load n plugins, time the chain with 1 in `sample` calls timed (0: none), release
 * everything. */
static int measure(const hooks_opts *o, hooks_env *he, unsigned n, unsigned sample, double *ns)
{
    spk_plugin_set set = {0};
    spk_chain ch;
    spoke_conn conn;
    static uint8_t data[BUF_SIZE];
    spk_buf buf = {0};
    int rc = open_set(o, he, n, &set);
    if (rc == 0)
        spk_plugin_set_stats(&set, he->hs, sample);
    if (rc == 0 && (rc = spk_chain_build(&ch, &set)) != 0)
        fprintf(stderr, "spoke-bench: hooks: chain: %s\n", spk_strerror(rc));
    if (rc != 0) {
        spk_host_unload(&set);
        return -1;
    }
    rc = spk_chain_conn_init(&ch, &conn, 1, "spoke-bench");
    if (rc != 0) {
        fprintf(stderr, "spoke-bench: hooks: connection: %s\n", spk_strerror(rc));
    } else {
        memset(data, 'x', sizeof(data));
        spk_buf_view(&buf, data, sizeof(data));
        rc = time_chain(o, &ch, &conn, &buf, ns);
        spk_chain_close(&ch, &conn);
        spk_chain_conn_fini(&conn);
    }
    spk_buf_free(&buf);
    spk_chain_free(&ch);
    spk_host_unload(&set);
    return rc;
}

/* ns[0][]: histogram off, ns[1][]: on. */
static void report(const hooks_opts *o, const double ns[2][N_COUNTS])
{
    const unsigned samples[2] = {0, o->hook_sample};
    if (o->json) {
        printf("{\"plugin\":");
        spk_bench_json_string(stdout, o->plugin);
        printf(",\"hook\":\"on_traffic_from_client\",\"buf_size\":%d,"
               "\"iterations\":%llu,\"repetitions\":%u,\"results\":[",
               BUF_SIZE, (unsigned long long)o->iterations, o->repetitions);
        for (int h = 0; h < 2; h++) {
            for (size_t i = 0; i < N_COUNTS; i++) {
                unsigned n = plugin_counts[i];
                printf("%s{\"plugins\":%u,\"hook_sample\":%u,\"ns_per_run\":%.3f",
                       h || i ? "," : "", n, samples[h], ns[h][i]);
                if (n > 0)
                    printf(",\"ns_per_hook\":%.3f,\"ns_per_hook_above_empty\":%.3f",
                           ns[h][i] / n, (ns[h][i] - ns[h][0]) / n);
                printf("}");
            }
        }
        printf("]}\n");
        return;
    }
    printf("spoke-bench hooks: %s, on_traffic_from_client over a %d-byte buffer\n",
           o->plugin, BUF_SIZE);
    printf("%llu chain runs per repetition, best of %u repetitions; latency histogram off "
           "(calls counted) and on (1 in %u calls timed)\n\n",
           (unsigned long long)o->iterations, o->repetitions, o->hook_sample);
    printf("| plugins | histogram | ns per chain run | ns per hook call | ns per hook above "
           "empty chain |\n");
    printf("|--------:|:----------|-----------------:|-----------------:|------------------"
           "------------:|\n");
    for (size_t i = 0; i < N_COUNTS; i++) {
        for (int h = 0; h < 2; h++) {
            unsigned n = plugin_counts[i];
            const char *mode = h ? "on" : "off";
            if (n == 0)
                printf("| %7u | %-9s | %16.2f | %16s | %29s |\n", n, mode, ns[h][i], "-", "-");
            else
                printf("| %7u | %-9s | %16.2f | %16.2f | %29.2f |\n", n, mode, ns[h][i],
                       ns[h][i] / n, (ns[h][i] - ns[h][0]) / n);
        }
    }
}

void spk_bench_hooks_usage(FILE *f)
{
    fprintf(f, "  hooks [--plugin PATH] [--iterations 10000000] [--repetitions 5]\n"
               "        [--hook-sample 256] [--json]\n"
               "      in-process cost of the chain: ns per hook call with 0, 1, 4 and 16\n"
               "      passthrough plugins (best repetition), with the hook latency histogram\n"
               "      off and on (1 in --hook-sample calls timed). PATH defaults to\n"
               "      plugins/passthrough.so next to the spoke-bench binary.\n");
}

static int parse_hooks_opts(int argc, char **argv, hooks_opts *o)
{
    static const struct option opts[] = {
        {"plugin", required_argument, NULL, 'P'},
        {"iterations", required_argument, NULL, 'n'},
        {"repetitions", required_argument, NULL, 'r'},
        {"hook-sample", required_argument, NULL, 's'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    uint64_t v;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "P:n:r:s:jh", opts, NULL)) != -1) {
        switch (c) {
        case 'P':
            if ((size_t)snprintf(o->plugin, sizeof(o->plugin), "%s", optarg) >=
                sizeof(o->plugin)) {
                fprintf(stderr, "spoke-bench: hooks: --plugin: path too long\n");
                return 1;
            }
            break;
        case 'n':
            if (spk_bench_parse_uint(optarg, 1, 1ull << 40, &o->iterations) != 0) {
                fprintf(stderr, "spoke-bench: hooks: --iterations: expected a positive "
                                "number, got '%s'\n", optarg);
                return 1;
            }
            break;
        case 'r':
            if (spk_bench_parse_uint(optarg, 1, 1000, &v) != 0) {
                fprintf(stderr, "spoke-bench: hooks: --repetitions: expected 1..1000, got "
                                "'%s'\n", optarg);
                return 1;
            }
            o->repetitions = (unsigned)v;
            break;
        case 's':
            if (spk_bench_parse_uint(optarg, 1, 65536, &v) != 0) {
                fprintf(stderr, "spoke-bench: hooks: --hook-sample: expected 1..65536, got "
                                "'%s'\n", optarg);
                return 1;
            }
            o->hook_sample = (unsigned)v;
            break;
        case 'j': o->json = true; break;
        case 'h': spk_bench_hooks_usage(stdout); return -1;
        default: spk_bench_hooks_usage(stderr); return 1;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "spoke-bench: hooks: unexpected argument '%s'\n", argv[optind]);
        return 1;
    }
    if (o->plugin[0] == '\0') {
        char dir[PATH_MAX];
        if (spk_bench_self_dir(dir, sizeof(dir)) != 0 ||
            (size_t)snprintf(o->plugin, sizeof(o->plugin), "%s/plugins/passthrough.so",
                             dir) >= sizeof(o->plugin)) {
            fprintf(stderr, "spoke-bench: hooks: cannot locate the spoke-bench binary; "
                            "give --plugin PATH\n");
            return 1;
        }
    }
    return 0;
}

int spk_bench_hooks(int argc, char **argv)
{
    hooks_opts o = {.iterations = 10000000, .repetitions = 5,
                    .hook_sample = SPK_HOOK_SAMPLE_DEFAULT};
    int rc = parse_hooks_opts(argc, argv, &o);
    if (rc != 0)
        return rc < 0 ? 0 : rc;
    hooks_env he = {0};
    he.loop = ev_loop_new(EVFLAG_AUTO);
    he.cfg = calloc(1, sizeof(*he.cfg));
    he.hs = calloc(1, sizeof(*he.hs));
    if (he.loop == NULL || he.cfg == NULL || he.hs == NULL) {
        fprintf(stderr, "spoke-bench: hooks: %s\n",
                he.loop == NULL ? "ev_loop_new failed" : "out of memory");
        rc = 1;
        goto out;
    }
    spk_host_env_init(&he.host, he.loop, he.cfg, SPOKE_ROLE_EDGE);
    double ns[2][N_COUNTS];
    for (size_t i = 0; i < N_COUNTS && rc == 0; i++)
        for (int h = 0; h < 2 && rc == 0; h++)
            if (measure(&o, &he, plugin_counts[i], h ? o.hook_sample : 0, &ns[h][i]) != 0)
                rc = 1;
    if (rc == 0)
        report(&o, ns);
out:
    free(he.hs);
    free(he.cfg);
    if (he.loop != NULL)
        ev_loop_destroy(he.loop);
    return rc;
}
