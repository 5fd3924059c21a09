/*
 * bench_util.c -- the helpers every spoke-bench subcommand shares (declared in bench.h):
 * option parsers that read durations and sizes as the config file does, the tool's own
 * directory, a monotonic clock, JSON string output, a free port and a process's children.
 */
#include "bench.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <pwd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "json.h"
#include "units.h"

/* The tool reads durations and sizes as the config file does (core/base/units.h). */
int spk_bench_parse_duration(const char *text, int allow_zero, double *out_s)
{
    uint64_t ms;
    if (spk_parse_duration_ms(text, &ms) != 0 || (ms == 0 && !allow_zero))
        return -1;
    *out_s = (double)ms / 1000.0;
    return 0;
}

int spk_bench_parse_size(const char *text, uint64_t *out)
{
    return spk_parse_size(text, out) == 0 ? 0 : -1;
}

int spk_bench_parse_uint(const char *text, uint64_t min, uint64_t max, uint64_t *out)
{
    uint64_t v;
    if (spk_bench_parse_size(text, &v) != 0 || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

int spk_bench_self_dir(char *out, size_t cap)
{
    char path[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
    if (n <= 0)
        return -1;
    path[n] = '\0';
    char *slash = strrchr(path, '/');
    if (slash == NULL)
        return -1;
    *slash = '\0';
    if ((size_t)snprintf(out, cap, "%s", path[0] ? path : "/") >= cap)
        return -1;
    return 0;
}

uint64_t spk_bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void spk_bench_json_string(FILE *f, const char *s)
{
    /* The project's one escaper (core/base/json.h), 128 input bytes at a time (each
     * escapes to at most 6), each chunk ending where a UTF-8 character starts. */
    char buf[6 * 128 + 1];
    size_t len = strlen(s);
    fputc('"', f);
    while (len > 0) {
        size_t take = len < 128 ? len : 128;
        for (int k = 0; k < 3 && take < len && take > 1 && ((unsigned char)s[take] & 0xC0) == 0x80; k++)
            take--;
        fwrite(buf, 1, spk_json_escape(buf, sizeof(buf), s, take), f);
        s += take;
        len -= take;
    }
    fputc('"', f);
}

const char *spk_bench_run_as(void)
{
    static char name[64];
    if (name[0] == '\0') {
        struct passwd *pw = getpwuid(geteuid());
        snprintf(name, sizeof(name), "%s", pw ? pw->pw_name : "root");
    }
    return name;
}

int spk_bench_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        fprintf(stderr, "spoke-bench: no free port: %s\n", strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

int spk_bench_children(pid_t pid, pid_t *out, size_t cap)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char cp[400];
        snprintf(cp, sizeof(cp), "%s/%s/children", path, e->d_name);
        FILE *f = fopen(cp, "r");
        if (f == NULL)
            continue;
        int c;
        while (fscanf(f, "%d", &c) == 1) {
            if ((size_t)n < cap)
                out[n] = (pid_t)c;
            n++;
        }
        fclose(f);
    }
    closedir(d);
    return n;
}
