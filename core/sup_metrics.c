/*
 * sup_metrics.c -- the supervisor's /metrics: the endpoint (metrics_http.h) on its loop,
 * the base that keeps exited workers' counters (metrics.h), and the merger of the plugins'
 * own sockets (metrics_merge.h).
 *
 * A scrape writes, in order: the host's figures (report.c: generations, restarts,
 * reloads, crashes, queue, uplink or hub), the hook stats and the plugins' registered
 * metrics (base + live slots), then what the merger holds. None of it waits on anything:
 * the slots are read without locks, the merger serves what its last scrape got.
 *
 * The merger's sources follow the config in force: a timer (SOURCES_PERIOD_S) compares
 * the serving config's plugins.list[].metrics_socket entries with the merger's and
 * updates them; metrics.merger: false leaves the merger without sources.
 */
#include <stdlib.h>
#include <string.h>

#include "loader.h"
#include "log.h"
#include "metrics_http.h"
#include "metrics_merge.h"
#include "supervisor_int.h"

#define SOURCES_PERIOD_S 1.0

/* The name the merger labels plugin pc's series with: its configured name, else the name
 * the serving workers published for its key, else its file name. */
static const char *source_name(sup *s, const spk_plugin_conf *pc)
{
    if (pc->name != NULL)
        return pc->name;
    char key[256];
    spk_plugin_key(pc, key, sizeof(key));
    for (int i = 0; i < SPK_STATUS_SLOTS; i++) {
        if (!s->slot_used[i])
            continue;
        const spk_wslot *sl = &s->st->slots[i];
        uint32_t n = atomic_load_explicit(&sl->n_plugins, memory_order_acquire);
        for (uint32_t k = 0; k < n && k < SPK_STATUS_PLUGINS; k++)
            if (strcmp(sl->plugins[k].key, key) == 0)
                return sl->plugins[k].name;
    }
    const char *slash = strrchr(pc->file, '/');
    return slash ? slash + 1 : pc->file;
}

static void sync_sources(sup *s)
{
    const spk_config *cfg = spk_sup_cfg(s);
    if (cfg == NULL || s->merger == NULL)
        return;
    const char **names = calloc(cfg->n_plugins + 1, sizeof(char *));
    const char **paths = calloc(cfg->n_plugins + 1, sizeof(char *));
    size_t n = 0;
    if (names != NULL && paths != NULL) {
        for (size_t i = 0; cfg->metrics_merger && i < cfg->n_plugins; i++) {
            const spk_plugin_conf *pc = &cfg->plugins[i];
            if (!pc->enabled || pc->metrics_socket == NULL)
                continue;
            names[n] = source_name(s, pc);
            paths[n] = pc->metrics_socket;
            n++;
        }
        if (spk_merger_set_sources(s->merger, names, paths, n, cfg->metrics_merge_period_ms) != 0)
            spk_warn("metrics merger: out of memory updating its sockets");
    }
    free(names);
    free(paths);
}

static void on_sources(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    sync_sources(t->data);
}

static void build(void *arg, spk_mbuf *out)
{
    sup *s = arg;
    spk_sup_host_metrics(s, out);
    spk_metrics_render(s->mbase, s->st->slots, s->slot_used, SPK_STATUS_SLOTS, out);
    spk_merger_render(s->merger, out);
}

int spk_sup_metrics_start(sup *s, spk_errbuf *eb)
{
    s->mbase = spk_metrics_base_new();
    s->merger = spk_merger_new(s->loop, 10000);
    if (s->mbase == NULL || s->merger == NULL)
        return spk_errf(eb, SPK_ENOMEM, "metrics: out of memory");
    ev_timer_init(&s->merge_sources, on_sources, 0, SOURCES_PERIOD_S);
    s->merge_sources.data = s;
    if (s->metrics_fd <= 0)
        return 0; /* no endpoint: the base still keeps the counters for a later reload */
    ev_timer_start(s->loop, &s->merge_sources);
    return spk_metrics_http_start(s->loop, s->metrics_fd, build, s, &s->mhttp, eb);
}

void spk_sup_metrics_stop(sup *s)
{
    ev_timer_stop(s->loop, &s->merge_sources);
    spk_metrics_http_stop(s->mhttp);
    s->mhttp = NULL;
    spk_merger_free(s->merger);
    s->merger = NULL;
    spk_metrics_base_free(s->mbase);
    s->mbase = NULL;
}

void spk_sup_metrics_fold(sup *s, int slot)
{
    const spk_wslot *sl = &s->st->slots[slot];
    spk_metrics_base_fold(s->mbase, sl);
    s->conns_gone += atomic_load_explicit(&sl->conns_total, memory_order_relaxed);
    s->bytes_gone[0] += atomic_load_explicit(&sl->bytes_from_server, memory_order_relaxed);
    s->bytes_gone[1] += atomic_load_explicit(&sl->bytes_from_client, memory_order_relaxed);
}
