/*
 * log.c -- see log.h. Formats into a stack buffer and writes it with one write(2).
 */
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static spoke_log_level log_level = SPOKE_LOG_INFO;
static char log_tag[64] = "spoked";

void spk_log_set_level(spoke_log_level level) { log_level = level; }
spoke_log_level spk_log_get_level(void) { return log_level; }

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


void spk_logv(spoke_log_level level, const char *prefix, const char *fmt, va_list ap)
{
    static const char *const tags[] = {"DEBUG", "INFO ", "WARN ", "ERROR"};
    if (level < log_level)
        return;
    char line[4096];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s %s[%d]: %s",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, tags[(unsigned)level < 4 ? level : 3],
                     log_tag, (int)getpid(), prefix ? prefix : "");
    if (n < 0)
        return;
    if ((size_t)n < sizeof(line)) {
        int m = vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
        if (m > 0)
            n += m;
    }
    if ((size_t)n >= sizeof(line) - 1) {
        n = (int)sizeof(line) - 5;
        memcpy(line + n, "...", 3);
        n += 3;
    }
    line[n++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, (size_t)n);
    (void)w;
}

void spk_log(spoke_log_level level, const char *fmt, ...)
{
    if (level < log_level)
        return;
    va_list ap;
    va_start(ap, fmt);
    spk_logv(level, NULL, fmt, ap);
    va_end(ap);
}
