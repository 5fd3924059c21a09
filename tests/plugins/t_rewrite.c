/*
 * t_rewrite -- test plugin "t-rewrite": rewrites every client chunk.
 *
 *  - always: ASCII letters are uppercased in place (buf_resize to the same length);
 *  - config `suffix`: that text is appended to every chunk (buf_resize to len + strlen);
 *  - config `expand` = K (1..65536): the chunk is replaced by K copies of itself (buf_set
 *    with a malloc'd copy), to test a rewrite that grows a chunk to a large size.
 *
 * In that order, and the chunk is returned as SPOKE_MODIFIED. Server chunks are untouched.
 */
#include <stdlib.h>
#include <string.h>

#include "spoke.h"

static const spoke_host *host;

typedef struct rewrite {
    const char *suffix; /* from config_get: lives until fini */
    size_t expand;      /* 0: off */
} rewrite;

static int parse_expand(const char *s, size_t *out)
{
    char *end;
    unsigned long v = strtoul(s, &end, 10);
    if (end == s || *end != '\0' || v < 1 || v > 65536)
        return -1;
    *out = (size_t)v;
    return 0;
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    rewrite *rw = calloc(1, sizeof(*rw));
    if (rw == NULL)
        return SPOKE_ERR_NOMEM;
    rw->suffix = host->config_get(ctx, "suffix");
    const char *ex = host->config_get(ctx, "expand");
    if (ex != NULL && parse_expand(ex, &rw->expand) != 0) {
        host->log(ctx, SPOKE_LOG_ERROR, "expand: '%s' is not a number in 1..65536", ex);
        free(rw);
        return SPOKE_ERR_INVALID;
    }
    *self = rw;
    return 0;
}

static void fini(void *self)
{
    free(self);
}

static int expand(spoke_buf *buf, size_t k)
{
    size_t n = buf->len;
    if (n == 0 || k <= 1)
        return 0;
    if (n > SIZE_MAX / k)
        return SPOKE_ERR_NOMEM;
    uint8_t *copy = malloc(n * k);
    if (copy == NULL)
        return SPOKE_ERR_NOMEM;
    for (size_t i = 0; i < k; i++)
        memcpy(copy + i * n, buf->data, n);
    int rc = host->buf_set(buf, copy, n * k);
    free(copy);
    return rc;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)conn;
    const rewrite *rw = self;
    size_t n = buf->len;
    uint8_t *p = host->buf_resize(buf, n);
    if (p == NULL)
        return SPOKE_CLOSE;
    for (size_t i = 0; i < n; i++)
        if (p[i] >= 'a' && p[i] <= 'z')
            p[i] = (uint8_t)(p[i] - 'a' + 'A');
    if (rw->suffix != NULL) {
        size_t sl = strlen(rw->suffix);
        p = host->buf_resize(buf, n + sl);
        if (p == NULL)
            return SPOKE_CLOSE;
        memcpy(p + n, rw->suffix, sl);
    }
    if (rw->expand > 1 && expand(buf, rw->expand) != 0)
        return SPOKE_CLOSE;
    return SPOKE_MODIFIED;
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-rewrite",
    .version = "1.0.0",
    .description = "uppercases, suffixes and expands client chunks",
    .init = init,
    .fini = fini,
    .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
