/*
 * supervisor_int.h -- the supervisor's state, shared by its files (private to them).
 *
 *   supervisor.c   generations and child processes: config snapshots, fork/exec of the
 *                  workers, restarts with backoff, reload, replacement and promotion,
 *                  signals, the queue sync timer, setup and teardown, the main loop
 *   watchdog.c     the watchdog (sampling the workers' slots) and crash attribution:
 *                  whom a dead or killed worker is blamed on, crash counts, quarantine
 *   report.c       the status report (admin socket) and the host's figures for /metrics
 *   sup_metrics.c  /metrics: the endpoint (metrics_http.c), the base of exited workers'
 *                  metrics (metrics.c), the merger of plugin sockets (metrics_merge.c)
 *   admin.c        the admin socket: commands, read and answered without blocking
 *   sup_uplink.c   the uplink process
 *
 * Everything runs on the supervisor's one loop: no locks. The supervisor knows of its
 * workers only what the config and the status region (status.h) say, so hubd can run it
 * in front of different workers.
 */
#ifndef SPK_SUPERVISOR_INT_H
#define SPK_SUPERVISOR_INT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <ev.h>

#include "config.h"
#include "err.h"
#include "pin.h"
#include "privs.h"
#include "queue.h"
#include "status.h"

typedef struct sup sup;
typedef struct generation generation;
typedef struct admin_conn admin_conn;

/* A child's recent deaths, for its restart backoff (spk_sup_restart_delay). */
typedef struct spk_backoff {
    double level;    /* deaths, each decaying by half every BACKOFF_HALF_LIFE_S */
    ev_tstamp last;  /* when level was last updated */
} spk_backoff;

/* One worker process of a generation (it keeps its place across restarts). */
typedef struct wproc {
    sup *s;
    generation *g;
    int index;
    int slot; /* -1: none */
    pid_t pid; /* 0: not running */
    bool draining, accepting;
    ev_tstamp started;
    spk_backoff backoff;
    unsigned restarts;
    ev_timer restart;
    /* watchdog */
    uint32_t seen_plugin;
    uint64_t seen_seq, seen_ms;
    bool warned;
    char kill_reason[160]; /* why the watchdog killed it; "" if it did not */
    char blame_key[256], blame_name[64];
    uint32_t blame_hook;
} wproc;

/* One config snapshot and its workers (supervisor.c's top comment). */
struct generation {
    uint32_t id;
    spk_config *cfg;
    int cfg_fd;
    char **quarantine; /* keys of quarantined plugins */
    size_t n_quarantine;
    spk_pins pins;     /* the plugin files every worker of it loads (pin.h) */
    spk_privs privs;   /* the account its workers run as (privs.h) */
    wproc *w;
    int n;
    bool ready; /* every worker reported ready once and was told to accept */
    ev_tstamp started;
    generation *next_old;
};

/* Crashes of one plugin, by quarantine key (watchdog.c). */
typedef struct crash_rec {
    char key[256];
    char name[64];
    ev_tstamp times[SPK_CRASH_LIMIT_MAX]; /* within crash_window, oldest first */
    unsigned n_times;
    unsigned total, slow_hooks;
    unsigned slow_by_hook[SPK_HOOK_COUNT];
    bool quarantined;
    char last[200];
} crash_rec;

/* The uplink process (sup_uplink.c): at most one, outside the generations. */
typedef struct uproc {
    pid_t pid;           /* 0: not running */
    int slot;            /* -1: none */
    ev_tstamp started;
    spk_backoff backoff;
    unsigned restarts;
    ev_timer restart;
    bool replacing;      /* stopped for a config change: start again at once */
    bool stop_sent;      /* stopping: the uplink was told to stop */
    char settings[1200]; /* the config it runs (spk_sup_uplink_sync compares) */
    char last_exit[200];
    spk_uplink_counters gone; /* counters of uplinks that exited */
} uproc;

/* The supervisor: one per spoked; every field is touched only on its loop. */
struct sup {
    struct ev_loop *loop;
    spoke_role role;
    const char *prog;  /* "spoked" or "hubd": log tag, run_dir file names, argv[0] */
    const char *path;
    const char *self_exe;
    pid_t pid;
    int *fds;
    size_t n_fds;
    char **listen; /* addresses bound, to compare at reload */
    size_t n_listen;
    spk_status *st;
    int st_fd;
    bool slot_used[SPK_STATUS_SLOTS];
    generation *cur, *next, *old;
    uint32_t gen_counter;
    crash_rec *crashes;
    size_t n_crashes;
    ev_signal sig_hup, sig_term, sig_int, sig_quit;
    ev_child child;
    ev_timer watchdog, admit, stop_deadline;
    ev_io admin_w;
    ev_timer admin_retry;            /* admin.c: accepting again after EMFILE */
    struct admin_conn *admin_conns;  /* admin.c: open admin connections */
    unsigned n_admin;
    int admin_fd, metrics_fd;
    char admin_path[256], pid_path[256];
    bool stopping, fatal;
    const char *pending; /* a replacement requested while another was starting */
    int exit_code;
    ev_tstamp started;
    char last_reload[1200];
    char refused[1100]; /* plugin refusal of the last failed reload */
    uint64_t restarts_total, quarantines_total, reloads_ok, reloads_failed, hook_timeouts;
    /* The queue, for the interval sync and the metrics (never used for enqueues). */
    spk_queue *queue;
    char *queue_path;  /* the path queue was opened at */
    ev_timer qsync;
    uint64_t qsyncs, qsync_errors;
    /* send_to_control counters of the workers that exited (their slots were freed), so
     * that the totals survive restarts: metrics counters never go back. */
    uint64_t q_gone_sent, q_gone_refused[SPK_QR_N];
    double qlast;               /* ev_now of the last sync */
    char queue_err[1024]; /* why it could not be opened; "" when open */
    uproc up;
    spk_hub_counters hub_gone; /* hubd: counters of workers that exited (as q_gone_*) */
    /* /metrics (sup_metrics.c) */
    struct spk_metrics_http *mhttp;   /* the endpoint; NULL without metrics.listen */
    struct spk_metrics_base *mbase;   /* exited workers' hook stats and plugin metrics */
    struct spk_merger *merger;        /* the plugins' own metrics sockets */
    ev_timer merge_sources;           /* keeps the merger's sockets as the config says */
    uint64_t conns_gone, bytes_gone[2]; /* exited workers' connections and bytes [server,
                                           client] */
};

/* The status slot of worker w, or NULL while it has none. */
static inline spk_wslot *spk_sup_wslot(const wproc *w)
{
    return w->slot >= 0 ? &w->s->st->slots[w->slot] : NULL;
}

/* The config in force: the serving generation's, else the starting one's; NULL before
 * the first generation exists. */
static inline const spk_config *spk_sup_cfg(const sup *s)
{
    return s->cur ? s->cur->cfg : s->next ? s->next->cfg : NULL;
}

/* ---- supervisor.c ---- */

/* Start a generation to replace `cur`: why = "reload" re-reads the config file (SIGHUP),
 * "quarantine" restarts cur's snapshot without the quarantined plugins. One at a time: a
 * request while another generation starts runs after it. */
void spk_sup_start_replacement(sup *s, const char *why);

/* The restart backoff of a child that died (a worker, the uplink), the one policy. It
 * follows the crash rate: b counts the child's deaths, each weighing half as much every
 * 5 s. The first death in a while restarts at once; then 100 ms, doubling per recent
 * death, to at most 10 s. Records this death in *b; returns the delay in seconds. */
double spk_sup_restart_delay(const sup *s, spk_backoff *b);

/* Allocate a status slot (zeroed), or -1 when none is free; free it again. */
int spk_sup_slot_alloc(sup *s);
void spk_sup_slot_free(sup *s, int i);

/* In a forked child: exec this program as `mode` ("--worker", "--uplink") with index,
 * generation g's config snapshot and the status region (and the listening sockets and
 * quarantine list when with_listeners). Never returns. */
void spk_sup_exec(sup *s, generation *g, const char *mode, int index, int slot,
                  bool with_listeners) __attribute__((noreturn));

/* ---- sup_uplink.c ---- */

/* Set up s->up (no uplink runs yet). */
void spk_sup_uplink_init(sup *s);

/* Make the uplink match the serving generation's config: start it (uplink: section and
 * no uplink running), restart it (its settings changed) or stop it (section gone). */
void spk_sup_uplink_sync(sup *s);

/* Child `pid` exited with `status`: when it is the uplink, restart it (with backoff,
 * unless it was replaced) and return true. */
bool spk_sup_uplink_exited(sup *s, pid_t pid, int status);

/* Stopping: signal the uplink (no restart; once). spoked stops it after its workers
 * exited, so their last payloads (queued by fini) go out first; SIGQUIT stops it at once.
 * Whether it still runs. */
void spk_sup_uplink_stop(sup *s, int sig);
bool spk_sup_uplink_live(const sup *s);

/* Watchdog tick: kill an uplink whose heartbeat stopped; publish the serving plugins. */
void spk_sup_uplink_sample(sup *s);

/* Totals of the uplink counters, the running one's and those of uplinks that exited. */
void spk_sup_uplink_totals(const sup *s, spk_uplink_counters *out);

/* ---- watchdog.c ---- */

/* Sample every worker's slot (serving, starting and draining generations): log and count
 * a hook over hook_timeout, kill a worker whose hook overstays ten times that, whose
 * start overstays start_timeout or whose heartbeat stops. Called every sampling period. */
void spk_sup_watchdog_sample(sup *s);

/* Worker w ended with wait status `status` (its slot still allocated): describe how into
 * what[cap] and set w->blame_key/blame_name/blame_hook when a plugin is to blame. Returns
 * true for a crash (anything but a clean exit or a failure to start). */
bool spk_sup_classify_exit(wproc *w, int status, char *what, size_t cap);

/* Count a crash of plugin `key` (display name `name`, `what` happened) under g's
 * crash_limit and crash_window; past the limit, quarantine it in g and ask for a
 * replacement generation. */
void spk_sup_blame(sup *s, generation *g, const char *key, const char *name, const char *what);

/* The crash record of plugin `key`; with `create`, a new one (NULL when out of memory). */
crash_rec *spk_sup_crash_find(sup *s, const char *key, const char *name, bool create);

/* "SIGSEGV" for SIGSEGV into buf[cap] (at least 16 bytes); returns buf. */
const char *spk_sup_sig_name(int sig, char *buf, size_t cap);

/* ---- report.c ---- */

/* The host's own figures for /metrics, as Prometheus text, into out. */
struct spk_mbuf;
void spk_sup_host_metrics(sup *s, struct spk_mbuf *out);

/* ---- sup_metrics.c ---- */

/* Set up the metrics base and merger, and serve metrics.listen (s->metrics_fd) when it is
 * set. Returns 0 or an error with eb. */
int spk_sup_metrics_start(sup *s, spk_errbuf *eb);
void spk_sup_metrics_stop(sup *s);

/* Slot `slot` is being freed: keep what its worker counted (metrics never go back). */
void spk_sup_metrics_fold(sup *s, int slot);

/* The status report (`spoked status`) as text, into memory the caller frees (*len its
 * length), or NULL when memory ran out. */
char *spk_sup_status_text(sup *s, size_t *len);

/* ---- admin.c ---- */

/* Watch s->admin_fd (bound) and answer its connections; stop: close every admin
 * connection and stop watching. */
void spk_sup_admin_start(sup *s);
void spk_sup_admin_stop(sup *s);

#endif
