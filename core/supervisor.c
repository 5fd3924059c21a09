/*
 * supervisor.c -- spoked's master process: generations and child processes (see
 * supervisor.h for what it does; supervisor_int.h for how its three files divide it).
 *
 * State: a *generation* is one config snapshot (the file's text, kept in a memfd that
 * every worker of the generation parses, so a restarted worker runs exactly the config
 * its siblings run), its plugin files (sealed copies read when it starts, pin.h, so a
 * restarted worker runs the same bytes too), the account its workers drop to (privs.h),
 * plus its workers and its quarantine set. `cur` serves; `next` exists
 * while a reload (or a quarantine) is starting a replacement; `old` generations drain.
 *
 * New workers load and initialise their plugins but do not accept until the supervisor
 * sends them SIGUSR1: a generation that fails half-way can then be killed without
 * dropping a single client connection, and the handover is: start accepting in the new
 * generation, then stop accepting in the old one (SIGTERM: stop accepting, drain, exit).
 *
 * A worker that exits is restarted, at once the first time and with a backoff that
 * follows its crash rate after that (spk_sup_restart_delay), also while a replacement
 * generation starts; who is to blame for its end is watchdog.c's (spk_sup_classify_exit,
 * spk_sup_blame). One timer samples every worker's slot for the watchdog; another runs
 * only while a worker starts, admitting restarted workers and promoting a ready
 * generation.
 * The watchdog never interrupts a worker unless a hook overstays ten times hook_timeout
 * or the heartbeat stops. This file also keeps the queue moving (queue sync, below) and
 * sets up and tears down the process; admin.c answers the admin socket, report.c the
 * metrics one.
 */
#include "supervisor.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ev.h>

#include "config.h"
#include "fs.h"
#include "log.h"
#include "net.h"
#include "notify.h"
#include "queue.h"
#include "queue_conf.h"
#include "status.h"
#include "supervisor_int.h"

#define BACKOFF_MIN_S 0.1
#define BACKOFF_MAX_S 10.0
#define BACKOFF_HALF_LIFE_S 5.0

static void spawn(wproc *w);
static void gen_free(sup *s, generation *g);

/* A level under 0.5 is a child that has not died for a while (one death 5 s ago, or
 * none): it restarts at once, so a single crash costs milliseconds, not a backoff. A crash
 * loop settles at a restart every second or two; plugins that crash are quarantined long
 * before (crash_limit). */
double spk_sup_restart_delay(const sup *s, spk_backoff *b)
{
    ev_tstamp now = ev_now(s->loop);
    double level = b->level * exp2(-(now - b->last) / BACKOFF_HALF_LIFE_S);
    double delay = level < 0.5 ? 0 : BACKOFF_MIN_S * exp2(level - 1.0);
    b->level = level + 1.0;
    b->last = now;
    return delay < BACKOFF_MAX_S ? delay : BACKOFF_MAX_S;
}

/* ---- config snapshots --------------------------------------------------------------- */

/* Read `path` into a memfd and parse it from there. On success the generation's cfg and
 * cfg_fd are set; messages name `path`, not the memfd. */
static int load_snapshot(const sup *s, const char *path, generation *g, spk_errbuf *eb)
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
    int rc = spk_config_load_role(fdpath, s->role, &g->cfg, eb);
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

int spk_sup_slot_alloc(sup *s)
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
void spk_sup_slot_free(sup *s, int i)
{
    if (i < 0 || !s->slot_used[i])
        return;
    const spk_queue_counters *qc = &s->st->slots[i].queue;
    s->q_gone_sent += atomic_load_explicit(&qc->sent, memory_order_relaxed);
    for (int r = 0; r < SPK_QR_N; r++)
        s->q_gone_refused[r] += atomic_load_explicit(&qc->refused[r], memory_order_relaxed);
    spk_hub_counters_add(&s->hub_gone, &s->st->slots[i].hub);
    spk_sup_metrics_fold(s, i);
    s->slot_used[i] = false;
}

static char *fmt_int(char *buf, size_t cap, long v)
{
    snprintf(buf, cap, "%ld", v);
    return buf;
}

void spk_sup_exec(sup *s, generation *g, const char *mode, int index, int slot,
                  bool with_listeners)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != s->pid)
        _exit(1); /* the supervisor died before prctl took effect */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    size_t max = 16 + 2 * s->n_fds + 2 * g->n_quarantine + 2 * g->pins.n;
    char **argv = calloc(max, sizeof(char *));
    char nbuf[8][24];
    if (argv == NULL)
        _exit(1);
    size_t a = 0;
    argv[a++] = (char *)s->prog;
    argv[a++] = (char *)mode;
    argv[a++] = fmt_int(nbuf[0], sizeof(nbuf[0]), index);
    argv[a++] = "--gen";
    argv[a++] = fmt_int(nbuf[1], sizeof(nbuf[1]), (long)g->id);
    argv[a++] = "--config-fd";
    argv[a++] = fmt_int(nbuf[2], sizeof(nbuf[2]), g->cfg_fd);
    argv[a++] = "--config-name";
    argv[a++] = (char *)s->path;
    argv[a++] = "--status-fd";
    argv[a++] = fmt_int(nbuf[3], sizeof(nbuf[3]), s->st_fd);
    argv[a++] = "--slot";
    argv[a++] = fmt_int(nbuf[4], sizeof(nbuf[4]), slot);
    fcntl(g->cfg_fd, F_SETFD, 0);
    fcntl(s->st_fd, F_SETFD, 0);
    for (size_t i = 0; with_listeners && i < s->n_fds; i++) {
        char *b = malloc(24);
        if (b == NULL)
            _exit(1);
        argv[a++] = "--listen-fd";
        argv[a++] = fmt_int(b, 24, s->fds[i]);
        fcntl(s->fds[i], F_SETFD, 0);
    }
    for (size_t i = 0; with_listeners && i < g->n_quarantine; i++) {
        argv[a++] = "--quarantine";
        argv[a++] = g->quarantine[i];
    }
    for (size_t i = 0; with_listeners && i < g->pins.n; i++) {
        /* "FD:PATH": the generation's copy of the plugin file at PATH (pin.h). */
        char *b = malloc(strlen(g->pins.v[i].path) + 24);
        if (b == NULL)
            _exit(1);
        sprintf(b, "%d:%s", g->pins.v[i].fd, g->pins.v[i].path);
        argv[a++] = "--pin";
        argv[a++] = b;
        fcntl(g->pins.v[i].fd, F_SETFD, 0);
    }
    argv[a] = NULL;
    execv(s->self_exe, argv);
    fprintf(stderr, "%s: cannot exec %s %s: %s\n", s->prog, s->self_exe, mode, strerror(errno));
    _exit(127);
}

static void spawn(wproc *w)
{
    sup *s = w->s;
    w->slot = spk_sup_slot_alloc(s);
    if (w->slot < 0) {
        spk_error("no free status slot for worker %d; retrying in 1 s", w->index);
        ev_timer_set(&w->restart, 1.0, 0);
        ev_timer_start(s->loop, &w->restart);
        return;
    }
    spk_wslot *sl = spk_sup_wslot(w);
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
        spk_sup_slot_free(s, w->slot);
        w->slot = -1;
        ev_timer_set(&w->restart, 1.0, 0);
        ev_timer_start(s->loop, &w->restart);
        return;
    }
    if (pid == 0)
        spk_sup_exec(s, w->g, "--worker", w->index, w->slot, true);
    w->pid = pid;
    w->started = ev_now(s->loop);
    if (!ev_is_active(&s->admit))
        ev_timer_start(s->loop, &s->admit);
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

/* The stores the workers open must be theirs once they dropped privileges. */
static void hand_over_stores(const sup *s, const generation *g)
{
    const spk_config *cfg = g->cfg;
    const char *dirs[2] = {s->role == SPOKE_ROLE_CONTROL ? cfg->hub_store : cfg->queue_path,
                           s->role == SPOKE_ROLE_CONTROL ? NULL : cfg->kv_path};
    for (int i = 0; i < 2; i++) {
        spk_errbuf eb;
        if (spk_privs_hand_over(&g->privs, dirs[i], &eb) != 0)
            spk_error("%s (workers running as %s may not be able to use it)", eb.msg,
                      g->privs.user);
    }
}

static generation *gen_new(sup *s, spk_errbuf *eb)
{
    generation *g = calloc(1, sizeof(*g));
    if (g == NULL) {
        spk_errf(eb, SPK_ENOMEM, "out of memory");
        return NULL;
    }
    g->cfg_fd = -1;
    int rc = load_snapshot(s, s->path, g, eb);
    if (rc != 0) {
        free(g);
        return NULL;
    }
    /* Whom the workers run as, and the plugin files they run: fixed for the generation's
     * life, restarts included. */
    if (spk_privs_resolve(g->cfg, &g->privs, eb) != 0 ||
        spk_pins_take(g->cfg, &g->pins, eb) != 0) {
        gen_free(s, g);
        return NULL;
    }
    /* Before the supervisor opens the queue (at start: it would create missing parents
     * 0700, out of the workers' reach); gen_start gives them what was created since. */
    hand_over_stores(s, g);
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

/* Status slots the generations may hold, and the uplink's: each generation one per worker
 * for as long as it lives, so that a worker restarted after a crash always finds one. */
static int slots_reserved(const sup *s)
{
    int n = 1 + (s->cur ? s->cur->n : 0) + (s->next ? s->next->n : 0);
    for (const generation *g = s->old; g; g = g->next_old)
        n += g->n;
    return n;
}

static int gen_start(sup *s, generation *g, spk_errbuf *eb)
{
    const char *key = s->role == SPOKE_ROLE_CONTROL ? "hub.workers" : "listen.workers";
    int n = g->cfg->workers;
    if (n == 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        n = cores < 1 ? 1 : cores > SPK_WORKERS_MAX ? SPK_WORKERS_MAX : (int)cores;
        if (cores > SPK_WORKERS_MAX)
            spk_warn("%s: auto: %ld cores, %d workers (the most spoked runs)", key, cores, n);
    }
    int held = slots_reserved(s);
    if (held + n > SPK_STATUS_SLOTS)
        return spk_errf(eb, SPK_EBUSY,
                        "%s %d: %d of the %d status slots are held by the generations still "
                        "running; retry once the draining ones have finished",
                        key, n, held, SPK_STATUS_SLOTS);
    g->id = ++s->gen_counter;
    hand_over_stores(s, g);
    g->w = calloc((size_t)n, sizeof(wproc));
    if (g->w == NULL)
        return spk_errf(eb, SPK_ENOMEM, "out of memory"); /* g->n stays 0: gen_free() has no
                                                            workers to look at */
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
        spk_sup_slot_free(s, g->w[i].slot);
    }
    free(g->w);
    for (size_t i = 0; i < g->n_quarantine; i++)
        free(g->quarantine[i]);
    free(g->quarantine);
    spk_pins_free(&g->pins);
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
    /* A generation with no live worker (its workers crashed or failed to start) has no exit
     * left to reap it: free it now, not at some later draining worker's exit. */
    if (gen_live(g) == 0) {
        gen_free(s, g);
        return;
    }
    g->next_old = s->old;
    s->old = g;
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
    spk_notify_reload_failed(why);
}

/* Start a generation to replace `cur`: from the re-read config file on SIGHUP
 * (quarantine cleared), or from cur's own snapshot when quarantining a plugin. */
void spk_sup_start_replacement(sup *s, const char *why)
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
            reload_failed(s, s->role == SPOKE_ROLE_CONTROL ? "hub.listen changed; restart hubd to change it" : "listen.address changed; restart spoked to change it");
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
        g->privs = s->cur->privs;
        if (spk_config_load_role(fdpath, s->role, &g->cfg, &eb) != 0 ||
            (g->cfg_fd = fcntl(s->cur->cfg_fd, F_DUPFD_CLOEXEC, 0)) < 0 ||
            gen_copy_quarantine(g, s->cur) != 0 || spk_pins_dup(&s->cur->pins, &g->pins) != 0) {
            spk_error("%s: cannot prepare the replacement generation: %s", why, eb.msg);
            gen_free(s, g);
            return;
        }
    }
    int rc = gen_start(s, g, &eb);
    if (rc != 0) {
        if (hup)
            reload_failed(s, eb.msg);
        else
            spk_error("%s: cannot start the replacement generation: %s", why, eb.msg);
        if (!hup && rc == SPK_EBUSY && s->pending == NULL)
            s->pending = "quarantine"; /* again when a draining generation has finished */
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
        spk_sup_start_replacement(s, why);
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
    spk_sup_uplink_sync(s);
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
    spk_notify_ready(g->id, g->n); /* its workers accept once they see the SIGUSR1 just sent,
                                      from the listening sockets already bound */
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
    if (s->next == NULL)
        run_pending(s); /* a replacement that waited for status slots */
}

static void maybe_finish_stop(sup *s)
{
    if (!s->stopping)
        return;
    int live = (s->cur ? gen_live(s->cur) : 0) + (s->next ? gen_live(s->next) : 0);
    for (generation *g = s->old; g; g = g->next_old)
        live += gen_live(g);
    if (live == 0 && spk_sup_uplink_live(s)) {
        spk_sup_uplink_stop(s, SIGTERM); /* the workers are gone: the uplink drains last */
        return;
    }
    if (live == 0)
        ev_break(s->loop, EVBREAK_ALL);
}

static void on_child(struct ev_loop *loop, ev_child *c, int revents)
{
    (void)loop;
    (void)revents;
    sup *s = c->data;
    if (spk_sup_uplink_exited(s, c->rpid, c->rstatus)) {
        maybe_finish_stop(s);
        return;
    }
    wproc *w = find_worker(s, c->rpid);
    if (w == NULL)
        return;
    generation *g = w->g;
    int status = c->rstatus;
    w->pid = 0;
    spk_wslot *sl = spk_sup_wslot(w);

    if (w->draining || s->stopping) {
        spk_debug("generation %u worker %d exited (%s)", g->id, w->index,
                  WIFEXITED(status) ? "done" : "killed");
        if (w->blame_key[0] != '\0') {
            /* The watchdog killed it in a hook on its way out (fini, a last on_close):
             * the plugin's crash like any other, counted against the serving
             * generation's limits (no replacement starts while stopping). */
            spk_error("generation %u worker %d (pid %d) crashed: plugin %s, %s", g->id,
                      w->index, c->rpid, w->blame_name, w->kill_reason);
            spk_sup_blame(s, s->cur != NULL ? s->cur : g, w->blame_key, w->blame_name,
                          w->kill_reason);
        }
        spk_sup_slot_free(s, w->slot);
        w->slot = -1;
        reap_old(s);
        maybe_finish_stop(s);
        return;
    }

    char what[300];
    bool crash = spk_sup_classify_exit(w, status, what, sizeof(what));
    bool start_failed = sl != NULL && atomic_load(&sl->state) == SPK_W_STARTING;
    char reason[1100];
    if (WIFEXITED(status) && WEXITSTATUS(status) == SPK_EXIT_START && sl != NULL)
        snprintf(reason, sizeof(reason), "%s", sl->reason[0] ? sl->reason : "worker failed to start");
    else if (w->blame_key[0] != '\0')
        snprintf(reason, sizeof(reason), "worker %d crashed: plugin %s: %s", w->index,
                 w->blame_name, what);
    else
        snprintf(reason, sizeof(reason), "worker %d ended: %s", w->index, what);
    spk_sup_slot_free(s, w->slot);
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
        spk_sup_blame(s, g, w->blame_key, w->blame_name, what);
    } else if (start_failed) {
        spk_error("generation %u worker %d could not start: %s", g->id, w->index, reason);
    } else {
        spk_error("generation %u worker %d (pid %d) ended: %s", g->id, w->index, c->rpid, what);
    }
    /* Restarted even while a replacement starts: the replacement may fail, and until it
     * serves this generation is all there is (a worker restarted here is killed unused
     * if the replacement takes over first). */
    if (!g->cfg->reload_on_crash) {
        spk_warn("worker %d not restarted (plugins.reload_on_crash is false)", w->index);
        return;
    }
    double delay = spk_sup_restart_delay(s, &w->backoff);
    w->restarts++;
    s->restarts_total++;
    spk_info("restarting worker %d in %.0f ms", w->index, delay * 1000.0);
    ev_timer_set(&w->restart, delay, 0);
    ev_timer_start(s->loop, &w->restart);
}

/* ---- admission and the sampling timer --------------------------------------------- */

/* Admission: a restarted worker of the serving generation is told to accept once it is
 * ready, and a starting generation whose workers are all ready takes over. Returns
 * whether a worker is still starting. */
static bool admit(sup *s)
{
    bool starting = false;
    generation *g = s->cur;
    for (int i = 0; g && g->ready && i < g->n; i++) {
        wproc *w = &g->w[i];
        spk_wslot *sl = spk_sup_wslot(w);
        if (w->pid == 0 || w->accepting)
            continue;
        if (sl != NULL && !w->draining && w->kill_reason[0] == '\0' &&
            atomic_load_explicit(&sl->state, memory_order_acquire) == SPK_W_READY)
            tell_accept(w);
        else
            starting = true;
    }
    if (s->next != NULL && !s->stopping) {
        g = s->next;
        int ready = 0;
        for (int i = 0; i < g->n; i++) {
            spk_wslot *sl = spk_sup_wslot(&g->w[i]);
            ready += sl != NULL && g->w[i].pid != 0 &&
                     atomic_load_explicit(&sl->state, memory_order_acquire) == SPK_W_READY;
        }
        if (ready == g->n)
            promote(s);
        starting = starting || s->next != NULL; /* (promote may start a pending one) */
    }
    return starting;
}

/* The admission timer runs every ADMIT_S while a worker starts (spawn starts it), so a
 * worker restarted after a crash serves within a millisecond of being ready rather than
 * a watchdog period later: with one worker, that wait is the outage. */
#define ADMIT_S 0.001

static void on_admit(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)revents;
    if (!admit(t->data))
        ev_timer_stop(loop, t);
}

/* Every sampling period: the watchdog looks at every worker's slot (watchdog.c) and the
 * uplink's. */
static void on_watchdog(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    sup *s = t->data;
    spk_sup_watchdog_sample(s);
    spk_sup_uplink_sample(s);
}

/* ---- signals ------------------------------------------------------------------------ */

static void stop_all(sup *s, int sig)
{
    s->stopping = true;
    spk_notify_stopping();
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
    if (sig == SIGQUIT)
        spk_sup_uplink_stop(s, SIGQUIT);
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
    spk_sup_uplink_stop(s, SIGKILL);
}

static void on_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)revents;
    sup *s = w->data;
    if (w->signum == SIGHUP) {
        spk_info("SIGHUP: reloading %s", s->path);
        if (!s->stopping)
            spk_notify_reloading();
        spk_sup_start_replacement(s, "reload");
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
                 spk_sup_sig_name(w->signum, sn, sizeof(sn)),
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
 * QCHECK_S, 5 ms; with `always`, only then), plus once after the last worker exited; a
 * sync that fails is retried with backoff, not every check (spk_queue_sync_due). A sync moves
 * what workers appended to the journal into LMDB and flushes it, which frees the
 * journal's space; workers only move it themselves when they find it full. The sync runs
 * on this loop: while appends keep refilling the journal it keeps moving, but starts no
 * new batch after 250 ms (docs/queue.md), delaying the watchdog's checks by that much
 * plus one batch. */
#define QCHECK_S 0.005

static const spk_config *queue_cfg(const sup *s)
{
    return spk_sup_cfg(s);
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
    /* The queue's one sync policy and its backoff (queue.h, spk_queue_sync_due). */
    int rc = spk_queue_conf_sync_tick(s->queue, now, &s->qlast);
    if (rc > 0)
        s->qsyncs++;
    else if (rc < 0)
        s->qsync_errors++;
}

/* ---- setup -------------------------------------------------------------------------- */

static int setup_run_dir(sup *s, const spk_config *cfg, spk_errbuf *eb)
{
    int err = spk_mkdir_p(cfg->run_dir, 0755);
    if (err != 0)
        return spk_errf(eb, err == ENAMETOOLONG ? SPK_EINVAL : SPK_EIO, "run_dir %s: %s",
                        cfg->run_dir, strerror(err));
    snprintf(s->pid_path, sizeof(s->pid_path), "%s/%s.pid", cfg->run_dir, s->prog);
    snprintf(s->admin_path, sizeof(s->admin_path), "%s/%s.sock", cfg->run_dir, s->prog);
    /* Refuse to start twice on one run_dir: the pid file names a live process. Never
     * through a symbolic link: one planted in run_dir must not make the supervisor read
     * or write another file. */
    int pfd = open(s->pid_path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (pfd >= 0) {
        char buf[32] = "";
        ssize_t n = read(pfd, buf, sizeof(buf) - 1);
        close(pfd);
        int pid = n > 0 ? atoi(buf) : 0;
        if (pid > 0 && pid != s->pid && kill(pid, 0) == 0)
            return spk_errf(eb, SPK_EBUSY, "%s: %s is already running as pid %d",
                            s->pid_path, s->prog, pid);
    }
    /* A new file, created here (not a link, not someone else's file), 0644 whatever the
     * umask. */
    if (unlink(s->pid_path) != 0 && errno != ENOENT)
        return spk_errf(eb, SPK_EIO, "%s: %s", s->pid_path, strerror(errno));
    pfd = open(s->pid_path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (pfd < 0)
        return spk_errf(eb, SPK_EIO, "%s: %s", s->pid_path, strerror(errno));
    char line[32];
    int len = snprintf(line, sizeof(line), "%d\n", (int)s->pid);
    if (fchmod(pfd, 0644) != 0 || write(pfd, line, (size_t)len) != len) {
        int e = errno;
        close(pfd);
        return spk_errf(eb, SPK_EIO, "%s: %s", s->pid_path, strerror(e));
    }
    close(pfd);
    spk_addr a;
    char text[300];
    snprintf(text, sizeof(text), "unix:%s", s->admin_path);
    int rc = spk_addr_parse(text, &a, eb);
    if (rc == 0) {
        /* The socket file is created by bind with the umask's mode: a tight one, so it is
         * never connectable by others, not even before the chmod. */
        mode_t old = umask(077);
        rc = s->admin_fd = spk_listen(&a, 16, eb);
        umask(old);
    }
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

int spk_supervisor_main(const char *path, const char *self_exe, spoke_role role)
{
    sup s;
    memset(&s, 0, sizeof(s));
    s.role = role;
    s.prog = role == SPOKE_ROLE_CONTROL ? "hubd" : "spoked";
    s.path = path;
    s.self_exe = self_exe;
    s.pid = getpid();
    s.st_fd = -1;
    spk_sup_uplink_init(&s);
    spk_errbuf eb;
    spk_log_set_tag(s.prog);
    spk_notify_init();
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
        fprintf(stderr, "%s: %s\n", s.prog, eb.msg);
        return 1;
    }
    spk_log_set_level(g->cfg->log_level);
    spk_log_set_format((spk_log_format)g->cfg->log_format);
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
    ev_timer_init(&s.admit, on_admit, ADMIT_S, ADMIT_S);
    s.admit.data = &s;
    ev_timer_init(&s.stop_deadline, on_stop_deadline, 0, 0);
    s.stop_deadline.data = &s;
    spk_sup_admin_start(&s);
    if (spk_sup_metrics_start(&s, &eb) != 0) {
        spk_error("%s", eb.msg);
        spk_sup_metrics_stop(&s);
        gen_free(&s, g);
        teardown(&s);
        return 1;
    }

    if (gen_start(&s, g, &eb) != 0) {
        spk_error("%s", eb.msg);
        gen_free(&s, g);
        teardown(&s);
        return 1;
    }
    s.next = g; /* the first generation is promoted like any other once ready */
    spk_info("supervisor pid %d: %s%s%s, %d workers, generation %u", (int)s.pid,
             g->cfg->listen[0], g->cfg->upstream ? " -> " : " (gRPC)",
             g->cfg->upstream ? g->cfg->upstream : "", g->n, g->id);

    ev_run(s.loop, 0);

    int code = s.fatal ? s.exit_code : 0;
    ev_timer_stop(s.loop, &s.watchdog);
    ev_timer_stop(s.loop, &s.admit);
    ev_timer_stop(s.loop, &s.stop_deadline);
    ev_timer_stop(s.loop, &s.qsync);
    ev_timer_stop(s.loop, &s.up.restart);
    if (s.queue != NULL && spk_queue_sync(s.queue, &eb) != 0) /* the workers have exited */
        spk_error("%s", eb.msg);
    queue_close(&s);
    ev_child_stop(s.loop, &s.child);
    ev_signal_stop(s.loop, &s.sig_hup);
    ev_signal_stop(s.loop, &s.sig_term);
    ev_signal_stop(s.loop, &s.sig_int);
    ev_signal_stop(s.loop, &s.sig_quit);
    spk_sup_admin_stop(&s);
    spk_sup_metrics_stop(&s);
    spk_info("supervisor stopped");
    teardown(&s);
    return code;
}
