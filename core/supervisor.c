/*
 * supervisor.c -- spoked's master process (see supervisor.h for what it does).
 *
 * State: a *generation* is one config snapshot (the file's text, kept in a memfd that
 * every worker of the generation parses, so a restarted worker runs exactly the config
 * its siblings run) plus its workers and its quarantine set. `cur` serves; `next` exists
 * while a reload (or a quarantine) is starting a replacement; `old` generations drain.
 *
 * New workers load and initialise their plugins but do not accept until the supervisor
 * sends them SIGUSR1: a generation that fails half-way can then be killed without
 * dropping a single client connection, and the handover is: start accepting in the new
 * generation, then stop accepting in the old one (SIGTERM: stop accepting, drain, exit).
 *
 * The watchdog is a timer sampling every worker's slot (status.h); it never interrupts a
 * worker unless a hook overstays ten times hook_timeout or the heartbeat stops.
 */
#include "supervisor.h"

#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <ev.h>

#include "config.h"
#include "log.h"
#include "net.h"
#include "queue.h"
#include "queue_conf.h"
#include "status.h"

#define BACKOFF_MIN_S 0.1
#define BACKOFF_MAX_S 10.0
#define STABLE_S 60.0
#define HEARTBEAT_PERIOD_MS 100

typedef struct sup sup;
typedef struct generation generation;

typedef struct wproc {
    sup *s;
    generation *g;
    int index;
    int slot; /* -1: none */
    pid_t pid; /* 0: not running */
    bool draining, accepting;
    ev_tstamp started;
    unsigned fails, restarts;
    ev_timer restart;
    /* watchdog */
    uint32_t seen_plugin;
    uint64_t seen_seq, seen_ms;
    bool warned;
    char kill_reason[160]; /* why the watchdog killed it; "" if it did not */
    char blame_key[256], blame_name[64];
    uint32_t blame_hook;
} wproc;

struct generation {
    uint32_t id;
    spk_config *cfg;
    int cfg_fd;
    char **quarantine; /* keys of quarantined plugins */
    size_t n_quarantine;
    wproc *w;
    int n;
    bool ready; /* every worker reported ready once and was told to accept */
    ev_tstamp started;
    generation *next_old;
};

typedef struct crash_rec {
    char key[256];
    char name[64];
    ev_tstamp times[32];
    unsigned n_times;
    unsigned total, slow_hooks;
    bool quarantined;
    char last[200];
} crash_rec;

struct sup {
    struct ev_loop *loop;
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
    ev_timer watchdog, stop_deadline;
    ev_io admin_w, metrics_w;
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
};

static void spawn(wproc *w);
static void gen_free(sup *s, generation *g);

/* ---- config snapshots --------------------------------------------------------------- */

/* Read `path` into a memfd and parse it from there. On success the generation's cfg and
 * cfg_fd are set; messages name `path`, not the memfd. */
static int load_snapshot(const char *path, generation *g, spk_errbuf *eb)
{
    int in = open(path, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return spk_errf(eb, errno == ENOENT ? SPK_ENOENT : SPK_EIO, "cannot open %s: %s", path,
                        strerror(errno));
    int mfd = memfd_create("spoke-config", MFD_CLOEXEC);
    if (mfd < 0) {
        close(in);
        return spk_errf(eb, SPK_EIO, "memfd_create: %s", strerror(errno));
    }
    char buf[65536];
    ssize_t n;
    while ((n = read(in, buf, sizeof(buf))) > 0) {
        if (write(mfd, buf, (size_t)n) != n) {
            close(in);
            close(mfd);
            return spk_errf(eb, SPK_EIO, "copying %s: %s", path, strerror(errno));
        }
    }
    close(in);
    char fdpath[64];
    snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", mfd);
    int rc = spk_config_load(fdpath, &g->cfg, eb);
    if (rc != 0) {
        /* Name the operator's file in the message. */
        size_t plen = strlen(fdpath);
        if (strncmp(eb->msg, fdpath, plen) == 0) {
            spk_errbuf tmp = *eb;
            spk_errf(eb, rc, "%s%s", path, tmp.msg + plen);
        }
        close(mfd);
        return rc;
    }
    char *name = strdup(path);
    if (name == NULL) {
        spk_config_free(g->cfg);
        g->cfg = NULL;
        close(mfd);
        return spk_errf(eb, SPK_ENOMEM, "out of memory");
    }
    free(g->cfg->file);
    g->cfg->file = name;
    g->cfg_fd = mfd;
    return 0;
}

/* ---- slots and processes ------------------------------------------------------------ */

static int slot_alloc(sup *s)
{
    for (int i = 0; i < SPK_STATUS_SLOTS; i++) {
        if (!s->slot_used[i]) {
            s->slot_used[i] = true;
            memset(&s->st->slots[i], 0, sizeof(s->st->slots[i]));
            return i;
        }
    }
    return -1;
}

/* Free slot i of a worker that exited (or never started): its send_to_control counters,
 * final now, are added to the supervisor's totals of exited workers. */
static void slot_free(sup *s, int i)
{
    if (i < 0 || !s->slot_used[i])
        return;
    const spk_queue_counters *qc = &s->st->slots[i].queue;
    s->q_gone_sent += atomic_load_explicit(&qc->sent, memory_order_relaxed);
    for (int r = 0; r < SPK_QR_N; r++)
        s->q_gone_refused[r] += atomic_load_explicit(&qc->refused[r], memory_order_relaxed);
    s->slot_used[i] = false;
}

static spk_wslot *wslot(const wproc *w)
{
    return w->slot >= 0 ? &w->s->st->slots[w->slot] : NULL;
}

static char *fmt_int(char *buf, size_t cap, long v)
{
    snprintf(buf, cap, "%ld", v);
    return buf;
}

static void exec_worker(wproc *w)
{
    sup *s = w->s;
    generation *g = w->g;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != s->pid)
        _exit(1); /* the supervisor died before prctl took effect */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    size_t max = 16 + 2 * s->n_fds + 2 * g->n_quarantine;
    char **argv = calloc(max, sizeof(char *));
    char nbuf[8][24];
    if (argv == NULL)
        _exit(1);
    size_t a = 0;
    argv[a++] = "spoked";
    argv[a++] = "--worker";
    argv[a++] = fmt_int(nbuf[0], sizeof(nbuf[0]), w->index);
    argv[a++] = "--gen";
    argv[a++] = fmt_int(nbuf[1], sizeof(nbuf[1]), (long)g->id);
    argv[a++] = "--config-fd";
    argv[a++] = fmt_int(nbuf[2], sizeof(nbuf[2]), g->cfg_fd);
    argv[a++] = "--config-name";
    argv[a++] = (char *)s->path;
    argv[a++] = "--status-fd";
    argv[a++] = fmt_int(nbuf[3], sizeof(nbuf[3]), s->st_fd);
    argv[a++] = "--slot";
    argv[a++] = fmt_int(nbuf[4], sizeof(nbuf[4]), w->slot);
    fcntl(g->cfg_fd, F_SETFD, 0);
    fcntl(s->st_fd, F_SETFD, 0);
    for (size_t i = 0; i < s->n_fds; i++) {
        char *b = malloc(24);
        if (b == NULL)
            _exit(1);
        argv[a++] = "--listen-fd";
        argv[a++] = fmt_int(b, 24, s->fds[i]);
        fcntl(s->fds[i], F_SETFD, 0);
    }
    for (size_t i = 0; i < g->n_quarantine; i++) {
        argv[a++] = "--quarantine";
        argv[a++] = g->quarantine[i];
    }
    argv[a] = NULL;
    execv(s->self_exe, argv);
    fprintf(stderr, "spoked: cannot exec worker %s: %s\n", s->self_exe, strerror(errno));
    _exit(127);
}

static void spawn(wproc *w)
{
    sup *s = w->s;
    w->slot = slot_alloc(s);
    if (w->slot < 0) {
        spk_error("no free status slot for worker %d; retrying in 1 s", w->index);
        ev_timer_set(&w->restart, 1.0, 0);
        ev_timer_start(s->loop, &w->restart);
        return;
    }
    spk_wslot *sl = wslot(w);
    atomic_store(&sl->state, SPK_W_STARTING);
    atomic_store(&sl->act.heartbeat_ms, spk_mono_ms());
    w->kill_reason[0] = '\0';
    w->blame_key[0] = '\0';
    w->seen_plugin = 0;
    w->warned = false;
    w->accepting = false;
    w->draining = false;
    pid_t pid = fork();
    if (pid < 0) {
        spk_error("fork worker %d: %s; retrying in 1 s", w->index, strerror(errno));
        slot_free(s, w->slot);
        w->slot = -1;
        ev_timer_set(&w->restart, 1.0, 0);
        ev_timer_start(s->loop, &w->restart);
        return;
    }
    if (pid == 0)
        exec_worker(w);
    w->pid = pid;
    w->started = ev_now(s->loop);
    spk_debug("generation %u worker %d started: pid %d", w->g->id, w->index, (int)pid);
}

static void on_restart_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    wproc *w = t->data;
    if (!w->s->stopping)
        spawn(w);
}

static generation *gen_new(sup *s, spk_errbuf *eb)
{
    generation *g = calloc(1, sizeof(*g));
    if (g == NULL) {
        spk_errf(eb, SPK_ENOMEM, "out of memory");
        return NULL;
    }
    g->cfg_fd = -1;
    int rc = load_snapshot(s->path, g, eb);
    if (rc != 0) {
        free(g);
        return NULL;
    }
    return g;
}

static int gen_copy_quarantine(generation *dst, const generation *src)
{
    for (size_t i = 0; src && i < src->n_quarantine; i++) {
        char **nq = realloc(dst->quarantine, (dst->n_quarantine + 1) * sizeof(char *));
        if (nq == NULL)
            return SPK_ENOMEM;
        dst->quarantine = nq;
        if ((nq[dst->n_quarantine] = strdup(src->quarantine[i])) == NULL)
            return SPK_ENOMEM;
        dst->n_quarantine++;
    }
    return 0;
}

static int gen_start(sup *s, generation *g)
{
    g->id = ++s->gen_counter;
    int n = g->cfg->workers > 0 ? g->cfg->workers : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1)
        n = 1;
    g->w = calloc((size_t)n, sizeof(wproc));
    if (g->w == NULL)
        return SPK_ENOMEM; /* g->n stays 0: gen_free() has no workers to look at */
    g->n = n;
    g->started = ev_now(s->loop);
    for (int i = 0; i < g->n; i++) {
        wproc *w = &g->w[i];
        w->s = s;
        w->g = g;
        w->index = i;
        w->slot = -1;
        ev_timer_init(&w->restart, on_restart_timer, 0, 0);
        w->restart.data = w;
        spawn(w);
    }
    return 0;
}

static int gen_live(const generation *g)
{
    int n = 0;
    for (int i = 0; i < g->n; i++)
        n += g->w[i].pid != 0;
    return n;
}

static void gen_signal(generation *g, int sig)
{
    for (int i = 0; i < g->n; i++)
        if (g->w[i].pid != 0)
            kill(g->w[i].pid, sig);
}

static void gen_free(sup *s, generation *g)
{
    if (g == NULL)
        return;
    for (int i = 0; i < g->n; i++) {
        ev_timer_stop(s->loop, &g->w[i].restart);
        slot_free(s, g->w[i].slot);
    }
    free(g->w);
    for (size_t i = 0; i < g->n_quarantine; i++)
        free(g->quarantine[i]);
    free(g->quarantine);
    if (g->cfg_fd >= 0)
        close(g->cfg_fd);
    spk_config_free(g->cfg);
    free(g);
}

/* Tell the old generation to drain: it stops accepting, finishes its connections (at most
 * drain_timeout) and exits. */
static void gen_retire(sup *s, generation *g)
{
    for (int i = 0; i < g->n; i++) {
        wproc *w = &g->w[i];
        w->draining = true;
        ev_timer_stop(s->loop, &w->restart);
        if (w->pid != 0)
            kill(w->pid, w->accepting ? SIGTERM : SIGKILL);
    }
    g->next_old = s->old;
    s->old = g;
}

/* ---- crashes and quarantine --------------------------------------------------------- */

static crash_rec *crash_find(sup *s, const char *key, const char *name, bool create)
{
    for (size_t i = 0; i < s->n_crashes; i++)
        if (strcmp(s->crashes[i].key, key) == 0)
            return &s->crashes[i];
    if (!create)
        return NULL;
    crash_rec *n = realloc(s->crashes, (s->n_crashes + 1) * sizeof(*n));
    if (n == NULL)
        return NULL;
    s->crashes = n;
    crash_rec *c = &n[s->n_crashes++];
    memset(c, 0, sizeof(*c));
    snprintf(c->key, sizeof(c->key), "%s", key);
    snprintf(c->name, sizeof(c->name), "%s", name);
    return c;
}

static void start_replacement(sup *s, const char *why);

/* Count a crash of plugin `key`; quarantine it past crash_limit in crash_window. */
static void blame(sup *s, generation *g, const char *key, const char *name, const char *what)
{
    crash_rec *c = crash_find(s, key, name, true);
    if (c == NULL)
        return;
    ev_tstamp now = ev_now(s->loop);
    double window = (double)g->cfg->crash_window_ms / 1000.0;
    unsigned keep = 0;
    for (unsigned i = 0; i < c->n_times; i++)
        if (now - c->times[i] <= window)
            c->times[keep++] = c->times[i];
    c->n_times = keep;
    if (c->n_times < sizeof(c->times) / sizeof(c->times[0]))
        c->times[c->n_times++] = now;
    c->total++;
    snprintf(c->last, sizeof(c->last), "%s", what);
    if (c->quarantined || c->n_times < g->cfg->crash_limit)
        return;
    c->quarantined = true;
    s->quarantines_total++;
    spk_error("plugin %s quarantined: %u crashes in %.0f s (last: %s); workers restart "
              "without it until the next reload",
              name, c->n_times, window, what);
    char **nq = realloc(g->quarantine, (g->n_quarantine + 1) * sizeof(char *));
    if (nq != NULL) {
        g->quarantine = nq;
        if ((nq[g->n_quarantine] = strdup(key)) != NULL)
            g->n_quarantine++;
    }
    start_replacement(s, "quarantine");
}

/* "SIGSEGV" for SIGSEGV; `buf` holds at least 16 bytes. */
static const char *sig_name(int sig, char *buf, size_t cap)
{
    const char *n = sigabbrev_np(sig);
    if (n == NULL)
        snprintf(buf, cap, "signal %d", sig);
    else
        snprintf(buf, cap, "SIG%s", n);
    return buf;
}

/* ---- generations: reload, replacement, promotion ------------------------------------ */

static bool same_listen(const sup *s, const spk_config *cfg)
{
    if (cfg->n_listen != s->n_listen)
        return false;
    for (size_t i = 0; i < s->n_listen; i++)
        if (strcmp(cfg->listen[i], s->listen[i]) != 0)
            return false;
    return true;
}

static void reload_failed(sup *s, const char *why)
{
    s->reloads_failed++;
    snprintf(s->last_reload, sizeof(s->last_reload), "failed: %s; generation %u keeps serving",
             why, s->cur ? s->cur->id : 0);
    spk_error("reload failed: %s; generation %u keeps serving", why, s->cur ? s->cur->id : 0);
}

/* Start a generation to replace `cur`: from the re-read config file on SIGHUP
 * (quarantine cleared), or from cur's own snapshot when quarantining a plugin. */
static void start_replacement(sup *s, const char *why)
{
    if (s->stopping)
        return;
    if (s->next != NULL) {
        /* One generation starts at a time: this request runs when the one starting now
         * has succeeded or failed (see promote() and on_child()). A SIGHUP wins over a
         * pending quarantine: the reload re-reads everything anyway. */
        spk_info("%s: generation %u is still starting; %s will follow it", why, s->next->id,
                 why);
        if (s->pending == NULL || strcmp(why, "reload") == 0)
            s->pending = strcmp(why, "reload") == 0 ? "reload" : "quarantine";
        return;
    }
    spk_errbuf eb;
    generation *g;
    bool hup = strcmp(why, "reload") == 0;
    if (hup) {
        g = gen_new(s, &eb);
        if (g == NULL) {
            reload_failed(s, eb.msg);
            return;
        }
        if (!same_listen(s, g->cfg)) {
            reload_failed(s, "listen.address changed; restart spoked to change it");
            gen_free(s, g);
            return;
        }
    } else {
        g = calloc(1, sizeof(*g));
        if (g == NULL)
            return;
        g->cfg_fd = -1;
        char fdpath[64];
        snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", s->cur->cfg_fd);
        if (spk_config_load(fdpath, &g->cfg, &eb) != 0 ||
            (g->cfg_fd = fcntl(s->cur->cfg_fd, F_DUPFD_CLOEXEC, 0)) < 0 ||
            gen_copy_quarantine(g, s->cur) != 0) {
            spk_error("%s: cannot prepare the replacement generation: %s", why, eb.msg);
            gen_free(s, g);
            return;
        }
    }
    if (gen_start(s, g) != 0) {
        reload_failed(s, "out of memory");
        gen_free(s, g);
        return;
    }
    s->next = g;
    spk_info("%s: generation %u starting %d workers", why, g->id, g->n);
}

static void tell_accept(wproc *w)
{
    if (w->pid != 0 && !w->accepting) {
        kill(w->pid, SIGUSR1);
        w->accepting = true;
    }
}

/* Start the replacement that was requested while another generation was starting. */
static void run_pending(sup *s)
{
    const char *why = s->pending;
    s->pending = NULL;
    if (why != NULL && !s->stopping)
        start_replacement(s, why);
}

/* Every worker of `next` is ready: it takes over. */
static void promote(sup *s)
{
    generation *g = s->next, *old = s->cur;
    s->next = NULL;
    for (int i = 0; i < g->n; i++)
        tell_accept(&g->w[i]);
    g->ready = true;
    s->cur = g;
    if (old != NULL) {
        s->reloads_ok++;
        snprintf(s->last_reload, sizeof(s->last_reload), "ok: generation %u replaced %u", g->id,
                 old->id);
        spk_info("generation %u serving (%d workers); generation %u draining", g->id, g->n,
                 old->id);
        gen_retire(s, old);
    } else {
        spk_info("generation %u serving (%d workers)", g->id, g->n);
    }
    run_pending(s);
}

/* ---- child exits -------------------------------------------------------------------- */

static wproc *find_worker(sup *s, pid_t pid)
{
    generation *gens[3] = {s->cur, s->next, NULL};
    for (int k = 0; k < 2; k++)
        for (int i = 0; gens[k] && i < gens[k]->n; i++)
            if (gens[k]->w[i].pid == pid)
                return &gens[k]->w[i];
    for (generation *g = s->old; g; g = g->next_old)
        for (int i = 0; i < g->n; i++)
            if (g->w[i].pid == pid)
                return &g->w[i];
    return NULL;
}

static void reap_old(sup *s)
{
    for (generation **gp = &s->old; *gp;) {
        generation *g = *gp;
        if (gen_live(g) == 0) {
            spk_info("generation %u finished draining", g->id);
            *gp = g->next_old;
            gen_free(s, g);
        } else {
            gp = &g->next_old;
        }
    }
}

static void maybe_finish_stop(sup *s)
{
    if (!s->stopping)
        return;
    int live = (s->cur ? gen_live(s->cur) : 0) + (s->next ? gen_live(s->next) : 0);
    for (generation *g = s->old; g; g = g->next_old)
        live += gen_live(g);
    if (live == 0)
        ev_break(s->loop, EVBREAK_ALL);
}

/* Describe how the worker ended and whom to blame; returns true for a crash. */
static bool classify_exit(wproc *w, int status, char *what, size_t cap)
{
    spk_wslot *sl = wslot(w);
    uint32_t pi = 0, hook = 0;
    if (WIFEXITED(status) && WEXITSTATUS(status) == SPK_EXIT_HEALTH && sl != NULL) {
        pi = atomic_load(&sl->health_failed);
        hook = SPK_HOOK_HEALTH;
        snprintf(what, cap, "failed health checks");
    } else if (w->kill_reason[0] != '\0') {
        snprintf(what, cap, "%s", w->kill_reason);
        if (w->blame_key[0] != '\0')
            return true;
    } else if (WIFSIGNALED(status) && sl != NULL) {
        pi = atomic_load(&sl->act.plugin);
        hook = atomic_load(&sl->act.hook);
        char sn[24];
        snprintf(what, cap, "%s in %s", sig_name(WTERMSIG(status), sn, sizeof(sn)),
                 pi ? spk_hook_name((enum spk_hook_id)hook) : "host code");
    } else if (WIFEXITED(status) && WEXITSTATUS(status) != 0 &&
               WEXITSTATUS(status) != SPK_EXIT_START && sl != NULL &&
               (pi = atomic_load(&sl->act.plugin)) != 0) {
        /* A plugin called exit(), or a sanitizer ended the process inside a hook. */
        hook = atomic_load(&sl->act.hook);
        snprintf(what, cap, "exit code %d in %s", WEXITSTATUS(status),
                 spk_hook_name((enum spk_hook_id)hook));
    } else if (WIFEXITED(status)) {
        snprintf(what, cap, "exit code %d", WEXITSTATUS(status));
        return WEXITSTATUS(status) != SPK_EXIT_START;
    } else {
        snprintf(what, cap, "status %d", status);
    }
    if (pi > 0 && sl != NULL && pi <= atomic_load(&sl->n_plugins) && pi <= SPK_STATUS_PLUGINS) {
        snprintf(w->blame_key, sizeof(w->blame_key), "%s", sl->plugins[pi - 1].key);
        snprintf(w->blame_name, sizeof(w->blame_name), "%s", sl->plugins[pi - 1].name);
        w->blame_hook = hook;
    }
    return true;
}

static void on_child(struct ev_loop *loop, ev_child *c, int revents)
{
    (void)loop;
    (void)revents;
    sup *s = c->data;
    wproc *w = find_worker(s, c->rpid);
    if (w == NULL)
        return;
    generation *g = w->g;
    int status = c->rstatus;
    w->pid = 0;
    spk_wslot *sl = wslot(w);

    if (w->draining || s->stopping) {
        spk_debug("generation %u worker %d exited (%s)", g->id, w->index,
                  WIFEXITED(status) ? "done" : "killed");
        if (w->blame_key[0] != '\0') {
            /* The watchdog killed it in a hook on its way out (fini, a last on_close):
             * the plugin's crash like any other, counted against the serving
             * generation's limits (no replacement starts while stopping). */
            spk_error("generation %u worker %d (pid %d) crashed: plugin %s, %s", g->id,
                      w->index, c->rpid, w->blame_name, w->kill_reason);
            blame(s, s->cur != NULL ? s->cur : g, w->blame_key, w->blame_name, w->kill_reason);
        }
        slot_free(s, w->slot);
        w->slot = -1;
        reap_old(s);
        maybe_finish_stop(s);
        return;
    }

    char what[200];
    bool crash = classify_exit(w, status, what, sizeof(what));
    bool start_failed = sl != NULL && atomic_load(&sl->state) == SPK_W_STARTING;
    char reason[1100];
    if (WIFEXITED(status) && WEXITSTATUS(status) == SPK_EXIT_START && sl != NULL)
        snprintf(reason, sizeof(reason), "%s", sl->reason[0] ? sl->reason : "worker failed to start");
    else if (w->blame_key[0] != '\0')
        snprintf(reason, sizeof(reason), "worker %d crashed: plugin %s: %s", w->index,
                 w->blame_name, what);
    else
        snprintf(reason, sizeof(reason), "worker %d ended: %s", w->index, what);
    slot_free(s, w->slot);
    w->slot = -1;

    if (g == s->next) {
        /* The replacement failed: keep the serving generation. Not counted as a crash
         * toward quarantine: the plugin never served. */
        snprintf(s->refused, sizeof(s->refused), "%s", reason);
        gen_signal(g, SIGKILL);
        gen_retire(s, g);
        s->next = NULL;
        if (s->cur == NULL) {
            spk_error("cannot start: %s", reason);
            s->fatal = true;
            s->exit_code = 1;
            s->stopping = true;
            maybe_finish_stop(s);
            return;
        }
        reload_failed(s, reason);
        run_pending(s);
        return;
    }

    if (crash && w->blame_key[0] != '\0') {
        spk_error("generation %u worker %d (pid %d) crashed: plugin %s, %s", g->id, w->index,
                  c->rpid, w->blame_name, what);
        blame(s, g, w->blame_key, w->blame_name, what);
    } else if (start_failed) {
        spk_error("generation %u worker %d could not start: %s", g->id, w->index, reason);
    } else {
        spk_error("generation %u worker %d (pid %d) ended: %s", g->id, w->index, c->rpid, what);
    }
    if (g == s->cur && s->next != NULL) {
        spk_info("worker %d not restarted: generation %u is replacing generation %u", w->index,
                 s->next->id, g->id);
        return;
    }
    if (!g->cfg->reload_on_crash) {
        spk_warn("worker %d not restarted (plugins.reload_on_crash is false)", w->index);
        return;
    }
    if (ev_now(s->loop) - w->started >= STABLE_S)
        w->fails = 0;
    double delay = BACKOFF_MIN_S;
    for (unsigned i = 0; i < w->fails && delay < BACKOFF_MAX_S; i++)
        delay *= 2;
    if (delay > BACKOFF_MAX_S)
        delay = BACKOFF_MAX_S;
    w->fails++;
    w->restarts++;
    s->restarts_total++;
    spk_info("restarting worker %d in %.1f s", w->index, delay);
    ev_timer_set(&w->restart, delay, 0);
    ev_timer_start(s->loop, &w->restart);
}

/* ---- watchdog ----------------------------------------------------------------------- */

static void watchdog_kill(wproc *w, const char *fmt, const char *name, const char *key,
                          uint32_t hook, uint64_t ms)
{
    snprintf(w->kill_reason, sizeof(w->kill_reason), fmt, name, spk_hook_name(hook),
             (unsigned long long)ms);
    if (key != NULL) {
        snprintf(w->blame_key, sizeof(w->blame_key), "%s", key);
        snprintf(w->blame_name, sizeof(w->blame_name), "%s", name);
        w->blame_hook = hook;
    }
    spk_error("generation %u worker %d (pid %d): %s; killing it", w->g->id, w->index,
              (int)w->pid, w->kill_reason);
    kill(w->pid, SIGKILL);
}

static void watch_worker(sup *s, wproc *w, uint64_t now)
{
    spk_wslot *sl = wslot(w);
    if (w->pid == 0 || sl == NULL || w->kill_reason[0] != '\0')
        return;
    if (w->draining && !w->accepting)
        return; /* never served: it was sent SIGKILL when its generation was retired */
    const spk_config *cfg = w->g->cfg;
    uint32_t state = atomic_load_explicit(&sl->state, memory_order_acquire);
    if (state == SPK_W_STARTING) {
        if ((ev_now(s->loop) - w->started) * 1000.0 > (double)cfg->start_timeout_ms) {
            uint32_t pi = atomic_load(&sl->act.plugin);
            const char *name = pi && pi <= atomic_load(&sl->n_plugins) ? sl->plugins[pi - 1].name
                                                                        : "(none)";
            watchdog_kill(w, "did not start within plugins.start_timeout (in plugin %s, %s) "
                             "after %llu ms",
                          name, pi ? sl->plugins[pi - 1].key : NULL,
                          atomic_load(&sl->act.hook), cfg->start_timeout_ms);
        }
        return;
    }
    if (state == SPK_W_READY && w->g->ready && !w->draining)
        tell_accept(w); /* a restarted worker of the serving generation */

    /* plugin first, with acquire: slot.h's store order then gives the seq and hook of the
     * entry that published it (or later ones). */
    uint32_t pi = atomic_load_explicit(&sl->act.plugin, memory_order_acquire);
    uint64_t seq = atomic_load_explicit(&sl->act.seq, memory_order_relaxed);
    /* A hook waiting in send_to_control for the disk is not the plugin's time: its clock
     * restarts when the host service returns. */
    bool in_host = atomic_load_explicit(&sl->act.in_host, memory_order_relaxed) != 0;
    if (pi == 0 || pi != w->seen_plugin || seq != w->seen_seq || in_host) {
        w->seen_plugin = pi;
        w->seen_seq = seq;
        w->seen_ms = now;
        w->warned = false;
    } else if (pi <= atomic_load(&sl->n_plugins)) {
        uint64_t in_hook = now - w->seen_ms;
        uint32_t hook = atomic_load(&sl->act.hook);
        const spk_plugin_info *info = &sl->plugins[pi - 1];
        if (in_hook >= cfg->hook_timeout_ms && !w->warned) {
            w->warned = true;
            s->hook_timeouts++;
            crash_rec *c = crash_find(s, info->key, info->name, true);
            if (c != NULL)
                c->slow_hooks++;
            spk_warn("generation %u worker %d: plugin %s %s still running after %llu ms "
                     "(plugins.hook_timeout %llu ms)",
                     w->g->id, w->index, info->name, spk_hook_name(hook),
                     (unsigned long long)in_hook, (unsigned long long)cfg->hook_timeout_ms);
        }
        if (in_hook >= 10 * cfg->hook_timeout_ms) {
            uint64_t hb = atomic_load(&sl->act.heartbeat_ms);
            watchdog_kill(w,
                          now - hb > 2 * HEARTBEAT_PERIOD_MS
                              ? "heartbeat lost: plugin %s %s running for %llu ms, over 10x "
                                "plugins.hook_timeout"
                              : "plugin %s %s running for %llu ms, over 10x plugins.hook_timeout",
                          info->name, info->key, hook, in_hook);
            return;
        }
    }
    uint64_t hb = atomic_load_explicit(&sl->act.heartbeat_ms, memory_order_relaxed);
    uint64_t hb_limit = 10 * cfg->hook_timeout_ms;
    if (hb_limit < 1000)
        hb_limit = 1000;
    if (pi == 0 && now > hb && now - hb > hb_limit) {
        snprintf(w->kill_reason, sizeof(w->kill_reason),
                 "heartbeat lost for %llu ms outside plugin hooks", (unsigned long long)(now - hb));
        spk_error("generation %u worker %d (pid %d): %s; killing it", w->g->id, w->index,
                  (int)w->pid, w->kill_reason);
        kill(w->pid, SIGKILL);
    }
}

static void on_watchdog(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    sup *s = t->data;
    uint64_t now = spk_mono_ms();
    generation *gens[2] = {s->cur, s->next};
    for (int k = 0; k < 2; k++)
        for (int i = 0; gens[k] && i < gens[k]->n; i++)
            watch_worker(s, &gens[k]->w[i], now);
    /* Draining generations too: a hook that hangs on the way out (fini) is killed. */
    for (generation *g = s->old; g; g = g->next_old)
        for (int i = 0; i < g->n; i++)
            watch_worker(s, &g->w[i], now);
    if (s->next != NULL && !s->stopping) {
        generation *g = s->next;
        int ready = 0;
        for (int i = 0; i < g->n; i++) {
            spk_wslot *sl = wslot(&g->w[i]);
            ready += sl != NULL && g->w[i].pid != 0 &&
                     atomic_load_explicit(&sl->state, memory_order_acquire) == SPK_W_READY;
        }
        if (ready == g->n)
            promote(s);
    }
}

/* ---- signals ------------------------------------------------------------------------ */

static void stop_all(sup *s, int sig)
{
    s->stopping = true;
    generation *gens[2] = {s->cur, s->next};
    for (int k = 0; k < 2; k++) {
        for (int i = 0; gens[k] && i < gens[k]->n; i++) {
            wproc *w = &gens[k]->w[i];
            ev_timer_stop(s->loop, &w->restart);
            w->draining = true;
            if (w->pid != 0)
                kill(w->pid, w->accepting ? sig : SIGKILL);
        }
    }
    for (generation *g = s->old; g; g = g->next_old)
        gen_signal(g, sig == SIGQUIT ? SIGQUIT : SIGTERM);
    maybe_finish_stop(s);
}

static void on_stop_deadline(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    sup *s = t->data;
    spk_warn("workers still running past the stop deadline; killing them");
    generation *gens[2] = {s->cur, s->next};
    for (int k = 0; k < 2; k++)
        if (gens[k])
            gen_signal(gens[k], SIGKILL);
    for (generation *g = s->old; g; g = g->next_old)
        gen_signal(g, SIGKILL);
}

static void on_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)revents;
    sup *s = w->data;
    if (w->signum == SIGHUP) {
        spk_info("SIGHUP: reloading %s", s->path);
        start_replacement(s, "reload");
        return;
    }
    if (s->stopping && w->signum != SIGQUIT)
        return;
    double grace;
    if (w->signum == SIGQUIT) {
        spk_info("SIGQUIT: stopping now");
        grace = 1.0;
    } else {
        char sn[24];
        spk_info("%s: stopping; workers drain for at most %llu ms",
                 sig_name(w->signum, sn, sizeof(sn)),
                 (unsigned long long)(s->cur ? s->cur->cfg->drain_timeout_ms : 0));
        grace = (s->cur ? (double)s->cur->cfg->drain_timeout_ms / 1000.0 : 0) + 5.0;
    }
    stop_all(s, w->signum == SIGQUIT ? SIGQUIT : SIGTERM);
    ev_timer_stop(loop, &s->stop_deadline);
    ev_timer_set(&s->stop_deadline, grace, 0);
    ev_timer_start(loop, &s->stop_deadline);
}

/* ---- queue sync --------------------------------------------------------------------------
 *
 * The supervisor keeps the queue moving: it opens the queue itself (it never loads
 * plugins, so its handle is out of their reach) and calls spk_queue_sync() every
 * queue.sync period, and sooner when the journal is a quarter full (checked every
 * QCHECK_S, 5 ms; with `always`, only then), plus once after the last worker exited. A sync moves
 * what workers appended to the journal into LMDB and flushes it, which frees the
 * journal's space; workers only move it themselves when they find it full. The sync runs
 * on this loop: while appends keep refilling the journal it keeps moving, but starts no
 * new batch after 250 ms (docs/queue.md), delaying the watchdog's checks by that much
 * plus one batch. */
#define QCHECK_S 0.005

static const spk_config *queue_cfg(const sup *s)
{
    return s->cur ? s->cur->cfg : s->next ? s->next->cfg : NULL;
}

static void queue_close(sup *s)
{
    spk_queue_close(s->queue);
    s->queue = NULL;
    free(s->queue_path);
    s->queue_path = NULL;
}

static void queue_ensure(sup *s, const spk_config *cfg)
{
    if (cfg == NULL || cfg->queue_path == NULL)
        return;
    if (s->queue != NULL && strcmp(s->queue_path, cfg->queue_path) == 0)
        return;
    if (s->queue != NULL) {
        spk_queue_sync(s->queue, NULL);
        queue_close(s);
    }
    spk_queue *q;
    spk_errbuf eb;
    if (spk_queue_conf_open(cfg, &q, &eb) != 0) {
        if (strcmp(s->queue_err, eb.msg) != 0)
            spk_warn("queue: %s (retrying)", eb.msg);
        snprintf(s->queue_err, sizeof(s->queue_err), "%s", eb.msg);
        return;
    }
    s->queue_path = strdup(cfg->queue_path);
    if (s->queue_path == NULL) {
        spk_queue_close(q);
        return;
    }
    s->queue = q;
    s->queue_err[0] = '\0';
}

static double queue_period(const spk_config *cfg)
{
    return cfg->queue_sync_always ? 1.0 : (double)cfg->queue_sync_interval_ms / 1000.0;
}

static void on_qsync(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)revents;
    sup *s = t->data;
    const spk_config *cfg = queue_cfg(s);
    if (cfg == NULL)
        return;
    double now = ev_now(loop);
    if (s->queue == NULL || now - s->qlast >= queue_period(cfg))
        queue_ensure(s, cfg);
    if (s->queue == NULL)
        return;
    /* always: appends are durable in the journal already; moving them is for readers
     * (who move what they need themselves) and for space, so only a quarter-full journal
     * is moved: a move's flushes would compete with the appends' own. */
    bool due = !cfg->queue_sync_always && now - s->qlast >= queue_period(cfg);
    if (!due && spk_queue_journal_fill(s->queue) < 0.25)
        return;
    s->qlast = now;
    spk_errbuf eb;
    if (spk_queue_sync(s->queue, &eb) == 0) {
        s->qsyncs++;
    } else if (s->qsync_errors++ % 100 == 0) {
        spk_error("%s", eb.msg);
    }
}

/* ---- status report ------------------------------------------------------------------ */

typedef struct outbuf {
    char *p;
    size_t len, cap;
} outbuf;

__attribute__((format(printf, 2, 3))) static void out(outbuf *o, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(o->p ? o->p + o->len : NULL, o->p ? o->cap - o->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0)
            return;
        if (o->p && o->len + (size_t)n < o->cap) {
            o->len += (size_t)n;
            return;
        }
        size_t cap = o->cap ? o->cap * 2 : 4096;
        while (cap < o->len + (size_t)n + 1)
            cap *= 2;
        char *np = realloc(o->p, cap);
        if (np == NULL)
            return;
        o->p = np;
        o->cap = cap;
    }
}

static const char *state_name(uint32_t st)
{
    switch (st) {
    case SPK_W_STARTING: return "starting";
    case SPK_W_READY: return "ready";
    case SPK_W_DRAINING: return "draining";
    }
    return "down";
}

static void report_gen(sup *s, outbuf *o, generation *g, const char *role)
{
    ev_tstamp now = ev_now(s->loop);
    out(o, "generation %u (%s): %d workers\n", g->id, role, g->n);
    for (int i = 0; i < g->n; i++) {
        wproc *w = &g->w[i];
        spk_wslot *sl = wslot(w);
        if (w->pid == 0) {
            out(o, "  worker %d  down        restarts %u%s\n", i, w->restarts,
                ev_is_active(&w->restart) ? "  (restart pending)" : "");
            continue;
        }
        out(o, "  worker %d  pid %-7d %-9s up %.1f s  restarts %u  connections %llu "
               "(total %llu)\n",
            i, (int)w->pid, state_name(sl ? atomic_load(&sl->state) : 0), now - w->started,
            w->restarts, sl ? (unsigned long long)atomic_load(&sl->conns_active) : 0ULL,
            sl ? (unsigned long long)atomic_load(&sl->conns_total) : 0ULL);
    }
}

/* Plugins of the serving generation, from the slot of its first worker that published. */
static const spk_wslot *plugin_source(sup *s)
{
    for (int i = 0; s->cur && i < s->cur->n; i++) {
        const spk_wslot *sl = wslot(&s->cur->w[i]);
        if (sl != NULL && atomic_load(&sl->state) == SPK_W_READY)
            return sl;
    }
    return NULL;
}

/* send_to_control counters since the supervisor started: the live workers' slots plus
 * what the exited ones had counted. `unavail`: live workers that could not open the queue. */
static void queue_counters(sup *s, uint64_t *sent, uint64_t refused[SPK_QR_N], int *unavail)
{
    *sent = s->q_gone_sent;
    *unavail = 0;
    memcpy(refused, s->q_gone_refused, sizeof(uint64_t) * SPK_QR_N);
    for (int i = 0; i < SPK_STATUS_SLOTS; i++) {
        if (!s->slot_used[i])
            continue;
        const spk_queue_counters *qc = &s->st->slots[i].queue;
        *sent += atomic_load_explicit(&qc->sent, memory_order_relaxed);
        for (int r = 0; r < SPK_QR_N; r++)
            refused[r] += atomic_load_explicit(&qc->refused[r], memory_order_relaxed);
        *unavail += (int)atomic_load_explicit(&qc->unavailable, memory_order_relaxed);
    }
}

static void report_queue(sup *s, outbuf *o)
{
    uint64_t sent, refused[SPK_QR_N], nref = 0;
    int unavail;
    queue_counters(s, &sent, refused, &unavail);
    for (int r = 0; r < SPK_QR_N; r++)
        nref += refused[r];
    const spk_config *cfg = queue_cfg(s);
    spk_queue_stats st;
    spk_errbuf eb;
    if (s->queue == NULL || spk_queue_stats_get(s->queue, &st, &eb) != 0) {
        out(o, "queue: unavailable: %s\n", s->queue ? eb.msg : s->queue_err[0] ? s->queue_err
                                                                               : "not open");
    } else {
        out(o, "queue: %s  pending %llu (%llu bytes)  oldest %.1f s  acked %llu  expired %llu  "
               "sync %s\n",
            s->queue_path, (unsigned long long)st.pending, (unsigned long long)st.pending_bytes,
            (double)st.oldest_age_ms / 1000.0, (unsigned long long)st.acked,
            (unsigned long long)st.expired, cfg && cfg->queue_sync_always ? "always" : "interval");
        spk_queue_stats_free(&st);
    }
    out(o, "  send_to_control: accepted %llu  refused %llu", (unsigned long long)sent,
        (unsigned long long)nref);
    for (int r = 0; r < SPK_QR_N; r++)
        if (refused[r] > 0)
            out(o, "  %s %llu", spk_qrefuse_name(r), (unsigned long long)refused[r]);
    if (unavail > 0)
        out(o, "  (%d workers could not open the queue)", unavail);
    out(o, "\n");
}

static void metrics_queue(sup *s, outbuf *o)
{
    uint64_t sent, refused[SPK_QR_N];
    int unavail;
    queue_counters(s, &sent, refused, &unavail);
    spk_queue_stats st;
    bool have = s->queue != NULL && spk_queue_stats_get(s->queue, &st, NULL) == 0;
    out(o, "# TYPE spoke_queue_available gauge\nspoke_queue_available %d\n",
        have && unavail == 0 ? 1 : 0);
    if (have) {
        out(o, "# TYPE spoke_queue_pending gauge\nspoke_queue_pending %llu\n",
            (unsigned long long)st.pending);
        out(o, "# TYPE spoke_queue_pending_bytes gauge\nspoke_queue_pending_bytes %llu\n",
            (unsigned long long)st.pending_bytes);
        out(o, "# TYPE spoke_queue_oldest_age_seconds gauge\n"
               "spoke_queue_oldest_age_seconds %.3f\n", (double)st.oldest_age_ms / 1000.0);
        out(o, "# TYPE spoke_queue_expired_total counter\nspoke_queue_expired_total %llu\n",
            (unsigned long long)st.expired);
        out(o, "# TYPE spoke_queue_acked_total counter\nspoke_queue_acked_total %llu\n",
            (unsigned long long)st.acked);
        out(o, "# TYPE spoke_queue_damaged_total counter\nspoke_queue_damaged_total %llu\n",
            (unsigned long long)st.damaged);
        out(o, "# TYPE spoke_queue_journal_used_bytes gauge\n"
               "spoke_queue_journal_used_bytes %llu\n"
               "# TYPE spoke_queue_journal_size_bytes gauge\n"
               "spoke_queue_journal_size_bytes %llu\n",
            (unsigned long long)st.journal_used, (unsigned long long)st.journal_size);
        out(o, "# TYPE spoke_queue_plugin_pending gauge\n");
        for (size_t i = 0; i < st.n_plugins; i++)
            out(o, "spoke_queue_plugin_pending{plugin_id=\"%u\"} %llu\n", st.plugins[i].plugin_id,
                (unsigned long long)st.plugins[i].pending);
        spk_queue_stats_free(&st);
    }
    out(o, "# TYPE spoke_queue_sent_total counter\nspoke_queue_sent_total %llu\n",
        (unsigned long long)sent);
    out(o, "# TYPE spoke_queue_refused_total counter\n");
    for (int r = 0; r < SPK_QR_N; r++)
        out(o, "spoke_queue_refused_total{reason=\"%s\"} %llu\n", spk_qrefuse_name(r),
            (unsigned long long)refused[r]);
    out(o, "# TYPE spoke_queue_syncs_total counter\nspoke_queue_syncs_total %llu\n"
           "# TYPE spoke_queue_sync_errors_total counter\nspoke_queue_sync_errors_total %llu\n",
        (unsigned long long)s->qsyncs, (unsigned long long)s->qsync_errors);
}

static void build_report(sup *s, outbuf *o)
{
    ev_tstamp now = ev_now(s->loop);
    out(o, "spoked %s  pid %d  up %.0f s  config %s\n", SPOKE_VERSION, (int)s->pid,
        now - s->started, s->path);
    out(o, "last reload: %s\n", s->last_reload[0] ? s->last_reload : "none");
    if (s->cur)
        report_gen(s, o, s->cur, "serving");
    if (s->next)
        report_gen(s, o, s->next, "starting");
    for (generation *g = s->old; g; g = g->next_old)
        report_gen(s, o, g, "draining");
    out(o, "plugins:\n");
    const spk_wslot *sl = plugin_source(s);
    uint32_t n = sl ? atomic_load(&sl->n_plugins) : 0;
    for (uint32_t i = 0; i < n && i < SPK_STATUS_PLUGINS; i++) {
        const crash_rec *c = crash_find(s, sl->plugins[i].key, "", false);
        out(o, "  %-24s %-10s active       crashes %u  slow hooks %u\n", sl->plugins[i].name,
            sl->plugins[i].version, c ? c->total : 0, c ? c->slow_hooks : 0);
    }
    for (size_t i = 0; i < s->n_crashes; i++) {
        const crash_rec *c = &s->crashes[i];
        if (c->quarantined)
            out(o, "  %-24s %-10s quarantined  crashes %u  (last: %s)\n", c->name, "", c->total,
                c->last);
    }
    if (s->refused[0])
        out(o, "  refused at the last reload: %s\n", s->refused);
    report_queue(s, o);
}

static void build_metrics(sup *s, outbuf *o)
{
    out(o, "# TYPE spoke_generation gauge\nspoke_generation %u\n", s->cur ? s->cur->id : 0);
    out(o, "# TYPE spoke_worker_restarts_total counter\nspoke_worker_restarts_total %llu\n",
        (unsigned long long)s->restarts_total);
    out(o, "# TYPE spoke_reloads_total counter\nspoke_reloads_total{result=\"ok\"} %llu\n"
           "spoke_reloads_total{result=\"failed\"} %llu\n",
        (unsigned long long)s->reloads_ok, (unsigned long long)s->reloads_failed);
    out(o, "# TYPE spoke_hook_timeouts_total counter\nspoke_hook_timeouts_total %llu\n",
        (unsigned long long)s->hook_timeouts);
    uint64_t active = 0, total = 0;
    for (int i = 0; i < SPK_STATUS_SLOTS; i++) {
        if (!s->slot_used[i])
            continue;
        active += atomic_load(&s->st->slots[i].conns_active);
        total += atomic_load(&s->st->slots[i].conns_total);
    }
    out(o, "# TYPE spoke_connections_active gauge\nspoke_connections_active %llu\n",
        (unsigned long long)active);
    out(o, "# TYPE spoke_plugin_crashes_total counter\n");
    for (size_t i = 0; i < s->n_crashes; i++)
        out(o, "spoke_plugin_crashes_total{plugin=\"%s\"} %u\n", s->crashes[i].name,
            s->crashes[i].total);
    out(o, "# TYPE spoke_plugin_quarantined gauge\n");
    for (size_t i = 0; i < s->n_crashes; i++)
        out(o, "spoke_plugin_quarantined{plugin=\"%s\"} %d\n", s->crashes[i].name,
            s->crashes[i].quarantined ? 1 : 0);
    (void)total;
    metrics_queue(s, o);
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

static int accept_blocking(int lfd)
{
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0)
        return -1;
    /* The supervisor's loop also runs the watchdog: a client that is slow to send its
     * request or to read the answer may hold it for 100 ms at most. */
    struct timeval tv = {.tv_usec = 100000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
}

/* The admin socket answers every connection with the status report, then closes. */
static void on_admin(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    sup *s = w->data;
    int fd = accept_blocking(w->fd);
    if (fd < 0)
        return;
    outbuf o = {0};
    build_report(s, &o);
    if (o.p)
        write_all(fd, o.p, o.len);
    free(o.p);
    close(fd);
}

static void on_metrics(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    sup *s = w->data;
    int fd = accept_blocking(w->fd);
    if (fd < 0)
        return;
    char req[2048];
    ssize_t n = read(fd, req, sizeof(req) - 1);
    outbuf body = {0}, o = {0};
    if (n > 0) {
        req[n] = '\0';
        if (strncmp(req, "GET /metrics", 12) == 0) {
            build_metrics(s, &body);
            out(&o, "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                    "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                body.len, body.p ? body.p : "");
        } else {
            out(&o, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
        if (o.p)
            write_all(fd, o.p, o.len);
    }
    free(body.p);
    free(o.p);
    close(fd);
}

/* ---- setup -------------------------------------------------------------------------- */

static int mkdir_p(const char *dir)
{
    char tmp[512];
    snprintf(tmp, sizeof(tmp), "%s", dir);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
                return -1;
            *p = '/';
        }
    }
    return mkdir(tmp, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

static int setup_run_dir(sup *s, const spk_config *cfg, spk_errbuf *eb)
{
    if (mkdir_p(cfg->run_dir) != 0)
        return spk_errf(eb, SPK_EIO, "run_dir %s: %s", cfg->run_dir, strerror(errno));
    snprintf(s->pid_path, sizeof(s->pid_path), "%s/spoked.pid", cfg->run_dir);
    snprintf(s->admin_path, sizeof(s->admin_path), "%s/spoked.sock", cfg->run_dir);
    /* Refuse to start twice on one run_dir: the pid file names a live process. */
    FILE *f = fopen(s->pid_path, "r");
    if (f != NULL) {
        int pid = 0;
        if (fscanf(f, "%d", &pid) == 1 && pid > 0 && pid != s->pid && kill(pid, 0) == 0) {
            fclose(f);
            return spk_errf(eb, SPK_EBUSY, "%s: spoked is already running as pid %d",
                            s->pid_path, pid);
        }
        fclose(f);
    }
    f = fopen(s->pid_path, "w");
    if (f == NULL)
        return spk_errf(eb, SPK_EIO, "%s: %s", s->pid_path, strerror(errno));
    fprintf(f, "%d\n", (int)s->pid);
    fclose(f);
    spk_addr a;
    char text[300];
    snprintf(text, sizeof(text), "unix:%s", s->admin_path);
    int rc = spk_addr_parse(text, &a, eb);
    if (rc == 0)
        rc = s->admin_fd = spk_listen(&a, 16, eb);
    if (rc < 0)
        return rc;
    chmod(s->admin_path, 0600);
    if (cfg->metrics_listen != NULL) {
        rc = spk_addr_parse(cfg->metrics_listen, &a, eb);
        if (rc == 0)
            rc = s->metrics_fd = spk_listen(&a, 16, eb);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int bind_listeners(sup *s, const spk_config *cfg, spk_errbuf *eb)
{
    s->fds = calloc(cfg->n_listen, sizeof(int));
    s->listen = calloc(cfg->n_listen, sizeof(char *));
    if (s->fds == NULL || s->listen == NULL)
        return spk_errf(eb, SPK_ENOMEM, "out of memory");
    int rc = spk_listen_all(cfg->listen, cfg->n_listen, cfg->backlog, s->fds, eb);
    if (rc != 0)
        return rc;
    s->n_fds = cfg->n_listen;
    for (size_t i = 0; i < cfg->n_listen; i++) {
        if ((s->listen[i] = strdup(cfg->listen[i])) == NULL)
            return spk_errf(eb, SPK_ENOMEM, "out of memory");
        s->n_listen++;
    }
    return 0;
}

static void teardown(sup *s)
{
    gen_free(s, s->cur);
    gen_free(s, s->next);
    while (s->old) {
        generation *g = s->old;
        s->old = g->next_old;
        gen_free(s, g);
    }
    for (size_t i = 0; i < s->n_fds; i++)
        close(s->fds[i]);
    for (size_t i = 0; i < s->n_listen; i++)
        free(s->listen[i]);
    free(s->fds);
    free(s->listen);
    free(s->crashes);
    if (s->admin_fd > 0) {
        close(s->admin_fd);
        unlink(s->admin_path);
    }
    if (s->metrics_fd > 0)
        close(s->metrics_fd);
    if (s->pid_path[0])
        unlink(s->pid_path);
    spk_status_unmap(s->st);
    if (s->st_fd > 0)
        close(s->st_fd);
}

static void watch_signal(sup *s, ev_signal *w, int sig)
{
    ev_signal_init(w, on_signal, sig);
    w->data = s;
    ev_signal_start(s->loop, w);
}

int spk_supervisor_main(const char *path, const char *self_exe)
{
    sup s;
    memset(&s, 0, sizeof(s));
    s.path = path;
    s.self_exe = self_exe;
    s.pid = getpid();
    s.st_fd = -1;
    spk_errbuf eb;
    spk_log_set_tag("spoked");
    /* Hold the control signals until their watchers exist: a SIGHUP sent right after start
     * (a service manager's reload) must not kill the process with the default action. */
    sigset_t ctl, old_mask;
    sigemptyset(&ctl);
    sigaddset(&ctl, SIGHUP);
    sigaddset(&ctl, SIGTERM);
    sigaddset(&ctl, SIGINT);
    sigaddset(&ctl, SIGQUIT);
    sigprocmask(SIG_BLOCK, &ctl, &old_mask);

    generation *g = gen_new(&s, &eb);
    if (g == NULL) {
        fprintf(stderr, "spoked: %s\n", eb.msg);
        return 1;
    }
    spk_log_set_level(g->cfg->log_level);
    s.loop = ev_default_loop(EVFLAG_AUTO);
    if (s.loop == NULL || bind_listeners(&s, g->cfg, &eb) != 0 ||
        setup_run_dir(&s, g->cfg, &eb) != 0 || spk_status_create(&s.st, &s.st_fd, &eb) != 0) {
        spk_error("%s", s.loop ? eb.msg : "cannot create the event loop");
        gen_free(&s, g);
        teardown(&s);
        return 1;
    }
    s.started = ev_now(s.loop);
    signal(SIGPIPE, SIG_IGN);
    watch_signal(&s, &s.sig_hup, SIGHUP);
    watch_signal(&s, &s.sig_term, SIGTERM);
    watch_signal(&s, &s.sig_int, SIGINT);
    watch_signal(&s, &s.sig_quit, SIGQUIT);
    sigprocmask(SIG_SETMASK, &old_mask, NULL);
    ev_child_init(&s.child, on_child, 0, 0);
    s.child.data = &s;
    ev_child_start(s.loop, &s.child);
    double period = (double)g->cfg->hook_timeout_ms / 4000.0;
    period = period < 0.005 ? 0.005 : period > 0.1 ? 0.1 : period;
    ev_timer_init(&s.watchdog, on_watchdog, period, period);
    s.watchdog.data = &s;
    ev_timer_start(s.loop, &s.watchdog);
    /* Open the queue before the first worker starts, so the loop is free to promote it. */
    queue_ensure(&s, g->cfg);
    double qperiod = queue_period(g->cfg) < QCHECK_S ? queue_period(g->cfg) : QCHECK_S;
    ev_timer_init(&s.qsync, on_qsync, qperiod, qperiod);
    s.qsync.data = &s;
    ev_timer_start(s.loop, &s.qsync);
    ev_timer_init(&s.stop_deadline, on_stop_deadline, 0, 0);
    s.stop_deadline.data = &s;
    ev_io_init(&s.admin_w, on_admin, s.admin_fd, EV_READ);
    s.admin_w.data = &s;
    ev_io_start(s.loop, &s.admin_w);
    if (s.metrics_fd > 0) {
        ev_io_init(&s.metrics_w, on_metrics, s.metrics_fd, EV_READ);
        s.metrics_w.data = &s;
        ev_io_start(s.loop, &s.metrics_w);
    }

    if (gen_start(&s, g) != 0) {
        spk_error("out of memory");
        gen_free(&s, g);
        teardown(&s);
        return 1;
    }
    s.next = g; /* the first generation is promoted like any other once ready */
    spk_info("supervisor pid %d: %s -> %s, %d workers, generation %u", (int)s.pid,
             g->cfg->listen[0], g->cfg->upstream, g->n, g->id);

    ev_run(s.loop, 0);

    int code = s.fatal ? s.exit_code : 0;
    ev_timer_stop(s.loop, &s.watchdog);
    ev_timer_stop(s.loop, &s.stop_deadline);
    ev_timer_stop(s.loop, &s.qsync);
    if (s.queue != NULL && spk_queue_sync(s.queue, &eb) != 0) /* the workers have exited */
        spk_error("%s", eb.msg);
    queue_close(&s);
    ev_child_stop(s.loop, &s.child);
    ev_signal_stop(s.loop, &s.sig_hup);
    ev_signal_stop(s.loop, &s.sig_term);
    ev_signal_stop(s.loop, &s.sig_int);
    ev_signal_stop(s.loop, &s.sig_quit);
    ev_io_stop(s.loop, &s.admin_w);
    ev_io_stop(s.loop, &s.metrics_w);
    spk_info("supervisor stopped");
    teardown(&s);
    return code;
}
