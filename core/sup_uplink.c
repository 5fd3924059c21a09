/*
 * sup_uplink.c -- the supervisor's side of the uplink process (core/uplink.h).
 *
 * The uplink runs outside the generations: one process, started from the serving
 * generation's config snapshot once a generation serves, kept while reloads leave its
 * settings alone, replaced (SIGTERM, then started again at once from the new snapshot)
 * when they change them, and stopped when the `uplink:` section goes away. It runs no
 * plugin code, so nothing is blamed or quarantined when it dies: it is restarted with the
 * workers' backoff (spk_sup_restart_delay). Its slot carries its heartbeat, which the watchdog checks
 * (a loop stuck for UPLINK_STUCK_S is killed), its counters, and the list of serving
 * plugins the supervisor publishes for its Heartbeat call.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loader.h"
#include "log.h"
#include "supervisor_int.h"

#define UPLINK_STUCK_S 30.0

static spk_wslot *uslot(const sup *s)
{
    return s->up.slot >= 0 ? &s->st->slots[s->up.slot] : NULL;
}

/* What the uplink process reads of the config: a change to any of it restarts it. */
static void settings_of(const spk_config *cfg, char *buf, size_t cap)
{
#define S(x) ((x) != NULL ? (x) : "")
    snprintf(buf, cap, "%s|%llu|%u|%s|%s|%s|%s|%llu|%llu|%s|%s|%s|%s|%d", S(cfg->uplink_url),
             (unsigned long long)cfg->uplink_heartbeat_ms, cfg->uplink_batch_size,
             S(cfg->uplink_token_file), S(cfg->uplink_ca), S(cfg->uplink_cert),
             S(cfg->uplink_key), (unsigned long long)cfg->uplink_max_batch_bytes,
             (unsigned long long)cfg->uplink_timeout_ms, S(cfg->edge_id),
             S(cfg->edge_namespace), S(cfg->queue_path), S(cfg->run_dir), (int)cfg->log_level);
#undef S
}

static void add_counters(spk_uplink_counters *to, const spk_uplink_counters *from)
{
#define ADD(f)                                                                             \
    atomic_store_explicit(&to->f,                                                          \
                          atomic_load_explicit(&to->f, memory_order_relaxed) +             \
                              atomic_load_explicit(&from->f, memory_order_relaxed),        \
                          memory_order_relaxed)
    ADD(batches_ok);
    ADD(batches_failed);
    ADD(acked);
    ADD(duplicates);
    ADD(refused);
    ADD(no_receiver);
    ADD(damaged);
    ADD(heartbeats_ok);
#undef ADD
}

void spk_sup_uplink_totals(const sup *s, spk_uplink_counters *out)
{
    memset(out, 0, sizeof(*out));
    add_counters(out, &s->up.gone);
    const spk_wslot *sl = uslot(s);
    if (sl != NULL) {
        add_counters(out, &sl->uplink);
        atomic_store(&out->last_ok_ms, atomic_load(&sl->uplink.last_ok_ms));
        atomic_store(&out->last_rtt_us, atomic_load(&sl->uplink.last_rtt_us));
        atomic_store(&out->last_status, atomic_load(&sl->uplink.last_status));
        atomic_store(&out->parked, atomic_load(&sl->uplink.parked));
    }
}

/* Copy the serving generation's plugins into the uplink's slot: those a ready worker
 * loaded (active), then the generation's quarantined ones. */
static void publish_plugins(sup *s)
{
    spk_wslot *sl = uslot(s);
    generation *g = s->cur;
    if (sl == NULL || g == NULL)
        return;
    const spk_wslot *src = NULL;
    for (int i = 0; i < g->n && src == NULL; i++) {
        const spk_wslot *w = spk_sup_wslot(&g->w[i]);
        if (w != NULL && atomic_load_explicit(&w->state, memory_order_acquire) == SPK_W_READY)
            src = w;
    }
    if (src == NULL)
        return;
    uint32_t n = atomic_load_explicit(&src->n_plugins, memory_order_acquire);
    atomic_fetch_add_explicit(&sl->plugins_seq, 1, memory_order_release); /* odd: writing */
    size_t k = 0;
    for (uint32_t i = 0; i < n && k < SPK_STATUS_PLUGINS; i++) {
        sl->plugins[k] = src->plugins[i];
        sl->plugins[k++].quarantined = 0;
    }
    for (size_t i = 0; i < g->n_quarantine && k < SPK_STATUS_PLUGINS; i++) {
        spk_plugin_info *pi = &sl->plugins[k++];
        memset(pi, 0, sizeof(*pi));
        const char *key = g->quarantine[i];
        snprintf(pi->key, sizeof(pi->key), "%s", key);
        size_t nl = strcspn(key, "@");
        snprintf(pi->name, sizeof(pi->name), "%.*s", (int)(nl < 63 ? nl : 63), key);
        for (size_t j = 0; j < g->cfg->n_plugins; j++) {
            char ck[256];
            spk_plugin_key(&g->cfg->plugins[j], ck, sizeof(ck));
            if (strcmp(ck, key) == 0)
                pi->id = g->cfg->plugins[j].id;
        }
        pi->quarantined = 1;
    }
    atomic_store_explicit(&sl->n_plugins, (uint32_t)k, memory_order_relaxed);
    atomic_fetch_add_explicit(&sl->plugins_seq, 1, memory_order_release); /* even: done */
}

static void spawn_uplink(sup *s)
{
    uproc *u = &s->up;
    generation *g = s->cur;
    if (g == NULL || g->cfg->uplink_url == NULL || s->stopping || u->pid != 0)
        return;
    u->slot = spk_sup_slot_alloc(s);
    if (u->slot < 0) {
        spk_error("no free status slot for the uplink; retrying in 1 s");
        ev_timer_set(&u->restart, 1.0, 0);
        ev_timer_start(s->loop, &u->restart);
        return;
    }
    spk_wslot *sl = uslot(s);
    atomic_store(&sl->state, SPK_W_STARTING);
    atomic_store(&sl->act.heartbeat_ms, spk_mono_ms());
    settings_of(g->cfg, u->settings, sizeof(u->settings));
    publish_plugins(s);
    pid_t pid = fork();
    if (pid < 0) {
        spk_error("fork uplink: %s; retrying in 1 s", strerror(errno));
        spk_sup_slot_free(s, u->slot);
        u->slot = -1;
        ev_timer_set(&u->restart, 1.0, 0);
        ev_timer_start(s->loop, &u->restart);
        return;
    }
    if (pid == 0)
        spk_sup_exec(s, g, "--uplink", 0, u->slot, false);
    u->pid = pid;
    u->started = ev_now(s->loop);
    u->replacing = false;
    spk_info("uplink started: pid %d, to %s", (int)pid, g->cfg->uplink_url);
}

static void on_restart(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop, (void)revents;
    spawn_uplink(t->data);
}

void spk_sup_uplink_init(sup *s)
{
    s->up.slot = -1;
    ev_timer_init(&s->up.restart, on_restart, 0, 0);
    s->up.restart.data = s;
}

void spk_sup_uplink_sync(sup *s)
{
    uproc *u = &s->up;
    const spk_config *cfg = s->cur != NULL ? s->cur->cfg : NULL;
    if (cfg == NULL || s->stopping)
        return;
    if (u->pid == 0) {
        ev_timer_stop(s->loop, &u->restart);
        if (cfg->uplink_url != NULL)
            spawn_uplink(s);
        return;
    }
    char now[sizeof(u->settings)];
    settings_of(cfg, now, sizeof(now));
    if (cfg->uplink_url == NULL) {
        spk_info("uplink: section removed from the config; stopping the uplink");
        kill(u->pid, SIGTERM);
    } else if (strcmp(now, u->settings) != 0) {
        spk_info("uplink: settings changed; replacing the uplink");
        u->replacing = true;
        kill(u->pid, SIGTERM);
    } else {
        publish_plugins(s);
    }
}

bool spk_sup_uplink_exited(sup *s, pid_t pid, int status)
{
    uproc *u = &s->up;
    if (u->pid == 0 || pid != u->pid)
        return false;
    spk_wslot *sl = uslot(s);
    char what[160];
    if (WIFEXITED(status) && WEXITSTATUS(status) == SPK_EXIT_START && sl != NULL)
        snprintf(what, sizeof(what), "could not start: %.140s", sl->reason);
    else if (WIFEXITED(status))
        snprintf(what, sizeof(what), "exited with status %d", WEXITSTATUS(status));
    else
        snprintf(what, sizeof(what), "killed by signal %d", WTERMSIG(status));
    snprintf(u->last_exit, sizeof(u->last_exit), "%s", what);
    if (sl != NULL)
        add_counters(&u->gone, &sl->uplink);
    spk_sup_slot_free(s, u->slot);
    u->slot = -1;
    u->pid = 0;
    bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (s->stopping) {
        spk_info("uplink stopped (%s)", what);
        return true;
    }
    const spk_config *cfg = s->cur != NULL ? s->cur->cfg : NULL;
    if (cfg == NULL || cfg->uplink_url == NULL) {
        spk_info("uplink stopped (%s)", what);
        return true;
    }
    if (u->replacing) {
        spawn_uplink(s);
        return true;
    }
    double delay = spk_sup_restart_delay(s, &u->backoff);
    u->restarts++;
    spk_log(clean ? SPOKE_LOG_WARN : SPOKE_LOG_ERROR,
            "uplink (pid %d) %s; restarting it in %.0f ms", (int)pid, what, delay * 1000.0);
    ev_timer_set(&u->restart, delay, 0);
    ev_timer_start(s->loop, &u->restart);
    return true;
}

void spk_sup_uplink_stop(sup *s, int sig)
{
    uproc *u = &s->up;
    ev_timer_stop(s->loop, &u->restart);
    if (u->pid != 0 && (!u->stop_sent || sig == SIGKILL || sig == SIGQUIT))
        kill(u->pid, sig);
    u->stop_sent = true;
}

bool spk_sup_uplink_live(const sup *s)
{
    return s->up.pid != 0;
}

void spk_sup_uplink_sample(sup *s)
{
    uproc *u = &s->up;
    spk_wslot *sl = uslot(s);
    if (u->pid == 0 || sl == NULL)
        return;
    uint64_t hb = atomic_load_explicit(&sl->act.heartbeat_ms, memory_order_relaxed);
    uint64_t now = spk_mono_ms();
    if (now > hb && (double)(now - hb) / 1000.0 > UPLINK_STUCK_S) {
        spk_error("uplink (pid %d): no heartbeat for %.0f s; killing it", (int)u->pid,
                  (double)(now - hb) / 1000.0);
        atomic_store(&sl->act.heartbeat_ms, now); /* once */
        kill(u->pid, SIGKILL);
    }
}
