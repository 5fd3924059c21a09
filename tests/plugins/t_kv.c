/*
 * t_kv -- test plugin "t-kv": runs the client's commands through the KV host services
 * (ABI 1.2) and answers with the results, so an integration test can check the services
 * end to end, across the workers of one spoked.
 *
 * One command per client chunk (a trailing newline is ignored); keys and values are
 * single words:
 *   PUT K V          host->kv_put(K, V)
 *   GET K            host->kv_get(K)                  answer "RC <status> <len> <value>"
 *   DEL K            host->kv_del(K)
 *   SCAN P [A [M]]   host->kv_scan(prefix P, after A, at most M keys); "-" for P is the
 *                    empty prefix, for A no resume key
 *                                                     answer "RC <status> <n> K=V K=V ..."
 *   BIG K N          kv_put of N bytes of 'x' under K
 *   KEY N            kv_put of "v" under a key of N bytes of 'k'
 *   PID              answer "PID <pid of the worker>"
 *   HOLD MS          block the worker for MS ms, then answer "HELD" (so that new
 *                    connections go to another worker meanwhile)
 * Other answers are "RC <status>" (SPOKE_RESPOND: nothing reaches the upstream). Anything
 * else is passed on (SPOKE_CONTINUE), so traffic still flows through the plugin.
 * Config `init_put: K=V`: init puts V under K, and fails if that does not return 0 or
 * SPOKE_ERR_KV_UNAVAILABLE (a store that cannot be opened must not stop the plugin).
 * Config `tick_put: K`: a timer puts "<pid> <n>" under K every 100 ms (n counting that
 * worker's timer runs), so a test sees KV writes from timers.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "spoke.h"

static const spoke_host *host;

typedef struct ticker {
    spoke_ctx *ctx;
    char key[64];
    unsigned long n;
} ticker;

static ticker tick_state; /* one timer per plugin instance is all the tests need */

static void on_timer(void *self, void *arg)
{
    (void)self;
    ticker *t = arg;
    char v[64];
    int n = snprintf(v, sizeof(v), "%ld %lu", (long)getpid(), ++t->n);
    int rc = host->kv_put(t->ctx, t->key, strlen(t->key), v, (size_t)n);
    if (rc != 0)
        host->log(t->ctx, SPOKE_LOG_WARN, "tick_put: %s", host->strerror(rc));
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    *self = ctx; /* all the state there is */
    if (!SPOKE_HOST_HAS(host, kv_scan))
        return SPOKE_ERR_UNSUPPORTED;
    const char *kv = host->config_get(ctx, "init_put");
    const char *eq = kv ? strchr(kv, '=') : NULL;
    if (eq != NULL) {
        int rc = host->kv_put(ctx, kv, (size_t)(eq - kv), eq + 1, strlen(eq + 1));
        if (rc != 0 && rc != SPOKE_ERR_KV_UNAVAILABLE)
            return rc;
    }
    const char *tk = host->config_get(ctx, "tick_put");
    if (tk != NULL) {
        tick_state.ctx = ctx;
        snprintf(tick_state.key, sizeof(tick_state.key), "%s", tk);
        int64_t id = host->every(ctx, 100, on_timer, &tick_state);
        if (id < 0)
            return (int)id;
    }
    return 0;
}

/* The answer, built up to 64 KiB. */
typedef struct out {
    char *b;
    size_t n, cap;
} out;

static void put(out *o, const void *p, size_t n)
{
    if (o->n + n > o->cap)
        n = o->cap - o->n;
    memcpy(o->b + o->n, p, n);
    o->n += n;
}

static void putf(out *o, const char *fmt, long a, long b)
{
    char t[64];
    int n = snprintf(t, sizeof(t), fmt, a, b);
    put(o, t, (size_t)n);
}

static int scan_cb(void *arg, const void *key, size_t klen, const void *val, size_t vlen)
{
    out *o = arg;
    put(o, " ", 1);
    put(o, key, klen);
    put(o, "=", 1);
    put(o, val, vlen);
    return 0;
}

static void hold(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* The next word of *s (NULL at the end), cut in place. */
static char *word(char **s)
{
    while (**s == ' ')
        (*s)++;
    if (**s == '\0')
        return NULL;
    char *w = *s;
    char *sp = strchr(w, ' ');
    if (sp != NULL) {
        *sp = '\0';
        *s = sp + 1;
    } else {
        *s = w + strlen(w);
    }
    return w;
}

static int run(spoke_ctx *ctx, char *line, out *o)
{
    char *rest = line;
    char *cmd = word(&rest);
    char *a = word(&rest);
    char *b = word(&rest);
    char *c = word(&rest);
    if (cmd == NULL)
        return -1;
    if (strcmp(cmd, "PID") == 0) {
        putf(o, "PID %ld", (long)getpid(), 0);
    } else if (strcmp(cmd, "HOLD") == 0 && a != NULL) {
        hold(strtol(a, NULL, 10));
        put(o, "HELD", 4);
    } else if (strcmp(cmd, "PUT") == 0 && a != NULL) {
        const char *v = b ? b : "";
        putf(o, "RC %ld", host->kv_put(ctx, a, strlen(a), v, strlen(v)), 0);
    } else if (strcmp(cmd, "GET") == 0 && a != NULL) {
        const void *v;
        size_t vlen;
        int rc = host->kv_get(ctx, a, strlen(a), &v, &vlen);
        putf(o, "RC %ld %ld ", rc, (long)vlen);
        if (rc == 0)
            put(o, v, vlen);
    } else if (strcmp(cmd, "DEL") == 0 && a != NULL) {
        putf(o, "RC %ld", host->kv_del(ctx, a, strlen(a)), 0);
    } else if (strcmp(cmd, "SCAN") == 0 && a != NULL) {
        out items = {malloc(60000), 0, 60000};
        if (items.b == NULL)
            return -1;
        const char *prefix = strcmp(a, "-") != 0 ? a : "";
        const char *after = b && strcmp(b, "-") != 0 ? b : NULL;
        size_t max = c ? strtoul(c, NULL, 10) : 0;
        int rc = host->kv_scan(ctx, prefix, strlen(prefix), after, after ? strlen(after) : 0, max,
                               scan_cb, &items);
        size_t n = 0;
        for (size_t i = 0; i < items.n; i++)
            n += items.b[i] == '=';
        putf(o, "RC %ld %ld", rc, (long)n);
        put(o, items.b, items.n);
        free(items.b);
    } else if (strcmp(cmd, "BIG") == 0 && a != NULL && b != NULL) {
        size_t n = strtoul(b, NULL, 10);
        char *big = malloc(n ? n : 1);
        if (big == NULL)
            return -1;
        memset(big, 'x', n);
        putf(o, "RC %ld", host->kv_put(ctx, a, strlen(a), big, n), 0);
        free(big);
    } else if (strcmp(cmd, "KEY") == 0 && a != NULL) {
        size_t n = strtoul(a, NULL, 10);
        char *key = malloc(n ? n : 1);
        if (key == NULL)
            return -1;
        memset(key, 'k', n);
        putf(o, "RC %ld", host->kv_put(ctx, key, n, "v", 1), 0);
        free(key);
    } else {
        return 0;
    }
    return 1;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    size_t len = buf->len;
    char *line = malloc(len + 1);
    char *ob = malloc(65536);
    if (line == NULL || ob == NULL) {
        free(line);
        free(ob);
        return SPOKE_CLOSE;
    }
    memcpy(line, buf->data, len);
    line[len] = '\0';
    if (len > 0 && line[len - 1] == '\n')
        line[--len] = '\0';
    out o = {ob, 0, 65535};
    int r = run(self, line, &o);
    spoke_verdict v = SPOKE_CONTINUE;
    if (r < 0) {
        v = SPOKE_CLOSE;
    } else if (r > 0) {
        o.b[o.n++] = '\n';
        v = host->respond(conn, o.b, o.n) == 0 ? SPOKE_RESPOND : SPOKE_CLOSE;
    }
    free(line);
    free(ob);
    return v;
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-kv",
    .version = "1.0.0",
    .description = "runs client commands through the KV services",
    .init = init,
    .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
