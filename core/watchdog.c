/*
 * watchdog.c -- the supervisor's watchdog and crash attribution.
 *
 * The watchdog samples every worker's slot (slot.h) on the supervisor's timer, for the
 * serving, the starting and the draining generations. It never reads a clock in the
 * worker: the same (plugin, seq) pair seen for longer than hook_timeout is a slow hook
 * (logged once, counted against the plugin); for ten times hook_timeout the worker is
 * killed and the kill is blamed on that plugin and hook. A worker that does not start
 * within start_timeout is killed and blamed on the plugin it is in (init,
 * on_config_loaded); a worker whose heartbeat stops outside any hook is killed and
 * blamed on nobody.
 *
 * When a worker has ended, spk_sup_classify_exit() reads its slot once more (the dead
 * writer's last stores are all visible) and names the plugin and hook it died in: the
 * watchdog's own reason if it killed it, the plugin whose health checks failed, or the
 * plugin in the slot for a death by a signal or an exit() inside a hook -- except SIGKILL:
 * the supervisor sends a serving worker that signal only from the watchdog, so another
 * one came from outside (the OOM killer, an operator) and is logged with the plugin and
 * hook that ran but blamed on nobody: outside kills never quarantine. spk_sup_blame()
 * counts that crash per plugin (by quarantine key) and, past crash_limit crashes in
 * crash_window, quarantines the plugin: it asks the generations' code for a replacement
 * without it (spk_sup_start_replacement). The crash records feed the reports.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "log.h"
#include "supervisor_int.h"

#define HEARTBEAT_PERIOD_MS 100 /* the worker's heartbeat timer (worker.c) */

crash_rec *spk_sup_crash_find(sup *s, const char *key, const char *name, bool create)
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

/* Count a crash of plugin `key`; quarantine it past crash_limit in crash_window. */
void spk_sup_blame(sup *s, generation *g, const char *key, const char *name, const char *what)
{
    crash_rec *c = spk_sup_crash_find(s, key, name, true);
    if (c == NULL)
        return;
    ev_tstamp now = ev_now(s->loop);
    double window = (double)g->cfg->crash_window_ms / 1000.0;
    unsigned keep = 0;
    for (unsigned i = 0; i < c->n_times; i++)
        if (now - c->times[i] <= window)
            c->times[keep++] = c->times[i];
    c->n_times = keep;
    if (c->n_times == SPK_CRASH_LIMIT_MAX) { /* full: past any crash_limit; keep the newest */
        memmove(c->times, c->times + 1, (SPK_CRASH_LIMIT_MAX - 1) * sizeof(c->times[0]));
        c->n_times--;
    }
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
    spk_sup_start_replacement(s, "quarantine");
}

/* "SIGSEGV" for SIGSEGV; `buf` holds at least 16 bytes. */
const char *spk_sup_sig_name(int sig, char *buf, size_t cap)
{
    const char *n = sigabbrev_np(sig);
    if (n == NULL)
        snprintf(buf, cap, "signal %d", sig);
    else
        snprintf(buf, cap, "SIG%s", n);
    return buf;
}

/* Describe how the worker ended and whom to blame; returns true for a crash. */
bool spk_sup_classify_exit(wproc *w, int status, char *what, size_t cap)
{
    spk_wslot *sl = spk_sup_wslot(w);
    uint32_t pi = 0, hook = 0;
    if (WIFEXITED(status) && WEXITSTATUS(status) == SPK_EXIT_HEALTH && sl != NULL) {
        pi = atomic_load(&sl->health_failed);
        hook = SPK_HOOK_HEALTH;
        snprintf(what, cap, "failed health checks");
    } else if (w->kill_reason[0] != '\0') {
        snprintf(what, cap, "%s", w->kill_reason);
        if (w->blame_key[0] != '\0')
            return true;
    } else if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL && sl != NULL) {
        /* The supervisor sends a serving worker SIGKILL only from the watchdog (with a
         * kill_reason): this one came from outside, the OOM killer or an operator. Named
         * with what ran, never counted as that plugin's crash. */
        pi = atomic_load(&sl->act.plugin);
        hook = atomic_load(&sl->act.hook);
        const char *name = pi && pi <= atomic_load(&sl->n_plugins) && pi <= SPK_STATUS_PLUGINS
                               ? sl->plugins[pi - 1].name
                               : NULL;
        if (name != NULL)
            snprintf(what, cap, "SIGKILL not sent by the supervisor (the OOM killer or an "
                                "operator?) while in plugin %s %s; not counted as its crash",
                     name, spk_hook_name((enum spk_hook_id)hook));
        else
            snprintf(what, cap, "SIGKILL not sent by the supervisor (the OOM killer or an "
                                "operator?) in host code");
        return true;
    } else if (WIFSIGNALED(status) && sl != NULL) {
        pi = atomic_load(&sl->act.plugin);
        hook = atomic_load(&sl->act.hook);
        char sn[24];
        snprintf(what, cap, "%s in %s", spk_sup_sig_name(WTERMSIG(status), sn, sizeof(sn)),
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
    spk_wslot *sl = spk_sup_wslot(w);
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
            crash_rec *c = spk_sup_crash_find(s, info->key, info->name, true);
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

void spk_sup_watchdog_sample(sup *s)
{
    uint64_t now = spk_mono_ms();
    generation *gens[2] = {s->cur, s->next};
    for (int k = 0; k < 2; k++)
        for (int i = 0; gens[k] && i < gens[k]->n; i++)
            watch_worker(s, &gens[k]->w[i], now);
    /* Draining generations too: a hook that hangs on the way out (fini) is killed. */
    for (generation *g = s->old; g; g = g->next_old)
        for (int i = 0; i < g->n; i++)
            watch_worker(s, &g->w[i], now);
}
