/*
 * bench_hub.h -- what `spoke-bench hub` (bench_hub.c) and `spoke-bench uplink`
 * (bench_uplink.c) share: a scratch directory, hubd (and spoked) started from generated
 * configs, their CPU time from /proc, `hubd status`'s counters, the bench plugins' shared
 * counters (bench_plugins/bench_stats.h) and the machine's description. Implemented in
 * bench_hub.c. Every function prints its own failure to stderr.
 */
#ifndef SPK_BENCH_HUB_H
#define SPK_BENCH_HUB_H

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "bench_plugins/bench_stats.h"

/* The machine, for the report: cores online, CPU model, kernel release, and the
 * filesystem type of the scratch directory (hubd's store fsyncs there). */
typedef struct spk_bh_machine {
    long cores;
    char cpu[128];
    char kernel[128];
    char fs[32];
} spk_bh_machine;

void spk_bh_machine_get(spk_bh_machine *m, const char *dir);
void spk_bh_machine_print(FILE *f, const spk_bh_machine *m);
void spk_bh_machine_json(FILE *f, const spk_bh_machine *m);

/* A fresh directory under $TMPDIR (or /tmp) into out[cap]. Returns 0 or -1. */
int spk_bh_scratch(char *out, size_t cap);
/* Remove it and everything in it (best effort). */
void spk_bh_scratch_remove(const char *dir);

/* Create the counters' file at `path` (zeroed) and map it. NULL on failure. */
spk_bstats *spk_bh_stats_create(const char *path);

/* A copy of the counters, and the p-quantile (0..1) in ms of the latency bins of
 * `after` minus `before` (before may be NULL); -1 when no payload was recorded. */
typedef struct spk_bh_snap {
    uint64_t count, errors, queue_full, lat_sum_ms;
    uint64_t *lat;   /* SPK_BSTATS_LAT_BINS entries, owned; free with spk_bh_snap_free */
} spk_bh_snap;

int spk_bh_snap_take(const spk_bstats *st, spk_bh_snap *out);
void spk_bh_snap_free(spk_bh_snap *s);
double spk_bh_snap_quantile(const spk_bh_snap *after, const spk_bh_snap *before, double q);

/* hubd's config for the benches: hub.listen 127.0.0.1:port, `workers`, the store and
 * run_dir in dir, log level info, and one control plugin bench-sink with ID plugin_id
 * counting into stats_path. The bench plugins are in `plugin_dir`. Written to
 * dir/hub.yaml (its path into cfg_out). Returns 0 or -1. */
int spk_bh_hub_config(const char *dir, int port, unsigned workers, uint32_t plugin_id,
                      const char *plugin_dir, const char *stats_path, char *cfg_out,
                      size_t cap);
/* The same with `tls: { cert: dir/cert.pem, key: dir/key.pem }` when tls is true (made by
 * spk_bh_make_cert first). */
int spk_bh_hub_config_tls(const char *dir, int port, unsigned workers, uint32_t plugin_id,
                          const char *plugin_dir, const char *stats_path, bool tls,
                          char *cfg_out, size_t cap);

/* A self-signed certificate for 127.0.0.1 (EC P-256) into dir/cert.pem and dir/key.pem,
 * with the openssl command. Returns 0 or -1. */
int spk_bh_make_cert(const char *dir);

/* Start `prog` (a program next to spoke-bench: "hubd", "spoked") with `-c config`, its
 * stdout and stderr into `log`, and wait until its log says a generation serves (at most
 * timeout_s). Returns the pid, or -1 (the log's tail printed). */
pid_t spk_bh_start(const char *prog, const char *config, const char *log, double timeout_s);
/* SIGTERM, wait up to 15 s, then SIGKILL. Returns the exit status (as waitpid's). */
int spk_bh_stop(pid_t pid);

/* User + system CPU seconds of pid and all its descendants (from /proc/PID/stat and
 * /proc/PID/task/N/children), live ones only. */
double spk_bh_cpu_s(pid_t pid);

/* The same, only for the children of `sup` whose argv[1] is `arg1` ("--uplink":
 * spoked's uplink process; "--worker": the workers), and their descendants. */
double spk_bh_cpu_children_s(pid_t sup, const char *arg1);

/* `hubd status -c config`'s counters: the hub line and the workers' accepted
 * connections. Returns 0 or -1. */
typedef struct spk_bh_hub_status {
    uint64_t batches, delivered, duplicates, no_receiver, refused, connections;
} spk_bh_hub_status;

int spk_bh_hub_status_get(const char *config, spk_bh_hub_status *out);

/* Print the file at path, indented, under a title line (the exact configuration). */
void spk_bh_print_file(FILE *out, const char *title, const char *path);

/* dir + "/" + name into out[cap]; 0, or -1 (printed) when it does not fit. */
int spk_bh_path(char *out, size_t cap, const char *dir, const char *name);

/* The directory of hubd, spoked and bench-plugins/: spoke-bench's own
 * (spk_bench_self_dir), or what --bin-dir set with spk_bh_set_bin_dir (another build, to
 * compare a changed hubd with the same client). */
const char *spk_bh_bin_dir(void);
void spk_bh_set_bin_dir(const char *dir);

#endif
