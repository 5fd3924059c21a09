/*
 * spoke-bench -- the load tool. One binary, one subcommand per kind of benchmark:
 *
 *   echo    a fast echo server, the upstream of the proxy benchmarks
 *   proxy   N connections of request/response round trips against an address; prints
 *           throughput and a latency histogram's percentiles (text or --json)
 *   hooks   in-process cost of the plugin chain, ns per hook call
 *   signals in-process cost of a plugin's signal through the policies (core/policy.h)
 *   queue   the durable queue's throughput (built with the queue library)
 *   reload, crash   the supervisor: reloads and worker crashes under load
 *   hub     hubd's batches and payloads per second from many gRPC clients (and h2load)
 *   uplink  payloads per second and delivery latency from edges' queues into hubd
 *   all     every one of them, writing docs/benchmarks.md's generated section and plot
 *
 * This file holds main and the usage text; each subcommand lives in tools/bench_<name>.c
 * (see bench.h for the calling convention), and the small parsers and helpers they share
 * in tools/bench_util.c.
 */
#include "bench.h"

#include <stdlib.h>
#include <string.h>

static void usage(FILE *f)
{
    fprintf(f, "usage: spoke-bench COMMAND [OPTIONS]\n"
               "\n"
               "Commands:\n");
    spk_bench_echo_usage(f);
    spk_bench_proxy_usage(f);
    spk_bench_hooks_usage(f);
    spk_bench_signals_usage(f);
    spk_bench_hub_usage(f);
    spk_bench_uplink_usage(f);
    spk_bench_pg_usage(f);
    if (spk_bench_supervisor_usage != NULL) {
        fprintf(f, "  reload, crash: the supervisor under change:\n");
        spk_bench_supervisor_usage(f);
    }
#ifdef SPOKE_BENCH_HAVE_QUEUE
    fprintf(f, "  queue [OPTIONS]\n"
               "      throughput of the durable queue; see `spoke-bench queue --help`\n");
#endif
    spk_bench_all_usage(f);
    fprintf(f, "  help\n"
               "      this text\n"
               "\n"
               "Addresses are host:port, [v6]:port or unix:/path. Durations and sizes are\n"
               "written as in the config file: 500ms, 10s, 2m, 1h (a bare 0 is zero);\n"
               "128, 16KiB, 1MiB, 1GiB (a bare number is bytes). Exit status: 0 ok,\n"
               "1 usage or setup error, 2 the run finished but saw errors.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stdout);
        return 0;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "proxy") == 0)
        return spk_bench_proxy(argc - 1, argv + 1);
    if (strcmp(cmd, "echo") == 0)
        return spk_bench_echo(argc - 1, argv + 1);
    if (strcmp(cmd, "hooks") == 0)
        return spk_bench_hooks(argc - 1, argv + 1);
    if (strcmp(cmd, "signals") == 0)
        return spk_bench_signals(argc - 1, argv + 1);
    if (strcmp(cmd, "all") == 0)
        return spk_bench_all(argc - 1, argv + 1);
    if (strcmp(cmd, "hub") == 0)
        return spk_bench_hub(argc - 1, argv + 1);
    if (strcmp(cmd, "uplink") == 0)
        return spk_bench_uplink(argc - 1, argv + 1);
    if (strcmp(cmd, "pg") == 0)
        return spk_bench_pg(argc - 1, argv + 1);
    if (strcmp(cmd, "reload") == 0 || strcmp(cmd, "crash") == 0) {
        if (spk_bench_supervisor != NULL)
            return spk_bench_supervisor(argc - 1, argv + 1);
        fprintf(stderr, "spoke-bench: %s: not built into this binary (it needs "
                        "tools/bench_supervisor.c)\n", cmd);
        return 1;
    }
    if (strcmp(cmd, "queue") == 0) {
#ifdef SPOKE_BENCH_HAVE_QUEUE
        if (spk_bench_queue != NULL)
            return spk_bench_queue(argc - 1, argv + 1);
#endif
        fprintf(stderr, "spoke-bench: queue: not built into this binary (it needs the queue "
                        "library and tools/bench_queue.c)\n");
        return 1;
    }
    fprintf(stderr, "spoke-bench: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 1;
}
