/*
 * bench_proxy.h -- the load generator of `spoke-bench proxy` (bench_proxy.c), shared with
 * the proxy suite (bench_proxy_suite.c), which runs it in-process against each path.
 */
#ifndef SPK_BENCH_PROXY_H
#define SPK_BENCH_PROXY_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "bench_hist.h"
#include "net.h"

typedef struct lg_opts {
    spk_addr target;
    const char *echo_text;   /* --echo: start an echo upstream here; NULL: none */
    unsigned conns, threads, pipeline;
    uint64_t size;
    double duration_s, warmup_s;
    double rate;             /* offered requests per second, all connections; 0 = closed loop */
    bool json;
} lg_opts;

enum lg_err { E_CONNECT, E_RESET, E_EOF, E_MISMATCH, E_STALLED, E_COUNT };

typedef struct lg_result {
    spk_bench_hist h;
    uint64_t bytes_out, bytes_in, requests_all;
    uint64_t errors[E_COUNT], errors_total;
    double seconds;
    double cpu_us_per_req;   /* this process's CPU per completed request (all threads) */
} lg_result;

/* Run the load of *o against o->target; fill *r. Returns 0, or -1 on a setup failure
 * (the message is printed). */
int spk_bench_lg_run(const lg_opts *o, lg_result *r);

/* Bind an echo upstream at `text` (it listens before this returns) and serve it in a
 * child that dies with this process. Returns the child's pid (addr filled), or -1. */
pid_t spk_bench_echo_start(const char *text, spk_addr *addr);
void spk_bench_echo_stop(pid_t pid, const spk_addr *addr);

/* The proxy suite (no --target, no --echo): bench_proxy_suite.c. */
int spk_bench_proxy_suite(int argc, char **argv);

#endif
