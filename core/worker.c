/*
 * worker.c -- see worker.h.
 */
#include "worker.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "host.h"
#include "loader.h"
#include "log.h"
#include "policy.h"
#include "proxy.h"
#include "queue.h"
#include "queue_conf.h"

typedef struct worker {
    struct ev_loop *loop;
    spk_config *cfg;
    const spk_worker_opts *opts;
    spk_plugin_set set;
    spk_chain chain;
    spk_host_env env;
    spk_proxy *proxy;
    spk_slot *slot;    /* the status slot's act, or private_slot unsupervised */
    spk_slot private_slot;
    spk_queue_counters private_qc;
    spk_proxy_counters pub; /* the proxy's totals, into the status slot */
    ev_signal sig_term, sig_int, sig_quit, sig_go;
    ev_timer tick, heartbeat, health, drain_check, drain_deadline;
    ev_timer qsync;    /* --single-process: the supervisor's queue timer */
    double qlast;      /* ... and when it last synced (ev_now) */
    ev_timer kvsync;   /* kv.sync: flush the KV store (opened without a flush per commit) */
    unsigned *health_fails;
    bool draining;
    int result;
} worker;

static void on_tick(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    worker *wk = w->data;
    spk_chain_tick(&wk->chain);
}

/* Every 100 ms: prove the loop turns, and publish the connection counts. */
static void on_heartbeat(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    worker *wk = w->data;
    spk_wslot *sl = wk->opts->wslot;
    atomic_store_explicit(&sl->act.heartbeat_ms, spk_mono_ms(), memory_order_relaxed);
    atomic_store_explicit(&sl->conns_active, spk_proxy_active(wk->proxy), memory_order_relaxed);
    atomic_store_explicit(&sl->conns_total, spk_proxy_accepted(wk->proxy), memory_order_relaxed);
}

static void stop_now(worker *wk)
{
    spk_proxy_close_all(wk->proxy);
    ev_break(wk->loop, EVBREAK_ALL);
}

static void on_health(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    worker *wk = w->data;
    size_t failed = spk_host_health_round(&wk->set, wk->slot, wk->health_fails,
                                          wk->cfg->health_fail_limit);
    if (failed != 0) {
        if (wk->opts->wslot != NULL)
            atomic_store(&wk->opts->wslot->health_failed, (uint32_t)failed);
        wk->result = SPK_EBUSY;
        stop_now(wk);
    }
}

static void on_drain_check(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    worker *wk = w->data;
    if (spk_proxy_active(wk->proxy) == 0)
        stop_now(wk);
}

static void on_drain_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    worker *wk = w->data;
    spk_warn("drain_timeout reached with %zu connections open; closing them",
             spk_proxy_active(wk->proxy));
    stop_now(wk);
}

static void on_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)revents;
    worker *wk = w->data;
    if (w->signum == SIGUSR1) {
        spk_proxy_start_accepting(wk->proxy);
        return;
    }
    if (w->signum == SIGQUIT) {
        spk_info("SIGQUIT: stopping now");
        stop_now(wk);
        return;
    }
    if (wk->draining)
        return;
    wk->draining = true;
    if (wk->opts->wslot != NULL)
        atomic_store(&wk->opts->wslot->state, SPK_W_DRAINING);
    spk_info("%s: no longer accepting; draining %zu connections (at most %llu ms)",
             sigabbrev_np(w->signum), spk_proxy_active(wk->proxy),
             (unsigned long long)wk->cfg->drain_timeout_ms);
    spk_proxy_stop_accepting(wk->proxy);
    ev_timer_init(&wk->drain_check, on_drain_check, 0, 0.05);
    wk->drain_check.data = wk;
    ev_timer_again(loop, &wk->drain_check);
    ev_timer_init(&wk->drain_deadline, on_drain_deadline,
                  (double)wk->cfg->drain_timeout_ms / 1000.0, 0);
    wk->drain_deadline.data = wk;
    ev_timer_start(loop, &wk->drain_deadline);
}

static void watch_signal(worker *wk, ev_signal *s, int signum)
{
    ev_signal_init(s, on_signal, signum);
    s->data = wk;
    ev_signal_start(wk->loop, s);
}

/* --single-process has no supervisor: the worker owns the queue's sync timer itself and
 * follows the queue's one policy (spk_queue_sync_due, with its backoff), as the
 * supervisor does. */
static void on_qsync(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    worker *wk = w->data;
    spk_queue_conf_sync_tick(wk->env.queue, ev_now(loop), &wk->qlast);
}

/* The edge's KV store commits without flushing (many small writes from traffic hooks);
 * every worker flushes it on this period, so a power loss costs at most one period. */
static void on_kvsync(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    worker *wk = w->data;
    spk_errbuf eb;
    if (spk_host_kv_sync(&wk->env, &eb) != 0)
        spk_error("kv: %s", eb.msg);
}

static void start_timer(worker *wk, ev_timer *t, void (*cb)(struct ev_loop *, ev_timer *, int),
                        uint64_t ms)
{
    ev_timer_init(t, cb, (double)ms / 1000.0, (double)ms / 1000.0);
    t->data = wk;
    ev_timer_start(wk->loop, t);
}

/* listen.max_open_files: the worker's RLIMIT_NOFILE, before plugins load (they run under
 * it too). The hard limit is raised only when asked for more than it (root only). */
static int set_open_files(const spk_config *cfg, spk_errbuf *eb)
{
    struct rlimit rl;
    if (cfg->max_open_files == 0 || getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 0;
    rl.rlim_cur = (rlim_t)cfg->max_open_files;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < rl.rlim_cur)
        rl.rlim_max = rl.rlim_cur;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        return spk_errf(eb, SPK_EINVAL, "listen.max_open_files %zu: %s (raising the hard limit "
                        "needs root)", cfg->max_open_files, strerror(errno));
    return 0;
}

static int start(worker *wk, spk_errbuf *eb)
{
    const spk_worker_opts *opts = wk->opts;
    spk_config *cfg = wk->cfg;
    int rc0 = set_open_files(cfg, eb);
    if (rc0 != 0)
        return rc0;
    spk_host_env_init(&wk->env, wk->loop, cfg, SPOKE_ROLE_EDGE);
    wk->slot = opts->wslot ? &opts->wslot->act : &wk->private_slot;
    int rc = spk_plugin_set_load(cfg, spk_host_table(), &wk->env, wk->slot, opts->quarantine,
                                 opts->n_quarantine, &wk->set, eb);
    if (rc != 0)
        return rc;
    if (opts->wslot != NULL)
        spk_plugin_set_publish(&wk->set, opts->wslot);
    spk_plugin_set_stats(&wk->set, opts->wslot ? &opts->wslot->hooks : NULL,
                         cfg->metrics_hook_sample);
    wk->env.pm = opts->wslot ? &opts->wslot->pm : NULL;
    /* The queue opens before init, so plugins may send from init. A worker that cannot
     * open it still serves: send_to_control answers QUEUE_UNAVAILABLE and retries. */
    wk->env.qc = opts->wslot ? &opts->wslot->queue : &wk->private_qc;
    spk_errbuf qeb;
    if (spk_host_queue_open(&wk->env, &qeb) != 0)
        spk_warn("send_to_control unavailable: %s; plugins get QUEUE_UNAVAILABLE until it "
                 "opens (retried every few seconds)", qeb.msg);
    /* The KV store too, for the same reason; without it plugins get KV_UNAVAILABLE (the
     * open is retried every few seconds) and traffic flows. */
    if (spk_host_kv_open(&wk->env, &qeb) != 0)
        spk_warn("KV services unavailable: %s; plugins get KV_UNAVAILABLE until it opens "
                 "(retried every few seconds)", qeb.msg);
    /* The policies' Lua state, before init: a plugin may signal from init. */
    rc = spk_policy_new(cfg, &wk->env, opts->wslot ? &opts->wslot->policy : NULL,
                        &wk->env.policy, eb);
    if (rc != 0)
        return rc;
    wk->health_fails = calloc(wk->set.n ? wk->set.n : 1, sizeof(unsigned));
    if (wk->health_fails == NULL)
        return spk_errf(eb, SPK_ENOMEM, "out of memory");
    rc = spk_plugin_set_init(&wk->set, SPOKE_ROLE_EDGE, eb);
    if (rc != 0)
        return rc;
    rc = spk_chain_build(&wk->chain, &wk->set);
    if (rc != 0)
        return spk_errf(eb, rc, "out of memory building the plugin chain");
    spk_chain_set_slot(&wk->chain, wk->slot);
    wk->chain.policy = wk->env.policy;
    return spk_proxy_new(wk->loop, cfg, opts->listen_fds, opts->n_listen, &wk->chain,
                         &wk->proxy, eb);
}

int spk_worker_run(spk_config *cfg, const spk_worker_opts *opts, spk_errbuf *eb)
{
    worker wk;
    memset(&wk, 0, sizeof(wk));
    wk.cfg = cfg;
    wk.opts = opts;
    wk.loop = ev_default_loop(EVFLAG_AUTO);
    if (wk.loop == NULL)
        return spk_errf(eb, SPK_EIO, "cannot create the event loop");
    int rc = start(&wk, eb);
    if (rc != 0)
        goto out;

    for (size_t i = 0; i < wk.set.n; i++)
        spk_info("plugin %s %s loaded from %s%s", wk.set.v[i]->name, wk.set.v[i]->table.version,
                 wk.set.v[i]->path,
                 wk.set.v[i]->conf && wk.set.v[i]->conf->autoloaded ? " (autoload)" : "");
    start_timer(&wk, &wk.tick, on_tick, cfg->tick_ms);
    start_timer(&wk, &wk.health, on_health, cfg->health_check_period_ms);
    start_timer(&wk, &wk.kvsync, on_kvsync, cfg->kv_sync_ms);
    watch_signal(&wk, &wk.sig_term, SIGTERM);
    watch_signal(&wk, &wk.sig_int, SIGINT);
    watch_signal(&wk, &wk.sig_quit, SIGQUIT);
    if (opts->wslot != NULL) {
        wk.pub = (spk_proxy_counters){&opts->wslot->conns_total, &opts->wslot->bytes_from_client,
                                      &opts->wslot->bytes_from_server};
        spk_proxy_publish(wk.proxy, &wk.pub);
        watch_signal(&wk, &wk.sig_go, SIGUSR1);
        start_timer(&wk, &wk.heartbeat, on_heartbeat, 100);
        on_heartbeat(wk.loop, &wk.heartbeat, 0);
        atomic_store_explicit(&opts->wslot->state, SPK_W_READY, memory_order_release);
    } else {
        wk.qlast = ev_now(wk.loop);
        start_timer(&wk, &wk.qsync, on_qsync, SPK_QUEUE_SYNC_POLL_MS);
        spk_proxy_start_accepting(wk.proxy);
    }
    spk_info("serving %s -> %s with %zu plugins", cfg->n_listen ? cfg->listen[0] : "?",
             cfg->upstream, wk.set.n);

    ev_run(wk.loop, 0);
    rc = wk.result;

    ev_timer_stop(wk.loop, &wk.tick);
    ev_timer_stop(wk.loop, &wk.qsync);
    ev_timer_stop(wk.loop, &wk.kvsync);
    ev_timer_stop(wk.loop, &wk.heartbeat);
    ev_timer_stop(wk.loop, &wk.health);
    ev_timer_stop(wk.loop, &wk.drain_check);
    ev_timer_stop(wk.loop, &wk.drain_deadline);
    ev_signal_stop(wk.loop, &wk.sig_term);
    ev_signal_stop(wk.loop, &wk.sig_int);
    ev_signal_stop(wk.loop, &wk.sig_quit);
    ev_signal_stop(wk.loop, &wk.sig_go);
out:
    spk_proxy_free(wk.proxy);
    spk_chain_free(&wk.chain);
    spk_host_unload(&wk.set); /* fini may still send */
    spk_policy_free(wk.env.policy); /* after fini, which may still signal */
    wk.env.policy = NULL;
    if (opts->wslot == NULL && wk.env.queue != NULL)
        spk_queue_sync(wk.env.queue, NULL);
    spk_queue_close(wk.env.queue);
    wk.env.queue = NULL;
    spk_host_kv_close(&wk.env); /* after fini, which may still write; flushes first */
    spk_host_env_fini(&wk.env);
    free(wk.health_fails);
    return rc;
}
