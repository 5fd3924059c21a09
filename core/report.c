/*
 * report.c -- what the supervisor tells operators: the status report on the admin socket
 * (run_dir/spoked.sock, read by `spoked status`) and the host's own figures for
 * /metrics (spk_sup_host_metrics; sup_metrics.c serves them, with the hook stats, the
 * plugins' metrics and the merger's).
 *
 * Both are built from the supervisor's own state (generations, restarts, reloads, crash
 * records) and from the workers' status slots (state, connections, plugins, the
 * send_to_control counters), which are read without locks, into a growing buffer. The
 * admin socket's connections are admin.c's, which writes the report without blocking;
 * /metrics is sup_metrics.c's (metrics_http.c serves it without blocking).
 * The queue figures come from the supervisor's own queue handle (supervisor.c, queue
 * sync); counters of exited workers are kept in the supervisor so totals never go back.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "queue.h"
#include "grpc.h"
#include "hub.h"
#include "kv.h"
#include "kv_conf.h"
#include "metrics.h"
#include "spoke/control/v1/control.pb-c.h"
#include "supervisor_int.h"

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
        spk_wslot *sl = spk_sup_wslot(w);
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
        const spk_wslot *sl = spk_sup_wslot(&s->cur->w[i]);
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
    const spk_config *cfg = spk_sup_cfg(s);
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

/* The policy engines of the live workers (docs/policies.md): what they matched, and the
 * policies that failed, by kind. A worker that exits takes its counts with it. */
static void report_policies(sup *s, outbuf *o)
{
    const spk_config *cfg = spk_sup_cfg(s);
    if (cfg == NULL || cfg->n_policies == 0)
        return;
    uint64_t t[5] = {0};
    for (int i = 0; i < SPK_STATUS_SLOTS; i++) {
        if (!s->slot_used[i])
            continue;
        const spk_policy_counters *pc = &s->st->slots[i].policy;
        t[0] += atomic_load_explicit(&pc->matched, memory_order_relaxed);
        t[1] += atomic_load_explicit(&pc->errors, memory_order_relaxed);
        t[2] += atomic_load_explicit(&pc->timeouts, memory_order_relaxed);
        t[3] += atomic_load_explicit(&pc->memory, memory_order_relaxed);
        t[4] += atomic_load_explicit(&pc->action_failed, memory_order_relaxed);
    }
    out(o, "policies: %zu  matched %llu  failed: errors %llu  timeouts %llu  out of memory "
           "%llu  actions %llu\n", cfg->n_policies, (unsigned long long)t[0],
        (unsigned long long)t[1], (unsigned long long)t[2], (unsigned long long)t[3],
        (unsigned long long)t[4]);
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

#define UPLINK_COUNTERS(X)                                                                 \
    X(batches_ok, "batches delivered", "spoke_uplink_batches_total{result=\"ok\"}")            \
    X(batches_failed, "failed (retried)", "spoke_uplink_batches_total{result=\"failed\"}")      \
    X(acked, "payloads accepted", "spoke_uplink_payloads_total{outcome=\"accepted\"}")          \
    X(duplicates, "duplicates", "spoke_uplink_payloads_total{outcome=\"duplicate\"}")          \
    X(refused, "refused", "spoke_uplink_payloads_total{outcome=\"refused\"}")                  \
    X(no_receiver, "no receiver", "spoke_uplink_payloads_total{outcome=\"no_receiver\"}")      \
    X(damaged, "damaged", "spoke_uplink_payloads_total{outcome=\"damaged\"}")

static void report_uplink(sup *s, outbuf *o)
{
    const spk_config *cfg = spk_sup_cfg(s);
    if (cfg == NULL || cfg->uplink_url == NULL)
        return;
    const uproc *u = &s->up;
    if (u->pid != 0)
        out(o, "uplink: pid %d  %s  up %.1f s  restarts %u  to %s\n", (int)u->pid,
            state_name(atomic_load(&s->st->slots[u->slot].state)), ev_now(s->loop) - u->started,
            u->restarts, cfg->uplink_url);
    else
        out(o, "uplink: down  restarts %u%s%s  to %s\n", u->restarts,
            u->last_exit[0] ? "  last: " : "", u->last_exit, cfg->uplink_url);
    spk_uplink_counters t;
    spk_sup_uplink_totals(s, &t);
    out(o, " ");
#define X(f, label, metric) out(o, " %s %llu", label, (unsigned long long)atomic_load(&t.f));
    UPLINK_COUNTERS(X)
#undef X
    uint64_t last = atomic_load(&t.last_ok_ms);
    out(o, "\n  last delivery: %s", last ? "" : "never");
    if (last)
        out(o, "%.1f s ago (round trip %.1f ms)", ev_now(s->loop) - (double)last / 1000.0,
            (double)atomic_load(&t.last_rtt_us) / 1000.0);
    out(o, "  last status %s  plugins waiting for a receiver %u\n",
        spk_grpc_code_name((int)atomic_load(&t.last_status)), atomic_load(&t.parked));
}

static void metrics_uplink(sup *s, outbuf *o)
{
    const spk_config *cfg = spk_sup_cfg(s);
    if (cfg == NULL || cfg->uplink_url == NULL)
        return;
    spk_uplink_counters t;
    spk_sup_uplink_totals(s, &t);
    out(o, "# TYPE spoke_uplink_up gauge\nspoke_uplink_up %d\n", s->up.pid != 0);
    out(o, "# TYPE spoke_uplink_restarts_total counter\nspoke_uplink_restarts_total %u\n",
        s->up.restarts);
    /* One family at a time: its TYPE line, then its samples (both formats require it). */
    static const char *const families[] = {"spoke_uplink_batches_total",
                                           "spoke_uplink_payloads_total"};
    for (size_t k = 0; k < sizeof(families) / sizeof(families[0]); k++) {
        out(o, "# TYPE %s counter\n", families[k]);
        size_t fl = strlen(families[k]);
#define X(f, label, metric)                                                                \
    if (strncmp(metric, families[k], fl) == 0 && metric[fl] == '{')                        \
        out(o, "%s %llu\n", metric, (unsigned long long)atomic_load(&t.f));
        UPLINK_COUNTERS(X)
#undef X
    }
    out(o, "# TYPE spoke_uplink_last_success_timestamp_seconds gauge\n"
           "spoke_uplink_last_success_timestamp_seconds %.3f\n",
        (double)atomic_load(&t.last_ok_ms) / 1000.0);
    out(o, "# TYPE spoke_uplink_rtt_seconds gauge\nspoke_uplink_rtt_seconds %.6f\n",
        (double)atomic_load(&t.last_rtt_us) / 1e6);
    out(o, "# TYPE spoke_uplink_parked_plugins gauge\nspoke_uplink_parked_plugins %u\n",
        atomic_load(&t.parked));
}

/* hubd: the workers' counters and the edges the store remembers (read-only). */
static void hub_counters(sup *s, spk_hub_counters *t)
{
    memset(t, 0, sizeof(*t));
    spk_hub_counters_add(t, &s->hub_gone);
    for (int i = 0; i < SPK_STATUS_SLOTS; i++)
        if (s->slot_used[i])
            spk_hub_counters_add(t, &s->st->slots[i].hub);
}

typedef struct edge_walk {
    outbuf *o;
    int64_t now_ms;
    size_t n;
} edge_walk;

static int report_edge(void *arg, const void *key, size_t klen, const void *val, size_t vlen)
{
    edge_walk *w = arg;
    spk_hub_edge_rec r;
    if (vlen < sizeof(r))
        return 0;
    memcpy(&r, val, sizeof(r));
    w->n++;
    const char *id = (const char *)key + 5; /* "edge/" */
    int idlen = (int)klen - 5;
    Spoke__Control__V1__HeartbeatRequest *hb =
        vlen > sizeof(r) ? spoke__control__v1__heartbeat_request__unpack(
                               NULL, vlen - sizeof(r), (const uint8_t *)val + sizeof(r))
                         : NULL;
    out(w->o, "  %.*s  namespace %s  spoke %s  last heartbeat %s", idlen, id,
        hb ? hb->edge_namespace : "?", hb ? hb->spoke_version : "?",
        r.last_heartbeat_ms ? "" : "never");
    if (r.last_heartbeat_ms)
        out(w->o, "%.1f s ago", (double)(w->now_ms - r.last_heartbeat_ms) / 1000.0);
    if (hb)
        out(w->o, "  queue %llu (oldest %.1f s)", (unsigned long long)hb->queue_depth,
            (double)hb->queue_oldest_age_ms / 1000.0);
    out(w->o, "\n    batches %llu  delivered %llu  duplicates %llu  no receiver %llu  "
              "refused %llu\n",
        (unsigned long long)r.batches, (unsigned long long)r.payloads,
        (unsigned long long)r.duplicates, (unsigned long long)r.no_receiver,
        (unsigned long long)r.refused);
    for (size_t i = 0; hb && i < hb->n_plugins; i++)
        out(w->o, "    plugin %-20s id %-6u %-10s %s\n", hb->plugins[i]->name, hb->plugins[i]->id,
            hb->plugins[i]->version,
            hb->plugins[i]->state == SPOKE__CONTROL__V1__PLUGIN_STATUS__STATE__QUARANTINED
                ? "quarantined"
                : "active");
    if (hb)
        spoke__control__v1__heartbeat_request__free_unpacked(hb, NULL);
    return 0;
}

/* Walk the registry of edges in the hub's store (a read transaction of its own; the
 * supervisor opens the store only for this). Returns 0, or the store's error in eb. */
static int scan_edges(sup *s, spk_kv_scan_cb cb, void *arg, spk_errbuf *eb)
{
    spk_kv *kv = NULL;
    spk_kv_txn *txn = NULL;
    int rc = spk_kv_conf_open(spk_sup_cfg(s), SPOKE_ROLE_CONTROL, &kv, eb);
    if (rc == 0)
        rc = spk_kv_begin(kv, NULL, false, &txn, eb);
    if (rc == 0)
        rc = spk_kv_scan(txn, 0, "edge/", 5, NULL, 0, 0, cb, arg, NULL, NULL, eb);
    if (txn != NULL)
        spk_kv_abort(txn);
    spk_kv_close(kv);
    return rc;
}

static void report_hub(sup *s, outbuf *o)
{
    spk_hub_counters t;
    hub_counters(s, &t);
    out(o, "hub: batches %llu  delivered %llu  duplicates %llu  no receiver %llu  refused %llu  "
           "plugin errors %llu  auth failures %llu\n",
        (unsigned long long)atomic_load(&t.batches), (unsigned long long)atomic_load(&t.accepted),
        (unsigned long long)atomic_load(&t.duplicates),
        (unsigned long long)atomic_load(&t.no_receiver),
        (unsigned long long)atomic_load(&t.refused),
        (unsigned long long)atomic_load(&t.plugin_errors),
        (unsigned long long)atomic_load(&t.auth_failures));
    edge_walk w = {.o = o, .now_ms = (int64_t)(ev_now(s->loop) * 1000.0)};
    spk_errbuf eb;
    out(o, "edges:\n");
    if (scan_edges(s, report_edge, &w, &eb) != 0)
        out(o, "  store %s unavailable: %s\n", spk_sup_cfg(s)->hub_store, eb.msg);
    else if (w.n == 0)
        out(o, "  (none yet)\n");
}

static int count_edge(void *arg, const void *key, size_t klen, const void *val, size_t vlen)
{
    (void)key, (void)klen, (void)val, (void)vlen;
    (*(uint64_t *)arg)++;
    return 0;
}

static void metrics_hub(sup *s, outbuf *o)
{
    spk_hub_counters t;
    hub_counters(s, &t);
    out(o, "# HELP spoke_hub_batches_total SendPluginControlBatch calls committed.\n"
           "# TYPE spoke_hub_batches_total counter\nspoke_hub_batches_total %llu\n",
        (unsigned long long)atomic_load(&t.batches));
    out(o, "# HELP spoke_hub_payloads_total Payloads by what hubd answered.\n"
           "# TYPE spoke_hub_payloads_total counter\n"
           "spoke_hub_payloads_total{outcome=\"accepted\"} %llu\n"
           "spoke_hub_payloads_total{outcome=\"duplicate\"} %llu\n"
           "spoke_hub_payloads_total{outcome=\"no_receiver\"} %llu\n"
           "spoke_hub_payloads_total{outcome=\"refused\"} %llu\n",
        (unsigned long long)atomic_load(&t.accepted),
        (unsigned long long)atomic_load(&t.duplicates),
        (unsigned long long)atomic_load(&t.no_receiver),
        (unsigned long long)atomic_load(&t.refused));
    out(o, "# HELP spoke_hub_plugin_payloads_total Payloads by plugin ID and outcome "
           "(error: accept_edge_payload failed).\n"
           "# TYPE spoke_hub_plugin_payloads_total counter\n");
    uint32_t np = atomic_load(&t.by_plugin.n);
    for (uint32_t i = 0; i < np && i < SPK_HUB_PLUGIN_IDS; i++) {
        char id[16];
        if (t.by_plugin.e[i].id == SPK_HUB_OTHER_ID)
            snprintf(id, sizeof(id), "other");
        else
            snprintf(id, sizeof(id), "%u", t.by_plugin.e[i].id);
        for (int k = 0; k < SPK_HO_N; k++)
            out(o, "spoke_hub_plugin_payloads_total{plugin_id=\"%s\",outcome=\"%s\"} %llu\n", id,
                spk_hub_outcome_name(k), (unsigned long long)atomic_load(&t.by_plugin.e[i].v[k]));
    }
    out(o, "# TYPE spoke_hub_plugin_errors_total counter\nspoke_hub_plugin_errors_total %llu\n",
        (unsigned long long)atomic_load(&t.plugin_errors));
    out(o, "# TYPE spoke_hub_auth_failures_total counter\nspoke_hub_auth_failures_total %llu\n",
        (unsigned long long)atomic_load(&t.auth_failures));
    uint64_t edges = 0;
    if (scan_edges(s, count_edge, &edges, NULL) == 0)
        out(o, "# HELP spoke_hub_edges Edges the hub has heard from (its registry).\n"
               "# TYPE spoke_hub_edges gauge\nspoke_hub_edges %llu\n",
            (unsigned long long)edges);
}

static void build_report(sup *s, outbuf *o)
{
    ev_tstamp now = ev_now(s->loop);
    out(o, "%s %s  pid %d  up %.0f s  config %s\n", s->prog, SPOKE_VERSION, (int)s->pid,
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
        const crash_rec *c = spk_sup_crash_find(s, sl->plugins[i].key, "", false);
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
    if (s->role == SPOKE_ROLE_CONTROL) {
        report_hub(s, o);
        return;
    }
    report_queue(s, o);
    report_policies(s, o);
    report_uplink(s, o);
}

/* HELP text of the host's families that build_metrics writes without one (the list
 * docs/operations.md repeats). */
static const struct {
    const char *name, *help;
} metric_help[] = {
    {"spoke_generation", "The serving generation (config snapshot) number."},
    {"spoke_worker_restarts_total", "Worker processes restarted after they ended."},
    {"spoke_reloads_total", "Reloads (SIGHUP), by result."},
    {"spoke_hook_timeouts_total", "Hook calls that ran past plugins.hook_timeout, all plugins."},
    {"spoke_quarantines_total", "Plugins quarantined (crash_limit crashes within crash_window)."},
    {"spoke_connections_active", "Client connections open now (hubd: gRPC connections)."},
    {"spoke_plugin_crashes_total", "Worker crashes blamed on each plugin."},
    {"spoke_plugin_quarantined", "1 while the plugin is quarantined."},
    {"spoke_queue_available", "1 when the queue is open in the supervisor and every worker."},
    {"spoke_queue_pending", "Payloads waiting to be sent."},
    {"spoke_queue_pending_bytes", "Bytes of the payloads waiting to be sent."},
    {"spoke_queue_oldest_age_seconds", "Age of the oldest waiting payload."},
    {"spoke_queue_expired_total", "Payloads removed unsent after queue.retention."},
    {"spoke_queue_acked_total", "Payloads the hub acknowledged (deleted)."},
    {"spoke_queue_damaged_total", "Stored records that failed their checksum."},
    {"spoke_queue_journal_used_bytes", "Bytes of the journal in use."},
    {"spoke_queue_journal_size_bytes", "Size of the journal (queue.journal_size)."},
    {"spoke_queue_plugin_pending", "Payloads waiting, by plugin ID."},
    {"spoke_queue_sent_total", "Payloads send_to_control accepted."},
    {"spoke_queue_refused_total", "Payloads send_to_control refused, by reason."},
    {"spoke_queue_syncs_total", "Queue syncs (journal to LMDB) the supervisor ran."},
    {"spoke_queue_sync_errors_total", "Queue syncs that failed."},
    {"spoke_uplink_up", "1 while the uplink process runs."},
    {"spoke_uplink_restarts_total", "Uplink processes restarted."},
    {"spoke_uplink_batches_total", "Batch calls to the hub, by result (failed ones are retried)."},
    {"spoke_uplink_payloads_total", "Payloads sent, by what the hub answered."},
    {"spoke_uplink_last_success_timestamp_seconds", "Unix time of the last batch answered OK (0: none)."},
    {"spoke_uplink_rtt_seconds", "Round trip of the last batch call."},
    {"spoke_uplink_parked_plugins", "Plugins whose payloads wait for a receiver on the hub."},
    {"spoke_hub_plugin_errors_total", "accept_edge_payload calls that returned an error."},
    {"spoke_hub_auth_failures_total", "Calls refused as unauthenticated or not permitted."},
};

char *spk_sup_status_text(sup *s, size_t *len)
{
    outbuf o = {0};
    build_report(s, &o);
    *len = o.len;
    return o.p;
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
    out(o, "# TYPE spoke_quarantines_total counter\nspoke_quarantines_total %llu\n",
        (unsigned long long)s->quarantines_total);
    uint64_t active = 0, total = s->conns_gone;
    uint64_t bytes[2] = {s->bytes_gone[0], s->bytes_gone[1]};
    for (int i = 0; i < SPK_STATUS_SLOTS; i++) {
        if (!s->slot_used[i])
            continue;
        active += atomic_load(&s->st->slots[i].conns_active);
        total += atomic_load(&s->st->slots[i].conns_total);
        bytes[0] += atomic_load(&s->st->slots[i].bytes_from_server);
        bytes[1] += atomic_load(&s->st->slots[i].bytes_from_client);
    }
    out(o, "# TYPE spoke_connections_active gauge\nspoke_connections_active %llu\n",
        (unsigned long long)active);
    if (s->role == SPOKE_ROLE_EDGE) {
        out(o, "# HELP spoke_connections_total Client connections accepted.\n"
               "# TYPE spoke_connections_total counter\nspoke_connections_total %llu\n",
            (unsigned long long)total);
        out(o, "# HELP spoke_bytes_total Bytes read, by where from.\n"
               "# TYPE spoke_bytes_total counter\n"
               "spoke_bytes_total{from=\"client\"} %llu\nspoke_bytes_total{from=\"server\"} %llu\n",
            (unsigned long long)bytes[1], (unsigned long long)bytes[0]);
    }
    out(o, "# TYPE spoke_plugin_crashes_total counter\n");
    for (size_t i = 0; i < s->n_crashes; i++)
        out(o, "spoke_plugin_crashes_total{plugin=\"%s\"} %u\n", s->crashes[i].name,
            s->crashes[i].total);
    out(o, "# HELP spoke_plugin_slow_hooks_total Hook calls that ran past "
           "plugins.hook_timeout.\n# TYPE spoke_plugin_slow_hooks_total counter\n");
    for (size_t i = 0; i < s->n_crashes; i++)
        for (int h = 0; h < SPK_HOOK_COUNT; h++)
            if (s->crashes[i].slow_by_hook[h] > 0)
                out(o, "spoke_plugin_slow_hooks_total{plugin=\"%s\",hook=\"%s\"} %u\n",
                    s->crashes[i].name, spk_hook_name((enum spk_hook_id)h),
                    s->crashes[i].slow_by_hook[h]);
    out(o, "# TYPE spoke_plugin_quarantined gauge\n");
    for (size_t i = 0; i < s->n_crashes; i++)
        out(o, "spoke_plugin_quarantined{plugin=\"%s\"} %d\n", s->crashes[i].name,
            s->crashes[i].quarantined ? 1 : 0);
    if (s->role == SPOKE_ROLE_EDGE) {
        metrics_queue(s, o);
        metrics_uplink(s, o);
    } else {
        metrics_hub(s, o);
    }
}

/* Copy text to out, with a HELP line (metric_help) before each TYPE line lacking one. */
static void add_help(const char *text, size_t len, spk_mbuf *out)
{
    const char *end = text + len, *prev = NULL;
    for (const char *l = text; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l));
        const char *next = nl ? nl + 1 : end;
        if (strncmp(l, "# TYPE ", 7) == 0 && (prev == NULL || strncmp(prev, "# HELP ", 7) != 0)) {
            size_t n = strcspn(l + 7, " \n");
            for (size_t i = 0; i < sizeof(metric_help) / sizeof(metric_help[0]); i++)
                if (strlen(metric_help[i].name) == n && strncmp(metric_help[i].name, l + 7, n) == 0)
                    spk_mbuf_printf(out, "# HELP %s %s\n", metric_help[i].name,
                                    metric_help[i].help);
        }
        spk_mbuf_add(out, l, (size_t)(next - l));
        prev = l;
        l = next;
    }
}

void spk_sup_host_metrics(sup *s, spk_mbuf *out)
{
    outbuf o = {0};
    build_metrics(s, &o);
    if (o.p == NULL)
        out->failed = true;
    else
        add_help(o.p, o.len, out);
    free(o.p);
}
