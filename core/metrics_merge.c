/*
 * metrics_merge.c -- the metrics merger (see metrics_merge.h).
 *
 * A source is one plugin's socket. Its scrape is a little state machine on the loop:
 * connect (non-blocking) -> writable: send the request -> readable: read to EOF -> parse.
 * A deadline timer ends a scrape that takes too long. The parse turns the text into
 * blocks, one per metric family, each holding its HELP, its TYPE and its samples already
 * relabelled; rendering walks every source's blocks and writes each family once.
 */
#include "metrics_merge.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"

typedef struct block {
    char name[160];
    char type[12];     /* "untyped" until a TYPE line says otherwise */
    char *help;        /* the HELP line's text, or NULL */
    spk_mbuf samples;  /* relabelled sample lines */
} block;

typedef struct parsed {
    block *b;
    size_t n, cap;
} parsed;

enum { MR_OK, MR_SLOW, MR_GONE, MR_GARBAGE, MR_N };
static const char *const result_names[MR_N] = {"ok", "slow", "gone", "garbage"};

typedef struct source {
    spk_merger *m;
    char *name, *path;
    int fd; /* -1: no scrape in flight */
    bool sent;
    ev_io io;
    ev_timer deadline;
    spk_mbuf in;
    parsed last;
    bool have;      /* `last` is from the latest scrape, which succeeded */
    unsigned fails_in_row;
    uint64_t results[MR_N];
} source;

struct spk_merger {
    struct ev_loop *loop;
    ev_timer tick;
    uint64_t period_ms;
    source **src;
    size_t n;
};

/* ---- parsing ------------------------------------------------------------------------- */

static void parsed_free(parsed *p)
{
    for (size_t i = 0; i < p->n; i++) {
        free(p->b[i].help);
        free(p->b[i].samples.p);
    }
    free(p->b);
    memset(p, 0, sizeof(*p));
}

static block *block_find(parsed *p, const char *name, size_t len)
{
    for (size_t i = 0; i < p->n; i++)
        if (strlen(p->b[i].name) == len && memcmp(p->b[i].name, name, len) == 0)
            return &p->b[i];
    return NULL;
}

static block *block_new(parsed *p, const char *name, size_t len)
{
    if (len >= sizeof(p->b[0].name))
        return NULL;
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 16;
        block *nb = realloc(p->b, cap * sizeof(*nb));
        if (nb == NULL)
            return NULL;
        p->b = nb;
        p->cap = cap;
    }
    block *b = &p->b[p->n++];
    memset(b, 0, sizeof(*b));
    memcpy(b->name, name, len);
    snprintf(b->type, sizeof(b->type), "untyped");
    return b;
}

static size_t name_len(const char *s, size_t n, bool colon)
{
    size_t i = 0;
    while (i < n) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                  (colon && c == ':') || (i > 0 && c >= '0' && c <= '9');
        if (!ok)
            break;
        i++;
    }
    return i;
}

static bool suffix_is(const char *s, size_t n, const block *b, const char *suffix)
{
    size_t bl = strlen(b->name), sl = strlen(suffix);
    return n == bl + sl && memcmp(s, b->name, bl) == 0 && memcmp(s + bl, suffix, sl) == 0;
}

/* Does sample name s[0..n) belong to family b? */
static bool belongs(const block *b, const char *s, size_t n)
{
    if (strlen(b->name) == n && memcmp(s, b->name, n) == 0)
        return true;
    if (strcmp(b->type, "histogram") == 0 || strcmp(b->type, "summary") == 0)
        return suffix_is(s, n, b, "_bucket") || suffix_is(s, n, b, "_sum") ||
               suffix_is(s, n, b, "_count") || suffix_is(s, n, b, "_created");
    if (strcmp(b->type, "counter") == 0)
        return suffix_is(s, n, b, "_total") || suffix_is(s, n, b, "_created");
    return false;
}

/* Does an earlier family own sample name s[0..n)? (Its samples are then not together.) */
static bool block_owning(const parsed *p, const char *s, size_t n)
{
    for (size_t i = 0; i < p->n; i++)
        if (belongs(&p->b[i], s, n))
            return true;
    return false;
}

static bool value_ok(const char *s, size_t n)
{
    char tmp[64];
    if (n == 0 || n >= sizeof(tmp))
        return false;
    memcpy(tmp, s, n);
    tmp[n] = '\0';
    if (strcmp(tmp, "+Inf") == 0 || strcmp(tmp, "-Inf") == 0 || strcmp(tmp, "Inf") == 0 ||
        strcmp(tmp, "NaN") == 0)
        return true;
    char *end;
    strtod(tmp, &end);
    return *end == '\0' && (tmp[0] == '-' || tmp[0] == '+' || tmp[0] == '.' ||
                            (tmp[0] >= '0' && tmp[0] <= '9'));
}

static bool int_ok(const char *s, size_t n)
{
    size_t i = (n > 0 && s[0] == '-') ? 1 : 0;
    if (i == n)
        return false;
    for (; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return true;
}

/* One sample line into b's samples, relabelled. Returns NULL or what is wrong. */
static const char *relabel_sample(const char *plugin, const char *l, size_t n, size_t nl,
                                  spk_mbuf *o)
{
    spk_mbuf_add(o, l, nl);
    spk_mbuf_add(o, "{plugin=\"", 9);
    spk_mbuf_label_value(o, plugin);
    spk_mbuf_add(o, "\"", 1);
    size_t i = nl;
    if (i < n && l[i] == '{') {
        i++;
        for (;;) {
            while (i < n && l[i] == ' ')
                i++;
            if (i < n && l[i] == '}')
                break;
            size_t ln = name_len(l + i, n - i, false);
            if (ln == 0)
                return "a label name is not valid";
            bool rename = ln == 6 && memcmp(l + i, "plugin", 6) == 0;
            spk_mbuf_add(o, ",", 1);
            if (rename)
                spk_mbuf_add(o, "exported_", 9);
            spk_mbuf_add(o, l + i, ln);
            i += ln;
            if (i + 1 >= n || l[i] != '=' || l[i + 1] != '"')
                return "a label has no =\"value\"";
            i += 2;
            size_t v0 = i;
            while (i < n && l[i] != '"') {
                if (l[i] == '\\') {
                    if (i + 1 >= n || (l[i + 1] != '\\' && l[i + 1] != '"' && l[i + 1] != 'n'))
                        return "a label value has a bad escape";
                    i++;
                }
                i++;
            }
            if (i >= n)
                return "a label value is not closed";
            spk_mbuf_add(o, "=\"", 2);
            spk_mbuf_add(o, l + v0, i - v0);
            spk_mbuf_add(o, "\"", 1);
            i++;
            while (i < n && l[i] == ' ')
                i++;
            if (i < n && l[i] == ',') {
                i++;
                continue;
            }
            if (i < n && l[i] == '}')
                break;
            return "labels are not separated by commas";
        }
        i++; /* '}' */
    }
    spk_mbuf_add(o, "} ", 2);
    if (i >= n || l[i] != ' ')
        return "no value after the name";
    while (i < n && l[i] == ' ')
        i++;
    size_t v0 = i;
    while (i < n && l[i] != ' ')
        i++;
    if (!value_ok(l + v0, i - v0))
        return "the value is not a number";
    spk_mbuf_add(o, l + v0, i - v0);
    spk_mbuf_add(o, "\n", 1);
    while (i < n && l[i] == ' ')
        i++;
    size_t t0 = i;
    while (i < n && l[i] != ' ')
        i++;
    if (i > t0 && !int_ok(l + t0, i - t0))
        return "the timestamp is not an integer";
    while (i < n && l[i] == ' ')
        i++;
    return i == n ? NULL : "text after the timestamp";
}

static const char *meta_line(parsed *p, block **cur, const char *l, size_t n)
{
    bool help = l[2] == 'H';
    size_t i = 7;
    size_t nn = name_len(l + i, n - i, true);
    if (nn == 0)
        return "a HELP or TYPE line names no metric";
    const char *name = l + i;
    if (nn >= 6 && memcmp(name, "spoke_", 6) == 0)
        return "a family is named spoke_* (the host's)";
    i += nn;
    if (i < n && l[i] != ' ')
        return "a metric name is not valid";
    while (i < n && l[i] == ' ')
        i++;
    block *b = *cur && strlen((*cur)->name) == nn && memcmp((*cur)->name, name, nn) == 0 &&
                       (*cur)->samples.len == 0
                   ? *cur
                   : NULL;
    if (b == NULL) {
        if (block_find(p, name, nn) != NULL)
            return "a family appears twice";
        if ((b = block_new(p, name, nn)) == NULL)
            return "out of memory (or a name too long)";
    }
    *cur = b;
    if (help) {
        if (b->help != NULL)
            return "two HELP lines for one family";
        b->help = strndup(l + i, n - i);
        return b->help ? NULL : "out of memory";
    }
    static const char *const types[] = {"counter", "gauge", "histogram", "summary", "untyped"};
    for (size_t k = 0; k < sizeof(types) / sizeof(types[0]); k++) {
        if (n - i == strlen(types[k]) && memcmp(l + i, types[k], n - i) == 0) {
            snprintf(b->type, sizeof(b->type), "%s", types[k]);
            return NULL;
        }
    }
    return "an unknown TYPE";
}

static int parse_text(const char *plugin, const char *text, size_t len, parsed *p,
                      spk_errbuf *eb)
{
    const char *end = text + len;
    block *cur = NULL;
    int line = 0;
    for (const char *l = text; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l));
        size_t n = nl ? (size_t)(nl - l) : (size_t)(end - l);
        const char *next = nl ? nl + 1 : end;
        line++;
        if (n > 0 && l[n - 1] == '\r')
            n--;
        const char *bad = NULL;
        if (memchr(l, '\0', n) != NULL) {
            bad = "a NUL byte";
        } else if (n == 0) {
        } else if (n >= 7 && (strncmp(l, "# HELP ", 7) == 0 || strncmp(l, "# TYPE ", 7) == 0)) {
            bad = meta_line(p, &cur, l, n);
        } else if (l[0] == '#') {
        } else {
            size_t sn = name_len(l, n, true);
            if (sn == 0) {
                bad = "a line is neither a comment nor a sample";
            } else if (sn >= 6 && memcmp(l, "spoke_", 6) == 0) {
                bad = "a sample is named spoke_* (the host's)";
            } else {
                if (cur == NULL || !belongs(cur, l, sn)) {
                    if (block_owning(p, l, sn))
                        bad = "the samples of a family are not together";
                    else if ((cur = block_new(p, l, sn)) == NULL)
                        bad = "out of memory (or a name too long)";
                }
                if (bad == NULL)
                    bad = relabel_sample(plugin, l, n, sn, &cur->samples);
                if (bad == NULL && cur->samples.failed)
                    bad = "out of memory";
            }
        }
        if (bad != NULL) {
            spk_errf(eb, SPK_ECORRUPT, "line %d: %s: %.80s", line, bad, l);
            return SPK_ECORRUPT;
        }
        l = next;
    }
    return 0;
}

/* The body of an HTTP response (status 200 required), or the text itself. */
static const char *http_body(const char *text, size_t len, size_t *blen, spk_errbuf *eb)
{
    if (len < 5 || memcmp(text, "HTTP/", 5) != 0) {
        *blen = len;
        return text;
    }
    const char *sp = memchr(text, ' ', len);
    if (sp == NULL || (size_t)(text + len - sp) < 4 || memcmp(sp + 1, "200", 3) != 0) {
        spk_errf(eb, SPK_ECORRUPT, "HTTP status is not 200: %.40s", text);
        return NULL;
    }
    for (const char *q = text; q + 1 < text + len; q++) {
        if (q[0] == '\n' && (q[1] == '\n' || (q[1] == '\r' && q + 2 < text + len && q[2] == '\n'))) {
            const char *b = q + (q[1] == '\n' ? 2 : 3);
            *blen = (size_t)(text + len - b);
            return b;
        }
    }
    spk_errf(eb, SPK_ECORRUPT, "HTTP response without the end of its headers");
    return NULL;
}

int spk_merger_check_text(const char *name, const char *text, size_t len, spk_mbuf *out,
                          spk_errbuf *eb)
{
    size_t blen;
    const char *body = http_body(text, len, &blen, eb);
    if (body == NULL)
        return SPK_ECORRUPT;
    parsed p = {0};
    int rc = parse_text(name, body, blen, &p, eb);
    for (size_t i = 0; rc == 0 && out != NULL && i < p.n; i++) {
        if (p.b[i].help)
            spk_mbuf_printf(out, "# HELP %s %s\n", p.b[i].name, p.b[i].help);
        spk_mbuf_printf(out, "# TYPE %s %s\n", p.b[i].name, p.b[i].type);
        spk_mbuf_add(out, p.b[i].samples.p ? p.b[i].samples.p : "", p.b[i].samples.len);
    }
    parsed_free(&p);
    return rc;
}

/* ---- scraping ------------------------------------------------------------------------- */

static void scrape_close(source *s)
{
    ev_io_stop(s->m->loop, &s->io);
    ev_timer_stop(s->m->loop, &s->deadline);
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
    s->sent = false;
    free(s->in.p);
    memset(&s->in, 0, sizeof(s->in));
}

/* A scrape ended. Logged once per change of state: the first failure after a success
 * (or the third in a row of a socket that never answered: a plugin starting up may not
 * have bound it yet), and the first success after failures. */
static void scrape_done(source *s, int result, const char *why)
{
    scrape_close(s);
    s->results[result]++;
    if (result != MR_OK) {
        s->fails_in_row++;
        if (s->fails_in_row == (s->results[MR_OK] > 0 ? 1u : 3u))
            spk_warn("metrics merger: plugin %s: %s %s: %s; its metrics are left out until a "
                     "scrape succeeds", s->name, result_names[result], s->path, why);
        parsed_free(&s->last);
        s->have = false;
        return;
    }
    if (s->fails_in_row >= (s->results[MR_OK] > 1 ? 1u : 3u))
        spk_info("metrics merger: plugin %s: %s answers again", s->name, s->path);
    s->fails_in_row = 0;
}

static void scrape_parse(source *s)
{
    spk_errbuf eb;
    size_t blen;
    const char *body = http_body(s->in.p ? s->in.p : "", s->in.len, &blen, &eb);
    parsed p = {0};
    if (body == NULL || parse_text(s->name, body, blen, &p, &eb) != 0) {
        parsed_free(&p);
        scrape_done(s, MR_GARBAGE, eb.msg);
        return;
    }
    parsed_free(&s->last);
    s->last = p;
    s->have = true;
    scrape_done(s, MR_OK, "");
}

static void on_scrape_io(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    source *s = w->data;
    if (!s->sent) {
        int err = 0;
        socklen_t el = sizeof(err);
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        static const char req[] = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n"
                                  "Accept: text/plain\r\n\r\n";
        if (err != 0 || send(s->fd, req, sizeof(req) - 1, MSG_NOSIGNAL) != sizeof(req) - 1) {
            scrape_done(s, MR_GONE, strerror(err ? err : errno));
            return;
        }
        s->sent = true;
        ev_io_stop(loop, &s->io);
        ev_io_set(&s->io, s->fd, EV_READ);
        ev_io_start(loop, &s->io);
        return;
    }
    for (;;) {
        char buf[65536];
        ssize_t n = recv(s->fd, buf, sizeof(buf), 0);
        if (n > 0) {
            if (s->in.len + (size_t)n > SPK_MERGE_MAX_BYTES) {
                scrape_done(s, MR_GARBAGE, "answer over 4 MiB");
                return;
            }
            spk_mbuf_add(&s->in, buf, (size_t)n);
            if (s->in.failed) {
                scrape_done(s, MR_GARBAGE, "out of memory");
                return;
            }
            continue;
        }
        if (n == 0) {
            scrape_parse(s);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            scrape_done(s, MR_GONE, strerror(errno));
        return;
    }
}

static void on_scrape_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    source *s = w->data;
    scrape_done(s, MR_SLOW, s->sent ? "no complete answer in time" : "connect not done in time");
}

static void scrape_start(source *s)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(s->path) >= sizeof(a.sun_path)) {
        scrape_done(s, MR_GONE, "socket path too long");
        return;
    }
    memcpy(a.sun_path, s->path, strlen(s->path) + 1);
    s->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        scrape_done(s, MR_GONE, strerror(errno));
        return;
    }
    if (connect(s->fd, (struct sockaddr *)&a, sizeof(a)) != 0 && errno != EINPROGRESS &&
        errno != EAGAIN) {
        scrape_done(s, MR_GONE, strerror(errno));
        return;
    }
    double limit = (double)s->m->period_ms / 1000.0;
    if (limit > SPK_MERGE_TIMEOUT_S)
        limit = SPK_MERGE_TIMEOUT_S;
    ev_io_init(&s->io, on_scrape_io, s->fd, EV_WRITE);
    s->io.data = s;
    ev_io_start(s->m->loop, &s->io);
    ev_timer_init(&s->deadline, on_scrape_deadline, limit, 0);
    s->deadline.data = s;
    ev_timer_start(s->m->loop, &s->deadline);
}

static void on_tick(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    spk_merger *m = w->data;
    for (size_t i = 0; i < m->n; i++)
        if (m->src[i]->fd < 0)
            scrape_start(m->src[i]);
}

/* ---- sources -------------------------------------------------------------------------- */

static void source_free(source *s)
{
    if (s == NULL)
        return;
    scrape_close(s);
    parsed_free(&s->last);
    free(s->name);
    free(s->path);
    free(s);
}

spk_merger *spk_merger_new(struct ev_loop *loop, uint64_t period_ms)
{
    spk_merger *m = calloc(1, sizeof(*m));
    if (m == NULL)
        return NULL;
    m->loop = loop;
    m->period_ms = period_ms;
    ev_timer_init(&m->tick, on_tick, 0, (double)period_ms / 1000.0);
    m->tick.data = m;
    return m;
}

void spk_merger_free(spk_merger *m)
{
    if (m == NULL)
        return;
    ev_timer_stop(m->loop, &m->tick);
    for (size_t i = 0; i < m->n; i++)
        source_free(m->src[i]);
    free(m->src);
    free(m);
}

int spk_merger_set_sources(spk_merger *m, const char *const *names, const char *const *paths,
                           size_t n, uint64_t period_ms)
{
    source **v = n ? calloc(n, sizeof(*v)) : NULL;
    if (n && v == NULL)
        return SPK_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < m->n; j++) {
            source *o = m->src[j];
            if (o != NULL && strcmp(o->name, names[i]) == 0 && strcmp(o->path, paths[i]) == 0) {
                v[i] = o;
                m->src[j] = NULL;
                break;
            }
        }
        if (v[i] != NULL)
            continue;
        source *s = calloc(1, sizeof(*s));
        if (s == NULL || (s->name = strdup(names[i])) == NULL ||
            (s->path = strdup(paths[i])) == NULL) {
            if (s != NULL) {
                free(s->name);
                free(s);
            }
            for (size_t k = 0; k < i; k++) /* put the kept ones back */
                for (size_t j = 0; j < m->n; j++)
                    if (m->src[j] == NULL) {
                        m->src[j] = v[k];
                        break;
                    }
            free(v);
            return SPK_ENOMEM;
        }
        s->m = m;
        s->fd = -1;
        v[i] = s;
    }
    for (size_t j = 0; j < m->n; j++)
        source_free(m->src[j]);
    free(m->src);
    m->src = v;
    m->n = n;
    if (period_ms != m->period_ms || !ev_is_active(&m->tick)) {
        m->period_ms = period_ms;
        ev_timer_stop(m->loop, &m->tick);
        ev_timer_set(&m->tick, 0, (double)period_ms / 1000.0);
        if (n > 0)
            ev_timer_start(m->loop, &m->tick);
    }
    if (n == 0)
        ev_timer_stop(m->loop, &m->tick);
    return 0;
}

/* ---- rendering ------------------------------------------------------------------------ */

void spk_merger_render(const spk_merger *m, spk_mbuf *out)
{
    uint64_t conflicts = 0;
    for (size_t i = 0; m != NULL && i < m->n; i++) {
        const source *s = m->src[i];
        for (size_t b = 0; s->have && b < s->last.n; b++) {
            const block *bl = &s->last.b[b];
            bool seen = false;
            for (size_t k = 0; k < i && !seen; k++) {
                const source *e = m->src[k];
                for (size_t j = 0; e->have && j < e->last.n && !seen; j++)
                    seen = strcmp(e->last.b[j].name, bl->name) == 0;
            }
            if (seen)
                continue;
            if (bl->help)
                spk_mbuf_printf(out, "# HELP %s %s\n", bl->name, bl->help);
            spk_mbuf_printf(out, "# TYPE %s %s\n", bl->name, bl->type);
            spk_mbuf_add(out, bl->samples.p ? bl->samples.p : "", bl->samples.len);
            for (size_t k = i + 1; k < m->n; k++) {
                const source *e = m->src[k];
                for (size_t j = 0; e->have && j < e->last.n; j++) {
                    const block *o = &e->last.b[j];
                    if (strcmp(o->name, bl->name) != 0)
                        continue;
                    if (strcmp(o->type, bl->type) != 0)
                        conflicts++;
                    else
                        spk_mbuf_add(out, o->samples.p ? o->samples.p : "", o->samples.len);
                }
            }
        }
    }
    spk_mbuf_printf(out, "# HELP spoke_metrics_merge_scrapes_total Scrapes of the plugins' "
                         "metrics sockets, by result.\n"
                         "# TYPE spoke_metrics_merge_scrapes_total counter\n");
    for (size_t i = 0; m != NULL && i < m->n; i++) {
        for (int r = 0; r < MR_N; r++) {
            spk_mbuf_add(out, "spoke_metrics_merge_scrapes_total{plugin=\"", 42);
            spk_mbuf_label_value(out, m->src[i]->name);
            spk_mbuf_printf(out, "\",result=\"%s\"} %llu\n", result_names[r],
                            (unsigned long long)m->src[i]->results[r]);
        }
    }
    spk_mbuf_printf(out, "# HELP spoke_metrics_merge_conflicts Merged families left out: "
                         "another plugin's family of that name has another type.\n"
                         "# TYPE spoke_metrics_merge_conflicts gauge\n"
                         "spoke_metrics_merge_conflicts %llu\n",
                    (unsigned long long)conflicts);
}
