/*
 * t_send -- test plugin "t-send": calls send_to_control on the client's command and
 * answers with the result, so an integration test can check the host service end to end.
 *
 * One command per client chunk (a trailing newline is ignored); CORR "-" means no
 * correlation ID:
 *   SEND CORR TEXT   host->send_to_control(TEXT) with metadata {kind: t-send, n: <count>}
 *   JSON CORR TEXT   host->send_to_control_json(TEXT), same metadata
 *   BIG N            send_to_control of N bytes of 'x', no correlation ID, no metadata
 *   MD N             send_to_control("md") with N metadata entries
 * The answer is "RC <status> <pending>\n" (SPOKE_RESPOND: nothing reaches the upstream),
 * status being the call's return value and pending what it stored in *pending.
 * Config `init_send: TEXT`: init sends TEXT (correlation ID "from-init") and fails if
 * that send does not return 0. Anything else is passed on (SPOKE_CONTINUE).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spoke.h"

static const spoke_host *host;

typedef struct sender {
    spoke_ctx *ctx;
    unsigned long count;
} sender;

static sender state;

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    (void)args;
    state.ctx = ctx;
    state.count = 0;
    *self = &state;
    if (!SPOKE_HOST_HAS(host, send_to_control))
        return SPOKE_ERR_UNSUPPORTED;
    const char *text = host->config_get(ctx, "init_send");
    if (text != NULL) {
        uint64_t pending = 0;
        int rc = host->send_to_control(ctx, text, strlen(text), "from-init", NULL, 0, &pending);
        if (rc != 0)
            return rc;
    }
    return 0;
}

static spoke_verdict answer(spoke_conn *conn, int rc, uint64_t pending)
{
    char out[64];
    int n = snprintf(out, sizeof(out), "RC %d %llu\n", rc, (unsigned long long)pending);
    return host->respond(conn, out, (size_t)n) == 0 ? SPOKE_RESPOND : SPOKE_CLOSE;
}

/* Split "WORD CORR REST" in place; returns REST (may be empty). */
static char *split(char *s, char **corr)
{
    char *sp = strchr(s, ' ');
    if (sp == NULL) {
        *corr = s + strlen(s);
        return *corr;
    }
    *sp = '\0';
    *corr = s;
    return sp + 1;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    sender *st = self;
    size_t len = buf->len;
    if (len < 4)
        return SPOKE_CONTINUE;
    char *cmd = malloc(len + 1);
    if (cmd == NULL)
        return SPOKE_CLOSE;
    memcpy(cmd, buf->data, len);
    cmd[len] = '\0';
    if (len > 0 && cmd[len - 1] == '\n')
        cmd[--len] = '\0';

    spoke_verdict v = SPOKE_CONTINUE;
    uint64_t pending = 0;
    char nbuf[32];
    snprintf(nbuf, sizeof(nbuf), "%lu", ++st->count);
    spoke_kv md[] = {{"kind", "t-send"}, {"n", nbuf}};
    if (strncmp(cmd, "SEND ", 5) == 0 || strncmp(cmd, "JSON ", 5) == 0) {
        char *corr;
        char *text = split(cmd + 5, &corr);
        const char *c = strcmp(corr, "-") == 0 ? NULL : corr;
        int rc = cmd[0] == 'S'
                     ? host->send_to_control(st->ctx, text, strlen(text), c, md, 2, &pending)
                     : host->send_to_control_json(st->ctx, text, strlen(text), c, md, 2,
                                                  &pending);
        v = answer(conn, rc, pending);
    } else if (strncmp(cmd, "BIG ", 4) == 0) {
        size_t n = strtoul(cmd + 4, NULL, 10);
        char *big = malloc(n ? n : 1);
        if (big == NULL) {
            free(cmd);
            return SPOKE_CLOSE;
        }
        memset(big, 'x', n);
        int rc = host->send_to_control(st->ctx, big, n, NULL, NULL, 0, &pending);
        free(big);
        v = answer(conn, rc, pending);
    } else if (strncmp(cmd, "MD ", 3) == 0) {
        size_t n = strtoul(cmd + 3, NULL, 10);
        spoke_kv *many = calloc(n ? n : 1, sizeof(*many));
        if (many == NULL) {
            free(cmd);
            return SPOKE_CLOSE;
        }
        for (size_t i = 0; i < n; i++) {
            many[i].key = "k";
            many[i].value = "v";
        }
        int rc = host->send_to_control(st->ctx, "md", 2, NULL, many, n, &pending);
        free(many);
        v = answer(conn, rc, pending);
    }
    free(cmd);
    return v;
}

static const spoke_plugin plugin = {
    SPOKE_PLUGIN_HEADER,
    .name = "t-send",
    .version = "1.0.0",
    .description = "calls send_to_control on client commands",
    .init = init,
    .on_traffic_from_client = from_client,
};

SPOKE_PLUGIN_ENTRY(plugin, host)
