/*
 * worker.c -- see worker.h.
 */
#include "worker.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "host.h"
#include "loader.h"
#include "log.h"
#include "proxy.h"

typedef struct worker {
    struct ev_loop *loop;
    spk_config *cfg;
    spk_plugin_set set;
    spk_chain chain;
    spk_host_env env;
    spk_proxy *proxy;
    ev_signal sig_term, sig_int, sig_quit;
    ev_timer tick, drain_check, drain_deadline;
    bool draining;
} worker;

static void on_tick(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    worker *wk = w->data;
    spk_chain_tick(&wk->chain);
}

static void stop_now(worker *wk)
{
    spk_proxy_close_all(wk->proxy);
    ev_break(wk->loop, EVBREAK_ALL);
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
    if (w->signum == SIGQUIT) {
        spk_info("SIGQUIT: stopping now");
        stop_now(wk);
        return;
    }
    if (wk->draining)
        return;
    wk->draining = true;
    spk_info("%s: no longer accepting; draining %zu connections (at most %llu ms)",
             strsignal(w->signum), spk_proxy_active(wk->proxy),
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

int spk_worker_run(spk_config *cfg, const spk_worker_opts *opts, spk_errbuf *eb)
{
    worker wk;
    memset(&wk, 0, sizeof(wk));
    wk.cfg = cfg;
    wk.loop = ev_default_loop(EVFLAG_AUTO);
    if (wk.loop == NULL)
        return spk_errf(eb, SPK_EIO, "cannot create the event loop");
    spk_host_env_init(&wk.env, wk.loop, cfg, SPOKE_ROLE_EDGE);

    int rc = spk_plugin_set_load(cfg, spk_host_table(), &wk.env, &wk.set, eb);
    if (rc != 0)
        return rc;
    rc = spk_plugin_set_init(&wk.set, SPOKE_ROLE_EDGE, eb);
    if (rc != 0)
        goto out_set;
    rc = spk_chain_build(&wk.chain, &wk.set);
    if (rc != 0) {
        spk_errf(eb, rc, "out of memory building the plugin chain");
        goto out_set;
    }
    spk_chain_set_slot(&wk.chain, opts->slot);
    wk.env.chain = &wk.chain;
    rc = spk_proxy_new(wk.loop, cfg, opts->listen_fds, opts->n_listen, &wk.chain, &wk.proxy, eb);
    if (rc != 0)
        goto out_chain;

    for (size_t i = 0; i < wk.set.n; i++)
        spk_info("plugin %s %s loaded from %s%s", wk.set.v[i]->name, wk.set.v[i]->table.version,
                 wk.set.v[i]->path, wk.set.v[i]->conf && wk.set.v[i]->conf->autoloaded ?
                 " (autoload)" : "");
    ev_timer_init(&wk.tick, on_tick, (double)cfg->tick_ms / 1000.0, (double)cfg->tick_ms / 1000.0);
    wk.tick.data = &wk;
    ev_timer_start(wk.loop, &wk.tick);
    watch_signal(&wk, &wk.sig_term, SIGTERM);
    watch_signal(&wk, &wk.sig_int, SIGINT);
    watch_signal(&wk, &wk.sig_quit, SIGQUIT);
    spk_info("serving %s -> %s with %zu plugins", cfg->n_listen ? cfg->listen[0] : "?",
             cfg->upstream, wk.set.n);

    ev_run(wk.loop, 0);

    ev_timer_stop(wk.loop, &wk.tick);
    ev_timer_stop(wk.loop, &wk.drain_check);
    ev_timer_stop(wk.loop, &wk.drain_deadline);
    ev_signal_stop(wk.loop, &wk.sig_term);
    ev_signal_stop(wk.loop, &wk.sig_int);
    ev_signal_stop(wk.loop, &wk.sig_quit);
    spk_proxy_free(wk.proxy);
out_chain:
    spk_chain_free(&wk.chain);
out_set:
    spk_plugin_set_free(&wk.set);
    return rc;
}
