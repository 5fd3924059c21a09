/*
 * t_hold -- test plugin "t-hold" (ABI 1.3): holds client bytes back until a newline, and
 * hands them on when the client half-closes (on_half_close).
 *
 *  - on_traffic_from_client: the chunk is appended to what this connection holds; the
 *    complete lines (up to the last '\n') go on, the rest is held (SPOKE_MODIFIED);
 *  - on_half_close, client side: what is held is appended to `buf` (after what earlier
 *    plugins put there), then config `mark` if set, and SPOKE_MODIFIED is returned; the
 *    server side is left alone (SPOKE_CONTINUE);
 *  - config `respond` set: on the client's half-close, that text is also queued for the
 *    client with respond() (it may still read).
 *
 * Several entries of this file may be loaded under different names (each has its own
 * state in self), to see the chain order.
 */
#include <stdlib.h>
#include <string.h>

#include "spoke.h"

static const spoke_host *host;

typedef struct hold {
    spoke_ctx *ctx;
    const char *mark;    /* from config_get: lives until fini */
    const char *respond;
} hold;

typedef struct held {
    uint8_t *p;
    size_t len;
} held;

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    hold *h = calloc(1, sizeof(*h));
    if (h == NULL)
        return SPOKE_ERR_NOMEM;
    h->ctx = ctx;
    h->mark = host->config_get(ctx, "mark");
    h->respond = host->config_get(ctx, "respond");
    *self = h;
    return 0;
}

static void fini(void *self)
{
    free(self);
}

static held *held_of(hold *h, spoke_conn *conn)
{
    void **slot = host->conn_data(conn, h->ctx);
    if (slot == NULL)
        return NULL;
    if (*slot == NULL)
        *slot = calloc(1, sizeof(held));
    return *slot;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    hold *h = self;
    held *d = held_of(h, conn);
    if (d == NULL)
        return SPOKE_CLOSE;
    uint8_t *np = realloc(d->p, d->len + buf->len + 1);
    if (np == NULL)
        return SPOKE_CLOSE;
    d->p = np;
    memcpy(d->p + d->len, buf->data, buf->len);
    d->len += buf->len;
    size_t lines = d->len;
    while (lines > 0 && d->p[lines - 1] != '\n')
        lines--;
    if (host->buf_set(buf, d->p, lines) != 0)
        return SPOKE_CLOSE;
    memmove(d->p, d->p + lines, d->len - lines);
    d->len -= lines;
    return SPOKE_MODIFIED;
}

static spoke_verdict on_half_close(void *self, spoke_conn *conn, int from_client_side,
                                   spoke_buf *buf)
{
    hold *h = self;
    if (!from_client_side)
        return SPOKE_CONTINUE;
    held *d = held_of(h, conn);
    if (d == NULL)
        return SPOKE_CLOSE;
    size_t old = buf->len, mlen = h->mark ? strlen(h->mark) : 0;
    uint8_t *p = host->buf_resize(buf, old + d->len + mlen);
    if (p == NULL)
        return SPOKE_CLOSE;
    if (d->len)
        memcpy(p + old, d->p, d->len);
    if (mlen)
        memcpy(p + old + d->len, h->mark, mlen);
    d->len = 0;
    if (h->respond != NULL && host->respond(conn, h->respond, strlen(h->respond)) != 0)
        return SPOKE_CLOSE;
    return SPOKE_MODIFIED;
}

static void on_close(void *self, spoke_conn *conn)
{
    hold *h = self;
    void **slot = host->conn_data(conn, h->ctx);
    if (slot == NULL || *slot == NULL)
        return;
    held *d = *slot;
    free(d->p);
    free(d);
    *slot = NULL;
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-hold",
    .version = "1.0.0",
    .description = "holds client bytes until a newline; flushes them on half-close",
    .init = init,
    .fini = fini,
    .on_close = on_close,
    .on_traffic_from_client = from_client,
    .on_half_close = on_half_close,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
