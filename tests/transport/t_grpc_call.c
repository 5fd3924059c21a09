/*
 * t_grpc_call -- drive transport/grpc_client.c from the command line, for the Python tests
 * that put a real gRPC server (python3-grpcio) behind it.
 *
 *   t_grpc_call URL PATH [options]
 *     --msg HEX        request message bytes (default: empty)
 *     --size N         request message of N bytes 'a' instead
 *     --repeat N       N calls one after the other (default 1), each started from the
 *                      previous one's callback
 *     --parallel N     N calls at once (default 1)
 *     --timeout MS     per call (default 5000)
 *     --ca F --cert F --key F --token T --max-response N
 *
 * One line per finished call, in finishing order:
 *   status=N http=H new_conn=0|1 len=L head=<first 128 bytes of the response, hex> message=...
 * then "connections=N calls=N". Exit code 0 when every call finished (whatever status).
 */
#include <ev.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grpc_client.h"

static int remaining;
static int to_start;
static spk_grpc_client *client;
static const char *path;
static uint8_t *req;
static size_t req_len;
static uint64_t timeout_ms = 5000;

static void start_one(void);

static void done(void *arg, const spk_grpc_result *r)
{
    (void)arg;
    char hex[257] = "";
    for (size_t i = 0; i < r->msg_len && i < 128; i++)
        snprintf(hex + 2 * i, 3, "%02x", r->msg[i]);
    printf("status=%d http=%ld new_conn=%d len=%zu head=%s message=%s\n", r->status,
           r->http_status, r->new_connection ? 1 : 0, r->msg_len, hex, r->message);
    fflush(stdout);
    remaining--;
    if (to_start > 0)
        start_one();
}

static void start_one(void)
{
    spk_errbuf eb;
    to_start--;
    if (spk_grpc_client_call(client, path, req, req_len, timeout_ms, done, NULL, &eb) != 0) {
        printf("call failed to start: %s\n", eb.msg);
        remaining--;
    }
}

static int unhex(const char *s, uint8_t *out)
{
    size_t n = strlen(s) / 2;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (uint8_t)v;
    }
    return (int)n;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: t_grpc_call URL PATH [options]\n");
        return 2;
    }
    spk_grpc_client_opts o = {.url = argv[1]};
    path = argv[2];
    const char *hexmsg = NULL;
    long size = -1, repeat = 1, parallel = 1;
    for (int i = 3; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (strcmp(k, "--msg") == 0) hexmsg = v;
        else if (strcmp(k, "--size") == 0) size = atol(v);
        else if (strcmp(k, "--repeat") == 0) repeat = atol(v);
        else if (strcmp(k, "--parallel") == 0) parallel = atol(v);
        else if (strcmp(k, "--timeout") == 0) timeout_ms = (uint64_t)atoll(v);
        else if (strcmp(k, "--ca") == 0) o.ca_file = v;
        else if (strcmp(k, "--cert") == 0) o.cert_file = v;
        else if (strcmp(k, "--key") == 0) o.key_file = v;
        else if (strcmp(k, "--token") == 0) o.token = v;
        else if (strcmp(k, "--max-response") == 0) o.max_response = (size_t)atol(v);
        else {
            fprintf(stderr, "unknown option %s\n", k);
            return 2;
        }
    }
    req_len = size >= 0 ? (size_t)size : hexmsg != NULL ? strlen(hexmsg) / 2 : 0;
    req = malloc(SPK_GRPC_PREFIX + req_len + 1);
    if (req == NULL)
        return 1;
    if (size >= 0)
        memset(req + SPK_GRPC_PREFIX, 'a', req_len);
    else if (hexmsg != NULL && unhex(hexmsg, req + SPK_GRPC_PREFIX) < 0)
        return 2;

    struct ev_loop *loop = EV_DEFAULT;
    spk_errbuf eb;
    if (spk_grpc_client_new(loop, &o, &client, &eb) != 0) {
        printf("client: %s\n", eb.msg);
        return 1;
    }
    remaining = (int)(repeat * parallel);
    to_start = remaining;
    for (long i = 0; i < parallel; i++)
        start_one();
    /* The calls are serialised per "lane": each callback starts the next call, so with
     * --parallel 1 calls go one after the other on the client's connection. */
    while (remaining > 0)
        ev_run(loop, EVRUN_ONCE);
    spk_grpc_client_stats st;
    spk_grpc_client_stats_get(client, &st);
    printf("connections=%llu calls=%llu\n", (unsigned long long)st.connections,
           (unsigned long long)st.calls);
    spk_grpc_client_free(client);
    free(req);
    return 0;
}
