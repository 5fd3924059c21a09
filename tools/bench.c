/*
 * spoke-bench -- the load tool. One binary, one subcommand per kind of benchmark:
 *
 *   echo    a fast echo server, the upstream of the proxy benchmarks
 *   proxy   N connections of request/response round trips against an address; prints
 *           throughput and a latency histogram's percentiles (text or --json)
 *   hooks   in-process cost of the plugin chain, ns per hook call
 *   queue   the durable queue's throughput (built with the queue library)
 *   reload, crash   the supervisor: reloads and worker crashes under load
 *   hub     hubd's batches and payloads per second from many gRPC clients (and h2load)
 *   uplink  payloads per second and delivery latency from edges' queues into hubd
 *
 * This file holds main, the usage text and the small parsers every subcommand uses; each
 * subcommand lives in tools/bench_<name>.c (see bench.h for the calling convention).
 */
#include "bench.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "units.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: spoke-bench COMMAND [OPTIONS]\n"
               "\n"
               "Commands:\n");
    spk_bench_echo_usage(f);
    spk_bench_proxy_usage(f);
    spk_bench_hooks_usage(f);
    spk_bench_hub_usage(f);
    spk_bench_uplink_usage(f);
    if (spk_bench_supervisor_usage != NULL) {
        fprintf(f, "  reload, crash: the supervisor under change:\n");
        spk_bench_supervisor_usage(f);
    }
#ifdef SPOKE_BENCH_HAVE_QUEUE
    fprintf(f, "  queue [OPTIONS]\n"
               "      throughput of the durable queue; see `spoke-bench queue --help`\n");
#endif
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
    if (strcmp(cmd, "hub") == 0)
        return spk_bench_hub(argc - 1, argv + 1);
    if (strcmp(cmd, "uplink") == 0)
        return spk_bench_uplink(argc - 1, argv + 1);
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

/* ---- helpers shared by the subcommands (bench.h) ---------------------------------- */

/* The tool reads durations and sizes as the config file does (core/base/units.h). */
int spk_bench_parse_duration(const char *text, int allow_zero, double *out_s)
{
    uint64_t ms;
    if (spk_parse_duration_ms(text, &ms) != 0 || (ms == 0 && !allow_zero))
        return -1;
    *out_s = (double)ms / 1000.0;
    return 0;
}

int spk_bench_parse_size(const char *text, uint64_t *out)
{
    return spk_parse_size(text, out) == 0 ? 0 : -1;
}

int spk_bench_parse_uint(const char *text, uint64_t min, uint64_t max, uint64_t *out)
{
    uint64_t v;
    if (spk_bench_parse_size(text, &v) != 0 || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

int spk_bench_self_dir(char *out, size_t cap)
{
    char path[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
    if (n <= 0)
        return -1;
    path[n] = '\0';
    char *slash = strrchr(path, '/');
    if (slash == NULL)
        return -1;
    *slash = '\0';
    if ((size_t)snprintf(out, cap, "%s", path[0] ? path : "/") >= cap)
        return -1;
    return 0;
}

uint64_t spk_bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void spk_bench_json_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            fprintf(f, "\\u%04x", (unsigned char)*s);
        else
            fputc(*s, f);
    }
    fputc('"', f);
}
