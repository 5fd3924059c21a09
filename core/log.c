/*
 * log.c -- see log.h. Formats into a stack buffer and writes it with one write(2), as a
 * text line or (log.format: json) one JSON object; JSON strings are escaped by
 * spk_json_escape() (core/base/json.h), the project's one escaper.
 */
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "json.h"

#define LINE_MAX_BYTES 4096

static spoke_log_level log_level = SPOKE_LOG_INFO;
static spk_log_format log_format = SPK_LOG_TEXT;
static char log_tag[64] = "spoked";

void spk_log_set_level(spoke_log_level level) { log_level = level; }
spoke_log_level spk_log_get_level(void) { return log_level; }
void spk_log_set_format(spk_log_format format) { log_format = format; }

void spk_log_set_tag(const char *tag)
{
    snprintf(log_tag, sizeof(log_tag), "%s", tag);
}

static const char *const level_names[] = {"debug", "info", "warn", "error"};

int spk_log_parse_level(const char *text, spoke_log_level *out)
{
    for (int i = 0; i < 4; i++) {
        if (strcmp(text, level_names[i]) == 0) {
            *out = (spoke_log_level)i;
            return 0;
        }
    }
    return -1;
}

/* The line being built: bytes in buf[0..n), always with room for the final "\n" or "}\n". */
typedef struct line {
    char buf[LINE_MAX_BYTES];
    size_t n;
} line;

#define LINE_ROOM(l) (sizeof((l)->buf) - 3 - (l)->n)

static void put_raw(line *l, const char *s)
{
    size_t len = strlen(s), room = LINE_ROOM(l);
    if (len > room)
        len = room;
    memcpy(l->buf + l->n, s, len);
    l->n += len;
}

static void put_json_str(line *l, const char *s, size_t len)
{
    if (LINE_ROOM(l) < 3)
        return;
    l->buf[l->n++] = '"';
    l->n += spk_json_escape(l->buf + l->n, LINE_ROOM(l), s, len);
    l->buf[l->n++] = '"';
}

/* ,"key":"value" */
static void put_json_field(line *l, const char *key, const char *value)
{
    put_raw(l, ",");
    put_json_str(l, key, strlen(key));
    put_raw(l, ":");
    put_json_str(l, value, strlen(value));
}

/* The keys every JSON line has; a log signal's field of the same name is written as
 * "field.KEY" so that no key appears twice. */
static int reserved_key(const char *k)
{
    static const char *const keys[] = {"time", "level", "process", "pid", "plugin", "conn",
                                       "message"};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        if (strcmp(k, keys[i]) == 0)
            return 1;
    return 0;
}

static void emit(const spk_log_event *e, const char *fmt, va_list ap)
{
    static const char *const tags[] = {"DEBUG", "INFO ", "WARN ", "ERROR"};
    unsigned lv = (unsigned)e->level < 4 ? (unsigned)e->level : 3;
    char msg[LINE_MAX_BYTES];
    int m = vsnprintf(msg, sizeof(msg), fmt, ap);
    if (m < 0)
        m = 0;
    size_t msg_len = (size_t)m < sizeof(msg) ? (size_t)m : sizeof(msg) - 1;
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    char when[64], tmp[128];
    snprintf(when, sizeof(when), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
             ts.tv_nsec / 1000000);
    line l;
    l.n = 0;
    if (log_format == SPK_LOG_JSON) {
        put_raw(&l, "{\"time\":\"");
        put_raw(&l, when);
        put_raw(&l, "\",\"level\":\"");
        put_raw(&l, level_names[lv]);
        put_raw(&l, "\"");
        put_json_field(&l, "process", log_tag);
        snprintf(tmp, sizeof(tmp), ",\"pid\":%d", (int)getpid());
        put_raw(&l, tmp);
        if (e->plugin != NULL)
            put_json_field(&l, "plugin", e->plugin);
        if (e->conn != 0) {
            snprintf(tmp, sizeof(tmp), ",\"conn\":%llu", (unsigned long long)e->conn);
            put_raw(&l, tmp);
        }
        for (size_t i = 0; i < e->n_fields; i++) {
            const spoke_kv *f = &e->fields[i];
            if (f->key == NULL || f->value == NULL)
                continue;
            if (reserved_key(f->key)) {
                snprintf(tmp, sizeof(tmp), "field.%s", f->key);
                put_json_field(&l, tmp, f->value);
            } else {
                put_json_field(&l, f->key, f->value);
            }
        }
        /* The message last: a long one is cut, the fields before it are whole. */
        put_raw(&l, ",\"message\":");
        put_json_str(&l, msg, msg_len);
        l.buf[l.n++] = '}';
    } else {
        snprintf(tmp, sizeof(tmp), " %s %s[%d]: ", tags[lv], log_tag, (int)getpid());
        put_raw(&l, when);
        put_raw(&l, tmp);
        if (e->plugin != NULL) {
            put_raw(&l, "plugin ");
            put_raw(&l, e->plugin);
            put_raw(&l, ": ");
        }
        if (e->conn != 0) {
            snprintf(tmp, sizeof(tmp), "conn %llu: ", (unsigned long long)e->conn);
            put_raw(&l, tmp);
        }
        size_t before = l.n;
        put_raw(&l, msg);
        if (l.n - before < msg_len || (size_t)m >= sizeof(msg)) {
            l.n = l.n > 3 ? l.n - 3 : 0;
            put_raw(&l, "...");
        }
    }
    l.buf[l.n++] = '\n';
    ssize_t w = write(STDERR_FILENO, l.buf, l.n);
    (void)w;
}

void spk_log_eventv(const spk_log_event *e, const char *fmt, va_list ap)
{
    if (e->level < log_level)
        return;
    emit(e, fmt, ap);
}

void spk_log_event_f(const spk_log_event *e, const char *fmt, ...)
{
    if (e->level < log_level)
        return;
    va_list ap;
    va_start(ap, fmt);
    emit(e, fmt, ap);
    va_end(ap);
}

void spk_logv(spoke_log_level level, const char *prefix, const char *fmt, va_list ap)
{
    if (level < log_level)
        return;
    if (prefix == NULL || prefix[0] == '\0') {
        spk_log_event e = {.level = level};
        emit(&e, fmt, ap);
        return;
    }
    /* A caller's prefix ("worker 0: ") goes in front of the message. */
    char msg[LINE_MAX_BYTES];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    spk_log_event e = {.level = level};
    spk_log_event_f(&e, "%s%s", prefix, msg);
}

void spk_log(spoke_log_level level, const char *fmt, ...)
{
    if (level < log_level)
        return;
    va_list ap;
    va_start(ap, fmt);
    spk_log_event e = {.level = level};
    emit(&e, fmt, ap);
    va_end(ap);
}
