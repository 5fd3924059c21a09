/*
 * chain.c -- run plugin hooks in config order and merge their verdicts (see chain.h).
 *
 * The traffic path is spk_chain_run(): for each plugin implementing the hook, publish
 * "plugin i, hook h" in the watchdog slot (spk_slot_enter: plain movs on x86, no fences;
 * slot.h has the store order the supervisor relies on), call it, and stop at the first
 * RESPOND or CLOSE.
 */
#include "chain.h"

#include "policy.h"

#include <stdlib.h>
#include <string.h>

int spk_bytes_append(spk_bytes *b, const void *data, size_t len)
{
    if (len == 0)
        return 0;
    if (b->len + len < b->len)
        return SPOKE_ERR_NOMEM;
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + len) {
            if (cap > SIZE_MAX / 2)
                return SPOKE_ERR_NOMEM;
            cap *= 2;
        }
        uint8_t *n = realloc(b->data, cap);
        if (n == NULL)
            return SPOKE_ERR_NOMEM;
        b->data = n;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    return 0;
}

void spk_bytes_free(spk_bytes *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

static spoke_traffic_hook traffic_fn(const spk_plugin *p, int hook)
{
    switch (hook) {
    case SPK_HOOK_FROM_CLIENT: return p->table.on_traffic_from_client;
    case SPK_HOOK_TO_SERVER: return p->table.on_traffic_to_server;
    case SPK_HOOK_FROM_SERVER: return p->table.on_traffic_from_server;
    case SPK_HOOK_TO_CLIENT: return p->table.on_traffic_to_client;
    }
    return NULL;
}

int spk_chain_build(spk_chain *ch, const spk_plugin_set *set)
{
    memset(ch, 0, sizeof(*ch));
    ch->plugins = set->v;
    ch->n_plugins = set->n;
    ch->slot = &ch->own_slot;
    for (size_t i = 0; i < set->n; i++)
        ch->any_half_close |= set->v[i]->table.on_half_close != NULL;
    for (int h = 0; h < 4; h++) {
        if (set->n == 0)
            continue;
        ch->traffic[h] = calloc(set->n, sizeof(spk_chain_entry));
        if (ch->traffic[h] == NULL) {
            spk_chain_free(ch);
            return SPK_ENOMEM;
        }
        for (size_t i = 0; i < set->n; i++) {
            spoke_traffic_hook fn = traffic_fn(set->v[i], h);
            if (fn == NULL)
                continue;
            spk_chain_entry *e = &ch->traffic[h][ch->n_traffic[h]++];
            e->fn = fn;
            e->self = set->v[i]->self;
            e->index = (uint32_t)i;
            e->st = spk_plugin_hookstat(set->v[i], (enum spk_hook_id)h);
            e->mask = spk_plugin_hmask(set->v[i]);
        }
    }
    return 0;
}

void spk_chain_free(spk_chain *ch)
{
    for (int h = 0; h < 4; h++)
        free(ch->traffic[h]);
    memset(ch, 0, sizeof(*ch));
}

void spk_chain_set_slot(spk_chain *ch, spk_slot *slot)
{
    ch->slot = slot ? slot : &ch->own_slot;
}

int spk_chain_conn_init(const spk_chain *ch, spoke_conn *conn, uint64_t id, const char *peer)
{
    memset(conn, 0, sizeof(*conn));
    conn->id = id;
    size_t n = strlen(peer);
    if (n >= sizeof(conn->peer))
        n = sizeof(conn->peer) - 1;
    memcpy(conn->peer, peer, n);
    conn->peer[n] = '\0';
    if (ch->n_plugins > 0) {
        conn->pdata = calloc(ch->n_plugins, sizeof(void *));
        if (conn->pdata == NULL)
            return SPK_ENOMEM;
    }
    return 0;
}

void spk_chain_conn_fini(spoke_conn *conn)
{
    free(conn->pdata);
    conn->pdata = NULL;
    spk_bytes_free(&conn->reply);
}

static inline spoke_verdict merge_stop(spoke_conn *conn, spoke_verdict v)
{
    if (v != SPOKE_RESPOND)
        return SPOKE_CLOSE; /* CLOSE, or an unknown value */
    return (conn->flags & SPK_CONN_TERMINATE) ? SPOKE_CLOSE : SPOKE_RESPOND;
}

spoke_verdict spk_chain_run(const spk_chain *ch, enum spk_hook_id hook, spoke_conn *conn,
                            spk_buf *buf)
{
    const spk_chain_entry *e = ch->traffic[hook];
    const size_t n = ch->n_traffic[hook];
    spk_slot *s = ch->slot;
    conn->reply_to_server = hook >= SPK_HOOK_FROM_SERVER;
    for (size_t i = 0; i < n; i++) {
        uint64_t t = spk_hook_begin(s, e[i].st, e[i].mask, e[i].index, hook);
        spoke_verdict v = e[i].fn(e[i].self, conn, &buf->pub);
        spk_hook_end(e[i].st, t);
        if (__builtin_expect(v > SPOKE_MODIFIED || (conn->flags & SPK_CONN_TERMINATE), 0)) {
            spk_slot_leave(s);
            if (v > SPOKE_CLOSE)
                spk_stat_inc(&e[i].st->errors, 1); /* an unknown verdict */
            return (conn->flags & SPK_CONN_TERMINATE) ? SPOKE_CLOSE : merge_stop(conn, v);
        }
    }
    if (n)
        spk_slot_leave(s);
    return SPOKE_CONTINUE;
}

spoke_verdict spk_chain_open(const spk_chain *ch, spoke_conn *conn)
{
    spk_slot *s = ch->slot;
    conn->reply_to_server = 0;
    if (ch->policy != NULL) {
        spk_policy_open(ch->policy, conn);
        if (conn->flags & SPK_CONN_TERMINATE)
            return SPOKE_CLOSE;
    }
    for (size_t i = 0; i < ch->n_plugins; i++) {
        const spk_plugin *p = ch->plugins[i];
        if (p->table.on_open == NULL)
            continue;
        uint64_t t = SPK_PLUGIN_HOOK_BEGIN(p, s, SPK_HOOK_OPEN);
        spoke_verdict v = p->table.on_open(p->self, conn);
        SPK_PLUGIN_HOOK_END(p, s, SPK_HOOK_OPEN, t);
        if (v > SPOKE_MODIFIED || (conn->flags & SPK_CONN_TERMINATE))
            return (conn->flags & SPK_CONN_TERMINATE) ? SPOKE_CLOSE : merge_stop(conn, v);
    }
    return SPOKE_CONTINUE;
}

spoke_verdict spk_chain_half_close(const spk_chain *ch, spoke_conn *conn, bool from_client,
                                   spk_buf *buf)
{
    spk_slot *s = ch->slot;
    conn->reply_to_server = !from_client;
    for (size_t i = 0; i < ch->n_plugins; i++) {
        const spk_plugin *p = ch->plugins[i];
        if (p->table.on_half_close == NULL)
            continue;
        uint64_t t = SPK_PLUGIN_HOOK_BEGIN(p, s, SPK_HOOK_HALF_CLOSE);
        spoke_verdict v = p->table.on_half_close(p->self, conn, from_client, &buf->pub);
        SPK_PLUGIN_HOOK_END(p, s, SPK_HOOK_HALF_CLOSE, t);
        if (v > SPOKE_MODIFIED || (conn->flags & SPK_CONN_TERMINATE))
            return (conn->flags & SPK_CONN_TERMINATE) ? SPOKE_CLOSE : merge_stop(conn, v);
    }
    return SPOKE_CONTINUE;
}

void spk_chain_close(const spk_chain *ch, spoke_conn *conn)
{
    spk_slot *s = ch->slot;
    for (size_t i = 0; i < ch->n_plugins; i++) {
        const spk_plugin *p = ch->plugins[i];
        if (p->table.on_close == NULL)
            continue;
        uint64_t t = SPK_PLUGIN_HOOK_BEGIN(p, s, SPK_HOOK_CLOSE);
        p->table.on_close(p->self, conn);
        SPK_PLUGIN_HOOK_END(p, s, SPK_HOOK_CLOSE, t);
    }
}

void spk_chain_tick(const spk_chain *ch)
{
    spk_slot *s = ch->slot;
    for (size_t i = 0; i < ch->n_plugins; i++) {
        const spk_plugin *p = ch->plugins[i];
        if (p->table.on_tick == NULL)
            continue;
        uint64_t t = SPK_PLUGIN_HOOK_BEGIN(p, s, SPK_HOOK_TICK);
        p->table.on_tick(p->self);
        SPK_PLUGIN_HOOK_END(p, s, SPK_HOOK_TICK, t);
    }
}
