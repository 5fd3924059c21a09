/*
 * t_policy -- test plugin "t-policy": emits the signal a client asks for, for the policy
 * tests (tests/integration/test_policies.py).
 *
 * A client chunk "SIG NAME [KEY=VALUE ...]" (ending in a newline or not): the plugin
 * responds "SEEN NAME\n", then emits signal NAME with those fields on the connection,
 * and answers the chunk (SPOKE_RESPOND: nothing goes upstream). The host's built-in
 * behaviour, or a policy, then decides what the signal does: a terminate closes the
 * connection after "SEEN" (and any answer) is sent, a close drops "SEEN" too. Any other
 * chunk goes on unchanged.
 */
#include <stdio.h>
#include <string.h>

#include "spoke.h"

#define MAX_FIELDS 8

static const spoke_host *host;
static spoke_ctx *plugin_ctx;

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    (void)self;
    plugin_ctx = ctx;
    return 0;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    (void)self;
    if (buf->len < 4 || memcmp(buf->data, "SIG ", 4) != 0)
        return SPOKE_CONTINUE;
    char line[1024];
    size_t n = buf->len < sizeof(line) - 1 ? buf->len : sizeof(line) - 1;
    memcpy(line, buf->data, n);
    line[n] = '\0';
    line[strcspn(line, "\r\n")] = '\0';
    char *save = NULL;
    strtok_r(line, " ", &save);
    const char *name = strtok_r(NULL, " ", &save);
    if (name == NULL)
        return SPOKE_CONTINUE;
    spoke_kv f[MAX_FIELDS];
    size_t nf = 0;
    for (char *t; nf < MAX_FIELDS && (t = strtok_r(NULL, " ", &save)) != NULL;) {
        char *eq = strchr(t, '=');
        if (eq == NULL)
            continue;
        *eq = '\0';
        f[nf++] = (spoke_kv){t, eq + 1};
    }
    char seen[128];
    int len = snprintf(seen, sizeof(seen), "SEEN %s\n", name);
    host->respond(conn, seen, (size_t)len);
    host->signal(plugin_ctx, conn, name, f, nf);
    return SPOKE_RESPOND;
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER, .name = "t-policy",
    .version = "1.0.0",  .description = "emits the signals a client asks for",
    .init = init,        .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
