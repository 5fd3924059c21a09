/*
 * t_respond -- test plugin "t-respond": answers the client itself.
 *
 *  - a client chunk starting with "PING": responds "PONG\n" and returns SPOKE_RESPOND
 *    (the chunk never reaches the upstream);
 *  - a client chunk starting with "QUIT": responds "BYE\n" and returns SPOKE_CLOSE
 *    (the host sends the answer, then closes);
 *  - config `greet`: on_open responds with that text and returns SPOKE_RESPOND, which in
 *    on_open means "send this to the client and keep the connection" (later plugins'
 *    on_open does not run).
 * Anything else: SPOKE_CONTINUE.
 */
#include <string.h>

#include "spoke.h"

static const spoke_host *host;

typedef struct respond {
    const char *greet; /* from config_get: lives until fini */
} respond;

static respond state;

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    state.greet = host->config_get(ctx, "greet");
    *self = &state;
    return 0;
}

static spoke_verdict on_open(void *self, spoke_conn *conn)
{
    const respond *r = self;
    if (r->greet == NULL)
        return SPOKE_CONTINUE;
    if (host->respond(conn, r->greet, strlen(r->greet)) != 0)
        return SPOKE_CLOSE;
    return SPOKE_RESPOND;
}

static int starts_with(const spoke_buf *buf, const char *word)
{
    size_t n = strlen(word);
    return buf->len >= n && memcmp(buf->data, word, n) == 0;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)self;
    if (starts_with(buf, "PING"))
        return host->respond(conn, "PONG\n", 5) == 0 ? SPOKE_RESPOND : SPOKE_CLOSE;
    if (starts_with(buf, "QUIT")) {
        host->respond(conn, "BYE\n", 4);
        return SPOKE_CLOSE;
    }
    return SPOKE_CONTINUE;
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-respond",
    .version = "1.0.0",
    .description = "answers PING and QUIT itself",
    .init = init,
    .on_open = on_open,
    .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
