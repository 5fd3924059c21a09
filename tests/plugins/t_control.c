/*
 * t_control -- test control plugin "t-control": what it does with a payload is chosen by
 * the payload's correlation ID, so a test can drive hubd's routing from the edge side.
 *
 *   "pass..."   handled = 0: offered to the other control plugins in config order
 *   "fail..."   handled = 1 with an error (SPOKE_ERR_INVALID): logged, counted, not retried
 *   "crash..."  writes through NULL (SIGSEGV) inside accept_edge_payload
 *   "sleep..."  sleeps 2 s inside accept_edge_payload (a hook over its timeout)
 *   anything else: handled = 1, a log line
 *       t-control NAME: got edge EDGE seq N corr CORR bytes B md K=V,...
 *     and, in its KV namespace, key "seen/CORR" counts the deliveries of that correlation
 *     ID (a decimal number), so a test can check each payload arrived exactly once.
 * Config `catch_all: true` makes it handle payloads of any plugin ID that are offered to
 * it (its own ID's rules above still apply to its own).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "spoke.h"

static const spoke_host *host;

typedef struct tc {
    spoke_ctx *ctx;
    uint32_t id;
    int catch_all;
} tc;

static tc state;

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    state.ctx = ctx;
    state.id = args->plugin_id;
    const char *ca = host->config_get(ctx, "catch_all");
    state.catch_all = ca != NULL && strcmp(ca, "true") == 0;
    *self = &state;
    return 0;
}

static int accept_payload(void *self, const spoke_edge_payload *p, int *handled)
{
    tc *t = self;
    const char *c = p->correlation_id;
    if (p->plugin_id != t->id && !t->catch_all) {
        *handled = 0; /* offered another plugin's payload: not ours */
        return 0;
    }
    if (p->plugin_id == t->id && strncmp(c, "pass", 4) == 0) {
        *handled = 0;
        return 0;
    }
    if (strncmp(c, "crash", 5) == 0) {
        volatile int *volatile np = NULL;
        *np = 1;
    }
    if (strncmp(c, "sleep", 5) == 0) {
        struct timespec ts = {2, 0};
        nanosleep(&ts, NULL);
    }
    *handled = 1;
    if (strncmp(c, "fail", 4) == 0)
        return SPOKE_ERR_INVALID;
    char md[512] = "";
    for (size_t i = 0; i < p->n_metadata; i++)
        snprintf(md + strlen(md), sizeof(md) - strlen(md), "%s%s=%s", i ? "," : "",
                 p->metadata[i].key, p->metadata[i].value);
    host->log(t->ctx, SPOKE_LOG_INFO, "got edge %s seq %llu corr %s bytes %zu plugin %u md %s",
              p->edge_id, (unsigned long long)p->sequence, c, p->payload_len, p->plugin_id, md);
    if (!SPOKE_HOST_HAS(host, kv_put))
        return 0;
    char key[300], val[24];
    int kl = snprintf(key, sizeof(key), "seen/%s", c);
    const void *old;
    size_t olen;
    unsigned long n = 0;
    if (host->kv_get(t->ctx, key, (size_t)kl, &old, &olen) == 0 && olen < sizeof(val)) {
        memcpy(val, old, olen);
        val[olen] = '\0';
        n = strtoul(val, NULL, 10);
    }
    int vl = snprintf(val, sizeof(val), "%lu", n + 1);
    return host->kv_put(t->ctx, key, (size_t)kl, val, (size_t)vl);
}

static const spoke_plugin t_control = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-control",
    .version = "1.0.0",
    .description = "test control plugin: routing chosen by the correlation ID",
    .init = init,
    .accept_edge_payload = accept_payload,
};

SPOKE_PLUGIN_ENTRY(t_control, host)
