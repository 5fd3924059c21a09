/*
 * bench.h -- the subcommands of spoke-bench and the few helpers they share.
 *
 * spoke-bench is one binary; tools/bench.c holds main and dispatches on argv[1] to one
 * function per subcommand, each living in its own tools/bench_<name>.c. A subcommand
 * receives argv starting at its own name (argv[0] = "proxy"), parses its options with
 * getopt_long, and returns the process exit status: 0 ok, 1 setup or usage error, 2 the
 * run completed but saw errors.
 */
#ifndef SPK_BENCH_H
#define SPK_BENCH_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

/* tools/bench_proxy.c: round-trip load against an address, and the echo upstream. */
int spk_bench_proxy(int argc, char **argv);
int spk_bench_echo(int argc, char **argv);
void spk_bench_proxy_usage(FILE *f);
void spk_bench_echo_usage(FILE *f);

/* tools/bench_hooks.c: in-process timing of the plugin chain. */
int spk_bench_hooks(int argc, char **argv);
void spk_bench_hooks_usage(FILE *f);

/* tools/bench_signals.c: in-process timing of a plugin's signal through the policies. */
int spk_bench_signals(int argc, char **argv);
void spk_bench_signals_usage(FILE *f);

/* tools/bench_hub.c: hubd under many gRPC clients, side by side with h2load.
 * tools/bench_uplink.c: edges' uplinks into one hubd (1 and 16 edges). */
int spk_bench_hub(int argc, char **argv);
void spk_bench_hub_usage(FILE *f);
int spk_bench_uplink(int argc, char **argv);
void spk_bench_uplink_usage(FILE *f);

/* tools/bench_pg.c: pgbench select-only direct, via pgbouncer, via spoked (pg-query-log,
 * pg-cache warm). */
int spk_bench_pg(int argc, char **argv);
void spk_bench_pg_usage(FILE *f);

/* tools/bench_queue.c (its own owner): built when the queue library is. Declared weak so
 * a tree where the queue library landed before bench_queue.c still links; main checks
 * the address before calling it. */
#ifdef SPOKE_BENCH_HAVE_QUEUE
int spk_bench_queue(int argc, char **argv) __attribute__((weak));
#endif

/* tools/bench_supervisor.c (its own owner): `reload` and `crash`, dispatched on argv[0].
 * Weak for the same reason as spk_bench_queue: main checks before calling. */
int spk_bench_supervisor(int argc, char **argv) __attribute__((weak));
void spk_bench_supervisor_usage(FILE *f) __attribute__((weak));

/* tools/bench_all.c: every subcommand in turn, docs/benchmarks.md's generated section,
 * the proxy plot and one JSON file. */
int spk_bench_all(int argc, char **argv);
void spk_bench_all_usage(FILE *f);

/* A duration as the config file writes it ("10s", "500ms", "2m", a bare 0; see
 * core/base/units.h), into seconds (> 0 unless allow_zero). Returns 0 or -1. */
int spk_bench_parse_duration(const char *text, int allow_zero, double *out_s);

/* A size as the config file writes it ("128", "16KiB", "1MiB"; core/base/units.h) into
 * bytes. Returns 0 or -1. */
int spk_bench_parse_size(const char *text, uint64_t *out);

/* A positive integer in [min, max]. Returns 0 or -1. */
int spk_bench_parse_uint(const char *text, uint64_t min, uint64_t max, uint64_t *out);

/* The directory holding the running spoke-bench binary (from /proc/self/exe) into
 * out[cap]. Returns 0 or -1. */
int spk_bench_self_dir(char *out, size_t cap);

/* The name of the account spoke-bench runs as, for the `user:` of the configs it writes
 * (spoked and hubd started as root refuse a config without one; core/privs.h). */
const char *spk_bench_run_as(void);

/* Print s as a JSON string literal, quotes included. */
void spk_bench_json_string(FILE *f, const char *s);

/* CLOCK_MONOTONIC in nanoseconds. */
uint64_t spk_bench_now_ns(void);

/* A TCP port on 127.0.0.1 that was free a moment ago, or -1 (said on stderr). */
int spk_bench_free_port(void);

/* The children of pid (every thread's /proc/PID/task/TID/children) into out[cap]; returns
 * how many there are (more than cap when out was too small), or -1 when pid is gone. */
int spk_bench_children(pid_t pid, pid_t *out, size_t cap);

#endif
