/*
 * t_grpc_server.c -- a small gRPC server on spk_grpc_server for test_grpc_server.py.
 *
 *   t_grpc_server [--port N] [--tls CERT KEY] [--client-ca CA] [--require-cert]
 *                 [--request-timeout MS] [--idle-timeout MS] [--max-message N]
 *                 [--max-streams N] [--max-header-list N] [--max-connections N]
 *
 * Listens on 127.0.0.1:N (0, the default: an ephemeral port), prints "PORT <n>" on
 * stdout, and serves:
 *   /test.Echo/Echo   the request message back
 *   /test.Echo/Fail   the status the request names, "<code>:<message>"
 *   /test.Echo/Slow   the request back after the milliseconds it names (default 500),
 *                     from an ev_timer: the asynchronous answer path
 *   /test.Echo/Auth   "names=<tls names, comma-separated>;auth=<authorization>;timeout=<ms>"
 *   /test.Echo/Stats  the server's stats as text
 *   anything else     UNIMPLEMENTED
 * On SIGTERM it answers its pending Slow calls UNAVAILABLE, prints "STATS ..." on
 * stdout, frees everything and exits 0, so that ASan can check for leaks. On SIGUSR1 it
 * drains (spk_grpc_server_shutdown): pending calls are answered as usual, and once no
 * connection is left it prints "DRAINED" and the stats and exits 0.
 */
#include <arpa/inet.h>
#include <ev.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "grpc_server.h"

struct slow {
    ev_timer t;
    struct slow *prev, *next;
    spk_grpc_call *call;
};

static struct slow *slows;
static ev_timer drain_check;
static spk_grpc_server *server;

static void slow_unlink(struct slow *sl)
{
    if (sl->prev != NULL)
        sl->prev->next = sl->next;
    else
        slows = sl->next;
    if (sl->next != NULL)
        sl->next->prev = sl->prev;
}

static void on_slow(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct slow *sl = (struct slow *)w;
    size_t len;
    const uint8_t *msg = spk_grpc_call_message(sl->call, &len);
    slow_unlink(sl);
    spk_grpc_call_respond(sl->call, msg, len);
    free(sl);
}

static void stats_text(char *buf, size_t cap)
{
    spk_grpc_server_stats st;
    spk_grpc_server_stats_get(server, &st);
    snprintf(buf, cap,
             "connections=%llu accepted=%llu refused=%llu calls=%llu rejected=%llu "
             "timeouts=%llu protocol_errors=%llu bytes_held=%llu",
             (unsigned long long)st.connections, (unsigned long long)st.accepted,
             (unsigned long long)st.refused, (unsigned long long)st.calls,
             (unsigned long long)st.rejected, (unsigned long long)st.timeouts,
             (unsigned long long)st.protocol_errors, (unsigned long long)st.bytes_held);
}

static void handler(void *arg, spk_grpc_call *call)
{
    struct ev_loop *loop = arg;
    const char *path = spk_grpc_call_path(call);
    size_t len;
    const uint8_t *msg = spk_grpc_call_message(call, &len);

    if (strcmp(path, "/test.Echo/Echo") == 0) {
        spk_grpc_call_respond(call, msg, len);
    } else if (strcmp(path, "/test.Echo/Fail") == 0) {
        char text[2048];
        size_t n = len < sizeof(text) - 1 ? len : sizeof(text) - 1;
        memcpy(text, msg, n);
        text[n] = '\0';
        int code = atoi(text);
        char *colon = strchr(text, ':');
        spk_grpc_call_fail(call, code, "%s", colon != NULL ? colon + 1 : "");
    } else if (strcmp(path, "/test.Echo/Slow") == 0) {
        char text[32];
        size_t n = len < sizeof(text) - 1 ? len : sizeof(text) - 1;
        memcpy(text, msg, n);
        text[n] = '\0';
        double ms = n > 0 ? atof(text) : 500;
        struct slow *sl = calloc(1, sizeof(*sl));
        if (sl == NULL) {
            spk_grpc_call_fail(call, SPK_GRPC_RESOURCE_EXHAUSTED, "out of memory");
            return;
        }
        sl->call = call;
        sl->next = slows;
        if (slows != NULL)
            slows->prev = sl;
        slows = sl;
        ev_timer_init(&sl->t, on_slow, ms / 1000.0, 0);
        ev_timer_start(loop, &sl->t);
    } else if (strcmp(path, "/test.Echo/Auth") == 0) {
        char out[4096];
        size_t n, o = 0;
        const char *const *names = spk_grpc_call_tls_names(call, &n);
        o += (size_t)snprintf(out + o, sizeof(out) - o, "names=");
        for (size_t i = 0; i < n && o < sizeof(out); i++)
            o += (size_t)snprintf(out + o, sizeof(out) - o, "%s%s", i ? "," : "", names[i]);
        const char *auth = spk_grpc_call_header(call, "authorization");
        if (o < sizeof(out))
            o += (size_t)snprintf(out + o, sizeof(out) - o, ";auth=%s;timeout=%llu;peer=%s",
                                  auth != NULL ? auth : "",
                                  (unsigned long long)spk_grpc_call_timeout_ms(call),
                                  spk_grpc_call_peer(call));
        spk_grpc_call_respond(call, out, o < sizeof(out) ? o : sizeof(out) - 1);
    } else if (strcmp(path, "/test.Echo/Stats") == 0) {
        char out[512];
        stats_text(out, sizeof(out));
        spk_grpc_call_respond(call, out, strlen(out));
    } else {
        spk_grpc_call_fail(call, SPK_GRPC_UNIMPLEMENTED, "unknown method %s", path);
    }
}

static void on_term(struct ev_loop *loop, ev_signal *w, int revents)
{
    while (slows != NULL) {
        struct slow *sl = slows;
        slow_unlink(sl);
        ev_timer_stop(loop, &sl->t);
        spk_grpc_call_fail(sl->call, SPK_GRPC_UNAVAILABLE, "shutting down");
        free(sl);
    }
    char out[512];
    stats_text(out, sizeof(out));
    printf("STATS %s\n", out);
    fflush(stdout);
    ev_break(loop, EVBREAK_ALL);
}

static void on_drain_check(struct ev_loop *loop, ev_timer *w, int revents)
{
    spk_grpc_server_stats st;
    spk_grpc_server_stats_get(server, &st);
    if (st.connections != 0 || slows != NULL)
        return;
    char out[512];
    stats_text(out, sizeof(out));
    printf("DRAINED\nSTATS %s\n", out);
    fflush(stdout);
    ev_break(loop, EVBREAK_ALL);
}

static void on_usr1(struct ev_loop *loop, ev_signal *w, int revents)
{
    spk_grpc_server_shutdown(server);
    ev_timer_init(&drain_check, on_drain_check, 0, 0.02);
    ev_timer_again(loop, &drain_check);
}

static void usage(void)
{
    fprintf(stderr, "usage: t_grpc_server [--port N] [--tls CERT KEY] [--client-ca CA] "
                    "[--require-cert] [--request-timeout MS] [--idle-timeout MS] "
                    "[--max-message N] [--max-streams N] [--max-header-list N] "
                    "[--max-connections N]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int port = 0;
    const char *cert = NULL, *key = NULL, *ca = NULL;
    bool require = false;
    struct ev_loop *loop = EV_DEFAULT;
    spk_grpc_server_opts o;
    spk_grpc_server_opts_init(&o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool more = i + 1 < argc;
        if (strcmp(a, "--port") == 0 && more)
            port = atoi(argv[++i]);
        else if (strcmp(a, "--tls") == 0 && i + 2 < argc) {
            cert = argv[++i];
            key = argv[++i];
        } else if (strcmp(a, "--client-ca") == 0 && more)
            ca = argv[++i];
        else if (strcmp(a, "--require-cert") == 0)
            require = true;
        else if (strcmp(a, "--request-timeout") == 0 && more)
            o.request_timeout_ms = strtoull(argv[++i], NULL, 10);
        else if (strcmp(a, "--idle-timeout") == 0 && more)
            o.idle_timeout_ms = strtoull(argv[++i], NULL, 10);
        else if (strcmp(a, "--max-message") == 0 && more)
            o.max_message = strtoull(argv[++i], NULL, 10);
        else if (strcmp(a, "--max-streams") == 0 && more)
            o.max_streams = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (strcmp(a, "--max-header-list") == 0 && more)
            o.max_header_list = strtoull(argv[++i], NULL, 10);
        else if (strcmp(a, "--max-connections") == 0 && more)
            o.max_connections = strtoull(argv[++i], NULL, 10);
        else
            usage();
    }

    spk_errbuf eb;
    SSL_CTX *tls = NULL;
    if (cert != NULL && spk_grpc_tls_server_ctx(cert, key, ca, require, &tls, &eb) != 0) {
        fprintf(stderr, "t_grpc_server: %s\n", eb.msg);
        return 1;
    }
    o.tls = tls;
    o.handler = handler;
    o.arg = loop;
    if (spk_grpc_server_new(loop, &o, &server, &eb) != 0) {
        fprintf(stderr, "t_grpc_server: %s\n", eb.msg);
        return 1;
    }

    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof(sin);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sin, sizeof(sin)) != 0 || listen(fd, 512) != 0 ||
        getsockname(fd, (struct sockaddr *)&sin, &sl) != 0) {
        perror("t_grpc_server: listen");
        return 1;
    }
    if (spk_grpc_server_listen(server, fd, &eb) != 0) {
        fprintf(stderr, "t_grpc_server: %s\n", eb.msg);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    ev_signal term;
    ev_signal_init(&term, on_term, SIGTERM);
    ev_signal_start(loop, &term);
    ev_signal usr1;
    ev_signal_init(&usr1, on_usr1, SIGUSR1);
    ev_signal_start(loop, &usr1);
    printf("PORT %u\n", ntohs(sin.sin_port));
    fflush(stdout);

    ev_run(loop, 0);
    ev_timer_stop(loop, &drain_check);

    spk_grpc_server_free(server);
    close(fd);
    SSL_CTX_free(tls);
    ev_loop_destroy(loop);
    return 0;
}
