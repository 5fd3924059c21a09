/*
 * log.h -- the host's log: one line per event on stderr, e.g.
 *
 *   2026-11-23T08:40:01.512Z INFO  spoked[1234] worker 0: plugin counter: 3 connections
 *
 * The process tag ("supervisor", "worker 0", "uplink", ...) is set once per process with
 * spk_log_set_tag(). Lines below the level set with spk_log_set_level() are dropped
 * before formatting. Writes are a single write(2) per line, so lines from the processes
 * sharing stderr do not interleave.
 */
#ifndef SPK_LOG_H
#define SPK_LOG_H

#include <stdarg.h>

#include "spoke.h"

void spk_log_set_level(spoke_log_level level);
spoke_log_level spk_log_get_level(void);
/* `tag` is copied. */
void spk_log_set_tag(const char *tag);
/* Parse "debug|info|warn|error"; returns 0 or -1. */
int spk_log_parse_level(const char *text, spoke_log_level *out);

void spk_log(spoke_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void spk_logv(spoke_log_level level, const char *prefix, const char *fmt, va_list ap);

#define spk_debug(...) spk_log(SPOKE_LOG_DEBUG, __VA_ARGS__)
#define spk_info(...) spk_log(SPOKE_LOG_INFO, __VA_ARGS__)
#define spk_warn(...) spk_log(SPOKE_LOG_WARN, __VA_ARGS__)
#define spk_error(...) spk_log(SPOKE_LOG_ERROR, __VA_ARGS__)

#endif
