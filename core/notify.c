/*
 * notify.c -- the sd_notify datagram (notify.h): one AF_UNIX SOCK_DGRAM sendto() per
 * message, to the path or abstract name systemd put in $NOTIFY_SOCKET.
 */
#include "notify.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

static struct sockaddr_un addr;
static socklen_t addr_len; /* 0: no service manager listening */
static bool warned;

void spk_notify_init(void)
{
    const char *e = getenv("NOTIFY_SOCKET");
    size_t n = e ? strlen(e) : 0;
    if (n >= 2 && n < sizeof(addr.sun_path) && (e[0] == '/' || e[0] == '@')) {
        addr.sun_family = AF_UNIX;
        memcpy(addr.sun_path, e, n);
        if (e[0] == '@')
            addr.sun_path[0] = '\0'; /* abstract: the name is not NUL-terminated */
        addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (e[0] == '/'));
    } else if (e != NULL) {
        spk_warn("NOTIFY_SOCKET='%s' is not a socket path or @name; not notifying", e);
    }
    unsetenv("NOTIFY_SOCKET");
}

int spk_notify(const char *fmt, ...)
{
    if (addr_len == 0)
        return 0;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (len < 0)
        return -EINVAL;
    if ((size_t)len >= sizeof(msg))
        len = sizeof(msg) - 1; /* a STATUS= line cut short is still a message */
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int rc = 0;
    if (fd < 0 ||
        sendto(fd, msg, (size_t)len, MSG_NOSIGNAL, (const struct sockaddr *)&addr, addr_len) != len)
        rc = -errno;
    if (fd >= 0)
        close(fd);
    if (rc != 0 && !warned) {
        warned = true;
        spk_warn("cannot notify the service manager (NOTIFY_SOCKET): %s", strerror(-rc));
    }
    return rc;
}

void spk_notify_ready(unsigned gen, int n)
{
    spk_notify("READY=1\nSTATUS=generation %u serving (%d workers)", gen, n);
}

void spk_notify_reloading(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    spk_notify("RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading",
               (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000);
}

void spk_notify_reload_failed(const char *why)
{
    spk_notify("READY=1\nSTATUS=reload failed: %s", why);
}

void spk_notify_stopping(void)
{
    spk_notify("STOPPING=1\nSTATUS=stopping");
}
