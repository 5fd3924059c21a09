/*
 * log.h -- the host's log: one line per event on stderr, e.g.
 *
 *   2026-11-23T08:40:01.512Z INFO  spoked[1234] worker 0: plugin counter: 3 connections
 *
 * The process tag ("supervisor", "worker 0", "uplink", ...) is set once per process with
 * spk_log_set_tag(). Lines below the level set with spk_log_set_level() are dropped
 * before formatting. Writes are a single write(2) per line, so lines from the processes
 * sharing stderr do not interleave.
 *
 * With `log.format: json` (spk_log_set_format) each line is one JSON object instead, as
 * GatewayD's zerolog writes them:
 *
 *   {"time":"2026-11-23T08:40:01.512Z","level":"info","process":"spoked worker 1.0",
 *    "pid":1234,"plugin":"counter","conn":7,"message":"3 connections"}
 *
 * "plugin" and "conn" appear when the line is a plugin's (its log() or a "log" signal),
 * and a log signal's other fields follow as strings (one named like a fixed key is
 * written as "field.KEY"). A line is at most 4 KiB; a longer message is cut.
 */
#ifndef SPK_LOG_H
#define SPK_LOG_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "spoke.h"

typedef enum spk_log_format { SPK_LOG_TEXT, SPK_LOG_JSON } spk_log_format;

void spk_log_set_level(spoke_log_level level);
void spk_log_set_format(spk_log_format format);
spoke_log_level spk_log_get_level(void);
/* `tag` is copied. */
void spk_log_set_tag(const char *tag);
/* Parse "debug|info|warn|error"; returns 0 or -1. */
int spk_log_parse_level(const char *text, spoke_log_level *out);

void spk_log(spoke_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void spk_logv(spoke_log_level level, const char *prefix, const char *fmt, va_list ap);

/* A line with its structure: the plugin it is about (NULL: the host's own), the
 * connection (0: none) and extra fields (a log signal's; may be NULL when n_fields is 0).
 * Text lines read "plugin NAME: conn N: message". */
typedef struct spk_log_event {
    spoke_log_level level;
    const char *plugin;
    uint64_t conn;
    const spoke_kv *fields;
    size_t n_fields;
} spk_log_event;

void spk_log_eventv(const spk_log_event *e, const char *fmt, va_list ap);
void spk_log_event_f(const spk_log_event *e, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define spk_debug(...) spk_log(SPOKE_LOG_DEBUG, __VA_ARGS__)
#define spk_info(...) spk_log(SPOKE_LOG_INFO, __VA_ARGS__)
#define spk_warn(...) spk_log(SPOKE_LOG_WARN, __VA_ARGS__)
#define spk_error(...) spk_log(SPOKE_LOG_ERROR, __VA_ARGS__)

#endif
