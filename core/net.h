/*
 * net.h -- addresses and sockets: parse "host:port", "[v6]:port" and "unix:/path", bind a
 * listening socket, start a non-blocking connect.
 */
#ifndef SPK_NET_H
#define SPK_NET_H

#include <sys/socket.h>

#include "err.h"

typedef struct spk_addr {
    struct sockaddr_storage ss;
    socklen_t len;
    char text[128]; /* the address as the operator wrote it (truncated) */
} spk_addr;

/* Parse and resolve `text` (a host name is resolved once, now). Returns 0, or SPK_EINVAL /
 * SPK_ENOENT with "what: why" in eb. */
int spk_addr_parse(const char *text, spk_addr *out, spk_errbuf *eb);

/* Format a peer address: "1.2.3.4:5", "[::1]:5" or "unix". */
void spk_addr_format(const struct sockaddr *sa, socklen_t len, char *out, size_t cap);

/* Create a non-blocking, close-on-exec listening socket bound to `a` (SO_REUSEADDR; for
 * unix sockets a stale socket file is removed first). Returns the fd, or a negative
 * spk_err with the reason in eb. */
int spk_listen(const spk_addr *a, int backlog, spk_errbuf *eb);

/* Parse and bind every address of addrs[0..n) with spk_listen(), into fds[0..n). On
 * failure the sockets already bound are closed and the reason is in eb. */
int spk_listen_all(char *const *addrs, size_t n, int backlog, int *fds, spk_errbuf *eb);

/* Start a non-blocking connect to `a`. Returns the fd (connected or in progress; check
 * SO_ERROR when it becomes writable) or -errno. */
int spk_connect_start(const spk_addr *a);

#endif
