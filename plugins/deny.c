/*
 * deny -- closes connections whose first client bytes match a configured prefix.
 *
 * Only the start of a connection counts: once the first bytes have been compared with
 * every prefix the connection is either denied (optionally answered with `message`, then
 * closed) or passed, and from then on its traffic is not looked at again.
 *
 * A prefix may arrive split over several chunks ("GE" then "T /admin"). While the bytes
 * seen so far are still the beginning of some prefix, the connection is undecided: the
 * plugin holds those bytes back (it empties the chunk and keeps a copy, at most as many
 * bytes as the longest prefix) so that the upstream never sees a part of a denied
 * request. As soon as the bytes match a prefix the connection is denied; as soon as they
 * cannot match any, the held bytes are released in front of the current chunk. A client
 * that half-closes while undecided never gets its held bytes forwarded: it sent less than
 * a whole prefix and nothing else.
 *
 * Config:
 *   prefix      a prefix to deny (bytes of the UTF-8 text, compared exactly);
 *   prefix.N    several prefixes, as a YAML list (`prefix: ["GET /admin", "DELETE "]`
 *               flattens to prefix.0, prefix.1 ...). At least one is required; each is
 *               1..4096 bytes.
 *   message     optional text sent to the client before a denied connection is closed.
 *
 * Per-connection state lives in host->conn_data: NULL (undecided, nothing held), a
 * `held` block (undecided, bytes held), or the address of `passed_mark` or
 * `denied_mark`. on_close frees a held block.
 */
#include <stdlib.h>
#include <string.h>

#include "spoke.h"

#define DENY_MAX_PREFIX 4096u

static const spoke_host *host;

typedef struct deny {
    spoke_ctx *ctx;
    char **prefix; /* owned copies, config order */
    size_t *prefix_len;
    size_t n_prefix;
    size_t max_len;      /* the longest prefix: the most bytes ever held */
    const char *message; /* from config_get: lives until fini */
} deny;

/* Bytes held back while a connection is undecided; data has room for max_len bytes. */
typedef struct held {
    size_t len;
    uint8_t data[];
} held;

static char passed_mark;
static char denied_mark;

enum decision { UNDECIDED, PASS, DENY };

/* ---- config ------------------------------------------------------------------------- */

/* "prefix" or "prefix.<digits>" */
static int is_prefix_key(const char *key)
{
    if (key == NULL || strncmp(key, "prefix", 6) != 0)
        return 0;
    if (key[6] == '\0')
        return 1;
    if (key[6] != '.' || key[7] == '\0')
        return 0;
    for (const char *k = key + 7; *k != '\0'; k++)
        if (*k < '0' || *k > '9')
            return 0;
    return 1;
}

static void deny_free(deny *d)
{
    for (size_t i = 0; i < d->n_prefix; i++)
        free(d->prefix[i]);
    free(d->prefix);
    free(d->prefix_len);
    free(d);
}

static int add_prefix(deny *d, const char *key, const char *value)
{
    size_t n = strlen(value);
    if (n == 0 || n > DENY_MAX_PREFIX) {
        host->log(d->ctx, SPOKE_LOG_ERROR, "%s: a prefix must be 1..%u bytes, not %zu", key,
                  DENY_MAX_PREFIX, n);
        return SPOKE_ERR_INVALID;
    }
    char *copy = malloc(n + 1);
    if (copy == NULL)
        return SPOKE_ERR_NOMEM;
    memcpy(copy, value, n + 1);
    d->prefix[d->n_prefix] = copy;
    d->prefix_len[d->n_prefix] = n;
    d->n_prefix++;
    if (n > d->max_len)
        d->max_len = n;
    return 0;
}

static int load_prefixes(deny *d, const spoke_init_args *args)
{
    size_t n = 0;
    for (size_t i = 0; i < args->n_config; i++)
        n += is_prefix_key(args->config[i].key);
    if (n == 0) {
        host->log(d->ctx, SPOKE_LOG_ERROR,
                  "config key 'prefix' is required (a string, or a list of strings)");
        return SPOKE_ERR_INVALID;
    }
    d->prefix = calloc(n, sizeof(*d->prefix));
    d->prefix_len = calloc(n, sizeof(*d->prefix_len));
    if (d->prefix == NULL || d->prefix_len == NULL)
        return SPOKE_ERR_NOMEM;
    for (size_t i = 0; i < args->n_config; i++) {
        const spoke_kv *kv = &args->config[i];
        if (!is_prefix_key(kv->key))
            continue;
        int rc = add_prefix(d, kv->key, kv->value ? kv->value : "");
        if (rc != 0)
            return rc;
    }
    return 0;
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    deny *d = calloc(1, sizeof(*d));
    if (d == NULL)
        return SPOKE_ERR_NOMEM;
    d->ctx = ctx;
    int rc = load_prefixes(d, args);
    if (rc != 0) {
        deny_free(d);
        return rc;
    }
    d->message = host->config_get(ctx, "message");
    *self = d;
    return 0;
}

static void fini(void *self)
{
    if (self != NULL)
        deny_free(self);
}

/* ---- traffic ------------------------------------------------------------------------ */

/* Compare the first n bytes of a connection with every prefix. *which gets the index of
 * the matching prefix on DENY. */
static enum decision decide(const deny *d, const uint8_t *data, size_t n, size_t *which)
{
    int possible = 0;
    for (size_t i = 0; i < d->n_prefix; i++) {
        size_t plen = d->prefix_len[i];
        size_t m = n < plen ? n : plen;
        if (memcmp(data, d->prefix[i], m) != 0)
            continue;
        if (n >= plen) {
            *which = i;
            return DENY;
        }
        possible = 1;
    }
    return possible ? UNDECIDED : PASS;
}

static spoke_verdict deny_conn(const deny *d, spoke_conn *conn, void **slot, size_t which)
{
    if (*slot != &passed_mark && *slot != &denied_mark)
        free(*slot);
    *slot = &denied_mark;
    host->log(d->ctx, SPOKE_LOG_WARN, "conn %llu from %s denied: first bytes match prefix '%s'",
              (unsigned long long)host->conn_id(conn), host->conn_peer(conn), d->prefix[which]);
    if (d->message != NULL)
        host->respond(conn, d->message, strlen(d->message));
    return SPOKE_CLOSE;
}

/* Keep the whole chunk (shorter than max_len) back; the upstream gets nothing yet. */
static spoke_verdict hold_first(const deny *d, spoke_conn *conn, void **slot, spoke_buf *buf)
{
    held *h = malloc(sizeof(*h) + d->max_len);
    if (h == NULL) {
        host->log(d->ctx, SPOKE_LOG_ERROR, "conn %llu: out of memory, closing (fail closed)",
                  (unsigned long long)host->conn_id(conn));
        return SPOKE_CLOSE;
    }
    memcpy(h->data, buf->data, buf->len);
    h->len = buf->len;
    *slot = h;
    host->buf_set(buf, NULL, 0);
    return SPOKE_MODIFIED;
}

/* Release the held bytes in front of the current chunk. */
static spoke_verdict release(const deny *d, spoke_conn *conn, void **slot, spoke_buf *buf)
{
    held *h = *slot;
    size_t n = buf->len;
    uint8_t *p = host->buf_resize(buf, h->len + n);
    if (p == NULL) {
        host->log(d->ctx, SPOKE_LOG_ERROR, "conn %llu: out of memory, closing",
                  (unsigned long long)host->conn_id(conn));
        return SPOKE_CLOSE;
    }
    memmove(p + h->len, p, n);
    memcpy(p, h->data, h->len);
    free(h);
    *slot = &passed_mark;
    return SPOKE_MODIFIED;
}

/* Add the chunk to what is held and decide on as many bytes as the longest prefix. */
static spoke_verdict hold_more(const deny *d, spoke_conn *conn, void **slot, spoke_buf *buf)
{
    held *h = *slot;
    size_t room = d->max_len - h->len;
    size_t take = buf->len < room ? buf->len : room;
    memcpy(h->data + h->len, buf->data, take);
    size_t which = 0;
    switch (decide(d, h->data, h->len + take, &which)) {
    case DENY:
        return deny_conn(d, conn, slot, which);
    case PASS:
        return release(d, conn, slot, buf);
    case UNDECIDED:
        break;
    }
    /* Undecided means fewer than max_len bytes so far: the whole chunk was taken. */
    h->len += take;
    host->buf_set(buf, NULL, 0);
    return SPOKE_MODIFIED;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    const deny *d = self;
    void **slot = host->conn_data(conn, d->ctx);
    if (slot == NULL) {
        host->log(d->ctx, SPOKE_LOG_ERROR, "no per-connection data: closing (fail closed)");
        return SPOKE_CLOSE;
    }
    if (*slot == &passed_mark || buf->len == 0)
        return SPOKE_CONTINUE;
    if (*slot == &denied_mark)
        return SPOKE_CLOSE;
    if (*slot != NULL)
        return hold_more(d, conn, slot, buf);
    size_t which = 0;
    switch (decide(d, buf->data, buf->len, &which)) {
    case DENY:
        return deny_conn(d, conn, slot, which);
    case PASS:
        *slot = &passed_mark;
        return SPOKE_CONTINUE;
    case UNDECIDED:
        break;
    }
    return hold_first(d, conn, slot, buf);
}

static void on_close(void *self, spoke_conn *conn)
{
    const deny *d = self;
    void **slot = host->conn_data(conn, d->ctx);
    if (slot == NULL)
        return;
    if (*slot != &passed_mark && *slot != &denied_mark)
        free(*slot);
    *slot = NULL;
}

static const spoke_plugin deny_plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "deny",
    .version = "1.0.0",
    .description = "closes connections whose first client bytes match a prefix",
    .init = init,
    .fini = fini,
    .on_close = on_close,
    .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(deny_plugin, host)
