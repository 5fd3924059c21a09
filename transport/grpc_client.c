/*
 * grpc_client.c -- unary gRPC calls over libcurl's multi interface on libev (grpc_client.h).
 *
 * One CURLM per client. libcurl tells us which sockets to watch (on_socket: one ev_io per
 * socket, its pointer kept with curl_multi_assign) and when to wake it (on_curl_timer: one
 * ev_timer); each event is handed back with curl_multi_socket_action(), after which the
 * finished transfers are collected (collect_done). A call is one easy handle; its
 * response body goes through spk_grpc_body (bounded by max_response) and its headers
 * and trailers through on_header, which keeps grpc-status and grpc-message wherever they
 * come: in the trailers after the body, or in the headers of a Trailers-Only answer.
 */
#include "grpc_client.h"

#include <curl/curl.h>
#include <ev.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#ifndef SPOKE_VERSION
#define SPOKE_VERSION "0"
#endif

#define DEFAULT_MAX_RESPONSE (4u * 1024 * 1024)
#define DEFAULT_CONNECT_TIMEOUT_MS 5000u

struct call {
    struct call *prev, *next;
    spk_grpc_client *c;
    CURL *easy;
    struct curl_slist *headers;
    spk_grpc_body body;
    spk_grpc_code body_status;   /* set when the body was refused (then abort) */
    int grpc_status;             /* -1 until a grpc-status arrives */
    char grpc_message[512];
    char curl_error[CURL_ERROR_SIZE];
    spk_errbuf eb;
    spk_grpc_done done;
    void *arg;
    ev_tstamp t0;
};

struct sock {
    ev_io io;
    spk_grpc_client *c;
};

struct spk_grpc_client {
    struct ev_loop *loop;
    CURLM *multi;
    ev_timer timer;
    char *url;
    char *ca_file, *cert_file, *key_file;
    char *auth_header;           /* "authorization: Bearer ..." or NULL */
    char *user_agent;
    size_t max_response;
    uint64_t connect_timeout_ms;
    bool reuse;                  /* keep connections between calls */
    struct call *calls;          /* in flight */
    size_t inflight;
    spk_grpc_client_stats stats;
};

/* ---- libcurl's event hooks -------------------------------------------------------------- */

static void collect_done(spk_grpc_client *c);

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    struct sock *sk = (struct sock *)w;
    spk_grpc_client *c = sk->c;
    int flags = (revents & EV_READ ? CURL_CSELECT_IN : 0) |
                (revents & EV_WRITE ? CURL_CSELECT_OUT : 0);
    int running;
    (void)loop;
    curl_multi_socket_action(c->multi, w->fd, flags, &running);
    collect_done(c);
}

static void on_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    spk_grpc_client *c = w->data;
    int running;
    (void)loop, (void)revents;
    curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    collect_done(c);
}

static int on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    spk_grpc_client *c = userp;
    struct sock *sk = socketp;
    (void)easy;
    if (what == CURL_POLL_REMOVE) {
        if (sk != NULL) {
            ev_io_stop(c->loop, &sk->io);
            curl_multi_assign(c->multi, fd, NULL);
            free(sk);
        }
        return 0;
    }
    if (sk == NULL) {
        sk = calloc(1, sizeof(*sk));
        if (sk == NULL)
            return -1; /* libcurl fails the transfer: CURLM_OUT_OF_MEMORY */
        sk->c = c;
        curl_multi_assign(c->multi, fd, sk);
    } else {
        ev_io_stop(c->loop, &sk->io);
    }
    int ev = (what & CURL_POLL_IN ? EV_READ : 0) | (what & CURL_POLL_OUT ? EV_WRITE : 0);
    ev_io_init(&sk->io, on_io, fd, ev);
    ev_io_start(c->loop, &sk->io);
    return 0;
}

/* libcurl asks to be woken after timeout_ms (-1: never). It must not be called back from
 * inside this function, so even 0 goes through the loop. */
static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
    spk_grpc_client *c = userp;
    (void)multi;
    ev_timer_stop(c->loop, &c->timer);
    if (timeout_ms >= 0) {
        ev_timer_set(&c->timer, (double)timeout_ms / 1000.0, 0.0);
        ev_timer_start(c->loop, &c->timer);
    }
    return 0;
}

/* ---- one call ------------------------------------------------------------------------------ */

static size_t on_write(char *data, size_t size, size_t n, void *userp)
{
    struct call *k = userp;
    size_t len = size * n;
    spk_grpc_code rc = spk_grpc_body_append(&k->body, data, len, &k->eb);
    if (rc != SPK_GRPC_OK) {
        k->body_status = rc;
        return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
    }
    return len;
}

/* Header lines, trailers included: "name: value\r\n". */
static size_t on_header(char *line, size_t size, size_t n, void *userp)
{
    struct call *k = userp;
    size_t len = size * n;
    const char *colon = memchr(line, ':', len);
    if (colon == NULL)
        return len;
    size_t nlen = (size_t)(colon - line);
    const char *v = colon + 1;
    const char *end = line + len;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' '))
        end--;
    size_t vlen = (size_t)(end - v);
    if (nlen == 11 && strncasecmp(line, "grpc-status", 11) == 0) {
        int code = 0;
        bool ok = vlen > 0 && vlen <= 3;
        for (size_t i = 0; ok && i < vlen; i++) {
            ok = v[i] >= '0' && v[i] <= '9';
            code = code * 10 + (v[i] - '0');
        }
        k->grpc_status = ok ? code : SPK_GRPC_UNKNOWN;
    } else if (nlen == 12 && strncasecmp(line, "grpc-message", 12) == 0) {
        spk_grpc_message_decode(v, vlen, k->grpc_message, sizeof(k->grpc_message));
    }
    return len;
}

/* PROTOCOL-HTTP2.md, "HTTP to gRPC Status Code Mapping", for answers without grpc-status. */
static int http_to_grpc(long http)
{
    switch (http) {
    case 400: return SPK_GRPC_INTERNAL;
    case 401: return SPK_GRPC_UNAUTHENTICATED;
    case 403: return SPK_GRPC_PERMISSION_DENIED;
    case 404: return SPK_GRPC_UNIMPLEMENTED;
    case 429:
    case 502:
    case 503:
    case 504: return SPK_GRPC_UNAVAILABLE;
    default: return SPK_GRPC_UNKNOWN;
    }
}

static void call_free(struct call *k)
{
    spk_grpc_client *c = k->c;
    if (k->prev != NULL)
        k->prev->next = k->next;
    else
        c->calls = k->next;
    if (k->next != NULL)
        k->next->prev = k->prev;
    c->inflight--;
    curl_multi_remove_handle(c->multi, k->easy);
    curl_easy_cleanup(k->easy);
    curl_slist_free_all(k->headers);
    spk_grpc_body_free(&k->body);
    free(k);
}

static void call_finish(struct call *k, CURLcode cc)
{
    spk_grpc_client *c = k->c;
    spk_grpc_result r = {.status = SPK_GRPC_UNKNOWN, .message = ""};
    char msg[1200];
    long connects = 0;
    curl_easy_getinfo(k->easy, CURLINFO_RESPONSE_CODE, &r.http_status);
    curl_easy_getinfo(k->easy, CURLINFO_NUM_CONNECTS, &connects);
    r.new_connection = connects > 0;
    r.seconds = ev_time() - k->t0;
    c->stats.calls++;
    c->stats.connections += (uint64_t)connects;

    if (k->body_status != SPK_GRPC_OK) {
        r.status = k->body_status;
        snprintf(msg, sizeof(msg), "response refused: %s", k->eb.msg);
    } else if (cc == CURLE_OPERATION_TIMEDOUT) {
        r.status = SPK_GRPC_DEADLINE_EXCEEDED;
        snprintf(msg, sizeof(msg), "deadline exceeded: %s", k->curl_error);
    } else if (cc != CURLE_OK) {
        r.status = SPK_GRPC_UNAVAILABLE;
        snprintf(msg, sizeof(msg), "%s: %s", curl_easy_strerror(cc),
                 k->curl_error[0] != '\0' ? k->curl_error : "no detail");
    } else if (r.http_status != 200) {
        r.status = k->grpc_status >= 0 ? k->grpc_status : http_to_grpc(r.http_status);
        snprintf(msg, sizeof(msg), "HTTP status %ld%s%s", r.http_status,
                 k->grpc_message[0] != '\0' ? ": " : "", k->grpc_message);
    } else if (k->grpc_status < 0) {
        r.status = SPK_GRPC_INTERNAL;
        snprintf(msg, sizeof(msg), "the response carried no grpc-status (stream reset?)");
    } else if (k->grpc_status != SPK_GRPC_OK) {
        r.status = k->grpc_status;
        snprintf(msg, sizeof(msg), "%s", k->grpc_message[0] != '\0' ? k->grpc_message
                                                                   : spk_grpc_code_name(r.status));
    } else {
        spk_errbuf eb;
        spk_grpc_code rc = spk_grpc_body_finish(&k->body, &r.msg, &r.msg_len, &eb);
        if (rc != SPK_GRPC_OK) {
            r.status = SPK_GRPC_INTERNAL;
            r.msg = NULL;
            r.msg_len = 0;
            snprintf(msg, sizeof(msg), "grpc-status 0 but the response is bad: %s", eb.msg);
        } else {
            r.status = SPK_GRPC_OK;
            msg[0] = '\0';
        }
    }
    r.message = msg;
    spk_grpc_done done = k->done;
    void *arg = k->arg;
    /* The callback may start the next call; this one's handles are freed after it, and the
     * body it borrows lives until then. */
    curl_multi_remove_handle(c->multi, k->easy);
    done(arg, &r);
    call_free(k);
}

static void collect_done(spk_grpc_client *c)
{
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(c->multi, &left)) != NULL) {
        if (m->msg != CURLMSG_DONE)
            continue;
        struct call *k = NULL;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&k);
        if (k != NULL)
            call_finish(k, m->data.result);
    }
}

/* ---- the client ------------------------------------------------------------------------ */

static int dup_opt(const char *s, char **out)
{
    *out = NULL;
    if (s == NULL)
        return 0;
    *out = strdup(s);
    return *out != NULL ? 0 : SPK_ENOMEM;
}

int spk_grpc_client_new(struct ev_loop *loop, const spk_grpc_client_opts *o,
                        spk_grpc_client **out, spk_errbuf *eb)
{
    *out = NULL;
    if (o == NULL || o->url == NULL)
        return spk_errf(eb, SPK_EINVAL, "uplink: no URL");
    bool tls = strncmp(o->url, "https://", 8) == 0;
    if (!tls && strncmp(o->url, "http://", 7) != 0)
        return spk_errf(eb, SPK_EINVAL, "uplink: URL '%.200s' is neither http:// nor https://",
                        o->url);
    if ((o->cert_file == NULL) != (o->key_file == NULL))
        return spk_errf(eb, SPK_EINVAL, "uplink: a client certificate needs its key, and a key "
                        "its certificate (set both or neither)");
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return spk_errf(eb, SPK_EIO, "uplink: libcurl failed to initialise");

    spk_grpc_client *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        curl_global_cleanup();
        return spk_errf(eb, SPK_ENOMEM, "uplink: out of memory");
    }
    c->loop = loop;
    c->max_response = o->max_response != 0 ? o->max_response : DEFAULT_MAX_RESPONSE;
    c->connect_timeout_ms = o->connect_timeout_ms != 0 ? o->connect_timeout_ms
                                                       : DEFAULT_CONNECT_TIMEOUT_MS;
    /* See CONNECTIONS in grpc_client.h. */
    c->reuse = tls || curl_version_info(CURLVERSION_NOW)->version_num >= 0x080000;
    int rc = dup_opt(o->url, &c->url);
    rc = rc != 0 ? rc : dup_opt(o->ca_file, &c->ca_file);
    rc = rc != 0 ? rc : dup_opt(o->cert_file, &c->cert_file);
    rc = rc != 0 ? rc : dup_opt(o->key_file, &c->key_file);
    if (rc == 0) {
        char ua[128];
        snprintf(ua, sizeof(ua), "spoke/%s", SPOKE_VERSION);
        rc = dup_opt(o->user_agent != NULL ? o->user_agent : ua, &c->user_agent);
    }
    if (rc == 0 && o->token != NULL) {
        size_t n = strlen(o->token) + 32;
        c->auth_header = malloc(n);
        if (c->auth_header == NULL)
            rc = SPK_ENOMEM;
        else
            snprintf(c->auth_header, n, "authorization: Bearer %s", o->token);
    }
    if (rc == 0 && (c->multi = curl_multi_init()) == NULL)
        rc = SPK_ENOMEM;
    if (rc != 0) {
        spk_grpc_client_free(c);
        return spk_errf(eb, rc, "uplink: out of memory");
    }
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c);
    curl_multi_setopt(c->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    ev_timer_init(&c->timer, on_timeout, 0.0, 0.0);
    c->timer.data = c;
    *out = c;
    return 0;
}

void spk_grpc_client_free(spk_grpc_client *c)
{
    if (c == NULL)
        return;
    while (c->calls != NULL)
        call_free(c->calls);
    if (c->multi != NULL) {
        curl_multi_cleanup(c->multi); /* closes connections; on_socket frees their ev_io */
        ev_timer_stop(c->loop, &c->timer);
        curl_global_cleanup();
    } else {
        curl_global_cleanup();
    }
    free(c->url);
    free(c->ca_file);
    free(c->cert_file);
    free(c->key_file);
    free(c->auth_header);
    free(c->user_agent);
    free(c);
}

size_t spk_grpc_client_inflight(const spk_grpc_client *c)
{
    return c->inflight;
}

void spk_grpc_client_stats_get(const spk_grpc_client *c, spk_grpc_client_stats *st)
{
    *st = c->stats;
}

static int easy_setup(spk_grpc_client *c, struct call *k, const char *path, uint8_t *buf,
                      size_t msg_len, uint64_t timeout_ms)
{
    char url[1024];
    size_t ulen = strlen(c->url);
    while (ulen > 0 && c->url[ulen - 1] == '/')
        ulen--;
    if ((size_t)snprintf(url, sizeof(url), "%.*s%s", (int)ulen, c->url, path) >= sizeof(url))
        return spk_errf(&k->eb, SPK_EINVAL, "uplink: URL too long");
    char tmo[32], tmo_hdr[64];
    snprintf(tmo_hdr, sizeof(tmo_hdr), "grpc-timeout: %s",
             spk_grpc_timeout_format(timeout_ms, tmo, sizeof(tmo)));
    const char *hdrs[] = {"content-type: " SPK_GRPC_CONTENT_TYPE, "te: trailers", tmo_hdr,
                          "Expect:", c->auth_header};
    for (size_t i = 0; i < sizeof(hdrs) / sizeof(hdrs[0]); i++) {
        if (hdrs[i] == NULL)
            continue;
        struct curl_slist *l = curl_slist_append(k->headers, hdrs[i]);
        if (l == NULL)
            return spk_errf(&k->eb, SPK_ENOMEM, "uplink: out of memory");
        k->headers = l;
    }
    CURL *e = k->easy;
    CURLcode cc = CURLE_OK;
#define SET(opt, val)                                                                      \
    do {                                                                                   \
        if (cc == CURLE_OK)                                                                \
            cc = curl_easy_setopt(e, opt, val);                                            \
    } while (0)
    SET(CURLOPT_URL, url);
    SET(CURLOPT_PRIVATE, (char *)k);
    SET(CURLOPT_HTTP_VERSION, strncmp(c->url, "https://", 8) == 0
                                  ? (long)CURL_HTTP_VERSION_2TLS
                                  : (long)CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE);
    SET(CURLOPT_POST, 1L);
    SET(CURLOPT_POSTFIELDS, (char *)buf);
    SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)(SPK_GRPC_PREFIX + msg_len));
    SET(CURLOPT_HTTPHEADER, k->headers);
    SET(CURLOPT_USERAGENT, c->user_agent);
    SET(CURLOPT_WRITEFUNCTION, on_write);
    SET(CURLOPT_WRITEDATA, k);
    SET(CURLOPT_HEADERFUNCTION, on_header);
    SET(CURLOPT_HEADERDATA, k);
    SET(CURLOPT_ERRORBUFFER, k->curl_error);
    SET(CURLOPT_TIMEOUT_MS, (long)timeout_ms);
    SET(CURLOPT_CONNECTTIMEOUT_MS, (long)c->connect_timeout_ms);
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_PIPEWAIT, 1L);
    SET(CURLOPT_TCP_NODELAY, 1L);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    if (!c->reuse) {
        SET(CURLOPT_FRESH_CONNECT, 1L);
        SET(CURLOPT_FORBID_REUSE, 1L);
    }
    if (c->ca_file != NULL)
        SET(CURLOPT_CAINFO, c->ca_file);
    if (c->cert_file != NULL) {
        SET(CURLOPT_SSLCERT, c->cert_file);
        SET(CURLOPT_SSLKEY, c->key_file);
    }
#undef SET
    if (cc != CURLE_OK)
        return spk_errf(&k->eb, SPK_EIO, "uplink: libcurl refused an option: %s",
                        curl_easy_strerror(cc));
    return 0;
}

int spk_grpc_client_call(spk_grpc_client *c, const char *path, uint8_t *buf, size_t msg_len,
                         uint64_t timeout_ms, spk_grpc_done done, void *arg, spk_errbuf *eb)
{
    if (msg_len > UINT32_MAX || timeout_ms == 0 || path == NULL || path[0] != '/')
        return spk_errf(eb, SPK_EINVAL, "uplink: bad call arguments");
    struct call *k = calloc(1, sizeof(*k));
    if (k == NULL)
        return spk_errf(eb, SPK_ENOMEM, "uplink: out of memory");
    k->c = c;
    k->done = done;
    k->arg = arg;
    k->grpc_status = -1;
    k->t0 = ev_time();
    spk_grpc_body_init(&k->body, c->max_response);
    spk_grpc_prefix(buf, (uint32_t)msg_len);
    int rc;
    if ((k->easy = curl_easy_init()) == NULL) {
        rc = spk_errf(eb, SPK_ENOMEM, "uplink: out of memory");
    } else if ((rc = easy_setup(c, k, path, buf, msg_len, timeout_ms)) != 0) {
        if (eb != NULL)
            *eb = k->eb;
    } else if (curl_multi_add_handle(c->multi, k->easy) != CURLM_OK) {
        rc = spk_errf(eb, SPK_EIO, "uplink: libcurl would not start the call");
    }
    if (rc != 0) {
        if (k->easy != NULL)
            curl_easy_cleanup(k->easy);
        curl_slist_free_all(k->headers);
        free(k);
        return rc;
    }
    k->next = c->calls;
    if (c->calls != NULL)
        c->calls->prev = k;
    c->calls = k;
    c->inflight++;
    return 0;
}
