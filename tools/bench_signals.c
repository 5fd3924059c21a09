/*
 * bench_signals.c -- `spoke-bench signals`: what a plugin's signal costs, with and without
 * policies (core/policy.h), measured in-process through the host table a plugin calls.
 *
 * Each scenario is a config (written to a temporary file and loaded with
 * spk_config_load, so the policies go through the parser and the Lua check a worker's
 * go through), a policy engine built from it with spk_policy_new as a worker builds
 * its own, and a plugin context whose env holds that engine. The timed loop calls
 * host->signal(ctx, conn, "bench", {reason=x}, 1) `iterations` times per repetition; the
 * best repetition is reported. The signal's name is one no built-in acts on, so without
 * a policy the built-in behaviour is a debug line the log level drops: the baseline is
 * the service's own cost.
 *
 * Scenarios: no policies; one policy for another signal (the name test only); one
 * matching policy without a condition (no Lua entered); one with a Lua condition that
 * holds; four policies whose first three conditions fail (four Lua evaluations per
 * signal); and a Lua action. "ns per evaluated policy" is (4 conditions - 1 condition)
 * / 3: the cost of one more Lua condition, the figure issue 15 aims under 1 µs.
 */
#include <getopt.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <ev.h>

#include "bench.h"
#include "config.h"
#include "host.h"
#include "log.h"
#include "policy.h"

typedef struct scenario {
    const char *name;
    const char *policies; /* the config's policies: section, or "" */
    unsigned evaluated;   /* Lua conditions or actions run per signal */
} scenario;

static const scenario scenarios[] = {
    {"no policies (built-in)", "", 0},
    {"1 policy for another signal",
     "policies:\n  list:\n"
     "    - { signal: other, action: passthrough }\n",
     0},
    {"1 matching policy, no condition",
     "policies:\n  list:\n"
     "    - { signal: bench, action: passthrough }\n",
     0},
    {"1 matching Lua condition",
     "policies:\n  list:\n"
     "    - signal: bench\n"
     "      when: \"fields.reason == 'x'\"\n"
     "      action: passthrough\n",
     1},
    {"4 Lua conditions, the 4th holds",
     "policies:\n  list:\n"
     "    - { signal: bench, when: \"fields.reason == 'a'\", action: close }\n"
     "    - { signal: bench, when: \"fields.reason == 'b'\", action: close }\n"
     "    - { signal: bench, when: \"plugin.id == 99\", action: close }\n"
     "    - { signal: bench, when: \"conn.peer ~= '' and fields.reason == 'x'\", "
     "action: passthrough }\n",
     4},
    {"1 Lua action (returns nothing)",
     "policies:\n  list:\n"
     "    - signal: bench\n"
     "      run: \"if fields.reason ~= 'x' then return "
     "'close' end\"\n",
     1},
};
#define N_SCENARIOS (sizeof(scenarios) / sizeof(scenarios[0]))

typedef struct signals_opts {
    uint64_t iterations;
    unsigned repetitions;
    bool json;
} signals_opts;

/* Load the scenario's config from a temporary file. */
static int load_config(const scenario *sc, spk_config **cfg)
{
    char path[] = "/tmp/spoke-bench-signals-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) {
        perror("spoke-bench: signals: mkstemp");
        return -1;
    }
    FILE *f = fdopen(fd, "w");
    if (f == NULL) {
        close(fd);
        unlink(path);
        return -1;
    }
    fprintf(f, "listen: { upstream: 127.0.0.1:5432 }\n%s", sc->policies);
    fclose(f);
    spk_errbuf eb;
    int rc = spk_config_load(path, cfg, &eb);
    unlink(path);
    if (rc != 0) {
        fprintf(stderr, "spoke-bench: signals: %s\n", eb.msg);
        return -1;
    }
    return 0;
}

static int measure(const signals_opts *o, struct ev_loop *loop, const scenario *sc, double *best_ns,
                   size_t *lua_bytes)
{
    spk_config *cfg;
    if (load_config(sc, &cfg) != 0)
        return -1;
    spk_host_env env;
    spk_host_env_init(&env, loop, cfg, SPOKE_ROLE_EDGE);
    spk_errbuf eb;
    spk_policy_counters counters = {0};
    if (spk_policy_new(cfg, &env, &counters, &env.policy, &eb) != 0) {
        fprintf(stderr, "spoke-bench: signals: %s\n", eb.msg);
        spk_config_free(cfg);
        return -1;
    }
    spk_plugin p = {0};
    p.name = (char *)"bench";
    p.id = 7;
    p.env = &env;
    p.slot = &p.own_slot;
    p.ctx.plugin = &p;
    snprintf(p.log_prefix, sizeof(p.log_prefix), "plugin bench: ");
    spoke_conn conn = {.id = 1};
    snprintf(conn.peer, sizeof(conn.peer), "127.0.0.1:40000");
    const spoke_host *host = spk_host_table();
    const spoke_kv fields[] = {{"reason", "x"}};
    int rc = 0;
    *best_ns = -1;
    for (unsigned r = 0; r < o->repetitions && rc == 0; r++) {
        int acc = 0;
        uint64_t t0 = spk_bench_now_ns();
        for (uint64_t i = 0; i < o->iterations; i++)
            acc |= host->signal(&p.ctx, &conn, "bench", fields, 1);
        uint64_t t1 = spk_bench_now_ns();
        uint64_t failed =
            counters.errors + counters.timeouts + counters.memory + counters.action_failed;
        if (acc != 0 || conn.flags != 0 || failed != 0) {
            fprintf(stderr,
                    "spoke-bench: signals: %s: signal returned bits %d, connection "
                    "flags %u, %llu failed policies; every scenario should let the "
                    "signal pass\n",
                    sc->name, acc, conn.flags, (unsigned long long)failed);
            rc = -1;
        }
        double ns = (double)(t1 - t0) / (double)o->iterations;
        if (*best_ns < 0 || ns < *best_ns)
            *best_ns = ns;
    }
    *lua_bytes = spk_policy_memory(env.policy);
    spk_policy_free(env.policy);
    spk_config_free(cfg);
    return rc;
}

static void report(const signals_opts *o, const double ns[N_SCENARIOS],
                   const size_t mem[N_SCENARIOS])
{
    double per_eval = (ns[4] - ns[3]) / 3.0;
    if (o->json) {
        printf("{\"iterations\":%llu,\"repetitions\":%u,\"results\":[",
               (unsigned long long)o->iterations, o->repetitions);
        for (size_t i = 0; i < N_SCENARIOS; i++) {
            printf("%s{\"scenario\":", i ? "," : "");
            spk_bench_json_string(stdout, scenarios[i].name);
            printf(",\"lua_evaluations\":%u,\"ns_per_signal\":%.3f,\"lua_state_bytes\":%zu}",
                   scenarios[i].evaluated, ns[i], mem[i]);
        }
        printf("],\"ns_per_evaluated_policy\":%.3f}\n", per_eval);
        return;
    }
    printf("spoke-bench signals: host->signal(\"bench\", {reason=x}) on a connection\n");
    printf("%llu signals per repetition, best of %u repetitions\n\n",
           (unsigned long long)o->iterations, o->repetitions);
    printf("| scenario | Lua calls per signal | ns per signal | Lua state bytes |\n");
    printf("|---|---:|---:|---:|\n");
    for (size_t i = 0; i < N_SCENARIOS; i++)
        printf("| %s | %u | %.1f | %zu |\n", scenarios[i].name, scenarios[i].evaluated, ns[i],
               mem[i]);
    printf("\nns per evaluated policy (4 conditions - 1 condition) / 3: %.1f\n", per_eval);
}

void spk_bench_signals_usage(FILE *f)
{
    fprintf(f, "  signals [--iterations 200000] [--repetitions 20] [--json]\n"
               "      in-process cost of a plugin's signal: no policies, a policy for\n"
               "      another signal, matching policies with and without Lua conditions,\n"
               "      a Lua action (best repetition); ns per evaluated policy.\n");
}

int spk_bench_signals(int argc, char **argv)
{
    static const struct option opts[] = {
        {"iterations", required_argument, NULL, 'n'},
        {"repetitions", required_argument, NULL, 'r'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    signals_opts o = {.iterations = 200000, .repetitions = 20};
    uint64_t v;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "n:r:jh", opts, NULL)) != -1) {
        switch (c) {
        case 'n':
            if (spk_bench_parse_uint(optarg, 1, 1ull << 40, &o.iterations) != 0) {
                fprintf(stderr,
                        "spoke-bench: signals: --iterations: expected a positive "
                        "number, got '%s'\n",
                        optarg);
                return 1;
            }
            break;
        case 'r':
            if (spk_bench_parse_uint(optarg, 1, 1000, &v) != 0) {
                fprintf(stderr,
                        "spoke-bench: signals: --repetitions: expected 1..1000, "
                        "got '%s'\n",
                        optarg);
                return 1;
            }
            o.repetitions = (unsigned)v;
            break;
        case 'j':
            o.json = true;
            break;
        case 'h':
            spk_bench_signals_usage(stdout);
            return 0;
        default:
            spk_bench_signals_usage(stderr);
            return 1;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "spoke-bench: signals: unexpected argument '%s'\n", argv[optind]);
        return 1;
    }
    spk_log_set_level(SPOKE_LOG_WARN); /* the built-in's debug line is dropped, as in a
                                          worker at the default level */
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    if (loop == NULL) {
        fprintf(stderr, "spoke-bench: signals: ev_loop_new failed\n");
        return 1;
    }
    double ns[N_SCENARIOS];
    size_t mem[N_SCENARIOS];
    int rc = 0;
    for (size_t i = 0; i < N_SCENARIOS && rc == 0; i++)
        if (measure(&o, loop, &scenarios[i], &ns[i], &mem[i]) != 0)
            rc = 1;
    if (rc == 0)
        report(&o, ns, mem);
    ev_loop_destroy(loop);
    return rc;
}
