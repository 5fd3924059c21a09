/*
 * cache-stats-aggregator -- the control half of the reference example: a control plugin
 * (hubd) with the same plugin ID as the edge plugin cache-stats, summing the hit and miss
 * counts every edge reports.
 *
 * For each payload of its own plugin ID whose metadata says metric_type = cache_stats, it
 * reads {"hits": H, "misses": M, ...} and adds them, in its KV namespace, to
 *
 *     edge/<edge ID>   that edge's sums: hits, misses, reports, last report time (binary)
 *     totals           {"edges": E, "hits": H, "misses": M, "hit_rate": R}   (JSON text)
 *
 * hubd runs it inside the batch's transaction, so the sums change exactly once per report
 * whatever crashes (docs/control-plane.md). Anything else -- another plugin's payload, or
 * one of its own without that metadata -- is not its own: it answers handled = 0, and hubd
 * offers it to the next control plugin. A report that does not parse is handled with an
 * error (logged by hubd with its edge and correlation ID; never redelivered).
 *
 * Read the totals with `hubd kv get -c hub.yaml <plugin ID> totals`.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spoke.h"

static const spoke_host *host;

typedef struct agg {
    spoke_ctx *ctx;
    uint32_t id;
} agg;

static agg state;

typedef struct edge_sums {
    uint64_t hits, misses, reports;
    int64_t last_report_ms;
} edge_sums;

typedef struct totals {
    uint64_t edges, hits, misses;
} totals;

static const char *meta(const spoke_edge_payload *p, const char *key)
{
    for (size_t i = 0; i < p->n_metadata; i++)
        if (strcmp(p->metadata[i].key, key) == 0)
            return p->metadata[i].value;
    return NULL;
}

/* The unsigned integer after "name": in a small flat JSON object; -1 when absent. */
static int json_uint(const uint8_t *text, size_t len, const char *name, uint64_t *out)
{
    char key[32];
    int kl = snprintf(key, sizeof(key), "\"%s\"", name);
    for (size_t i = 0; i + (size_t)kl <= len; i++) {
        if (memcmp(text + i, key, (size_t)kl) != 0)
            continue;
        size_t j = i + (size_t)kl;
        while (j < len && (text[j] == ' ' || text[j] == ':'))
            j++;
        if (j >= len || text[j] < '0' || text[j] > '9')
            return -1;
        uint64_t v = 0;
        while (j < len && text[j] >= '0' && text[j] <= '9')
            v = v * 10 + (uint64_t)(text[j++] - '0');
        *out = v;
        return 0;
    }
    return -1;
}

/* totals as the JSON it is stored as, parsed back. */
static void totals_read(totals *t)
{
    const void *v;
    size_t n;
    memset(t, 0, sizeof(*t));
    if (host->kv_get(state.ctx, "totals", 6, &v, &n) != 0)
        return;
    json_uint(v, n, "edges", &t->edges);
    json_uint(v, n, "hits", &t->hits);
    json_uint(v, n, "misses", &t->misses);
}

static int totals_write(const totals *t)
{
    char json[200];
    uint64_t all = t->hits + t->misses;
    int n = snprintf(json, sizeof(json),
                     "{\"edges\": %" PRIu64 ", \"hits\": %" PRIu64 ", \"misses\": %" PRIu64
                     ", \"hit_rate\": %.4f}",
                     t->edges, t->hits, t->misses, all ? (double)t->hits / (double)all : 0.0);
    return host->kv_put(state.ctx, "totals", 6, json, (size_t)n);
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    if (!SPOKE_HOST_HAS(host, kv_put) || !SPOKE_HOST_HAS(host, kv_get))
        return SPOKE_ERR_UNSUPPORTED;
    if (args->plugin_id == 0) {
        host->log(ctx, SPOKE_LOG_ERROR, "needs an `id:` (the edge plugin cache-stats's ID)");
        return SPOKE_ERR_INVALID;
    }
    state.ctx = ctx;
    state.id = args->plugin_id;
    *self = &state;
    return 0;
}

static int accept_payload(void *self, const spoke_edge_payload *p, int *handled)
{
    agg *a = self;
    const char *mt = meta(p, "metric_type");
    if (p->plugin_id != a->id || mt == NULL || strcmp(mt, "cache_stats") != 0) {
        *handled = 0;
        return 0;
    }
    *handled = 1;
    uint64_t hits, misses;
    if (json_uint(p->payload, p->payload_len, "hits", &hits) != 0 ||
        json_uint(p->payload, p->payload_len, "misses", &misses) != 0)
        return SPOKE_ERR_INVALID;

    char key[300];
    int kl = snprintf(key, sizeof(key), "edge/%s", p->edge_id);
    edge_sums e = {0};
    const void *v;
    size_t n;
    int rc = host->kv_get(a->ctx, key, (size_t)kl, &v, &n);
    bool new_edge = rc != 0;
    if (rc == 0 && n == sizeof(e))
        memcpy(&e, v, sizeof(e));
    e.hits += hits;
    e.misses += misses;
    e.reports++;
    e.last_report_ms = p->received_timestamp_ms;
    if ((rc = host->kv_put(a->ctx, key, (size_t)kl, &e, sizeof(e))) != 0)
        return rc;
    totals t;
    totals_read(&t);
    t.edges += new_edge;
    t.hits += hits;
    t.misses += misses;
    return totals_write(&t);
}

static const spoke_plugin cache_stats_aggregator_plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "cache-stats-aggregator",
    .version = "1.0.0",
    .description = "sums the cache-stats reports of every edge in KV (control role)",
    .init = init,
    .accept_edge_payload = accept_payload,
};

SPOKE_PLUGIN_ENTRY(cache_stats_aggregator_plugin, host)
