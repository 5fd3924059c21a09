/*
 * bench_net.h -- what spoke-bench's network subcommands (echo, proxy) share: the stop flag
 * that SIGINT/SIGTERM set, the descriptor limit, and the echo server itself (the proxy
 * load can start one as its upstream, --echo).
 */
#ifndef SPK_BENCH_NET_H
#define SPK_BENCH_NET_H

#include <signal.h>

#include "net.h"

#define NS_PER_S 1000000000ull
#define NS_PER_MS 1000000ull

/* Set by SIGINT/SIGTERM once spk_bench_install_signals() ran: every loop stops soon. */
extern volatile sig_atomic_t spk_bench_stop;

/* SIGINT/SIGTERM set spk_bench_stop (no SA_RESTART: epoll_wait returns EINTR); SIGPIPE is
 * ignored, so a write to a reset socket is an error return, not a death. Returns 0 or -1
 * (printed). */
int spk_bench_install_signals(void);

/* Many connections need many descriptors: lift the soft limit to the hard one. */
void spk_bench_raise_nofile(void);

/* Remove the socket file of a unix: address (nothing for TCP). */
void spk_bench_unlink_if_unix(const spk_addr *a);

/* tools/bench_echo.c: serve echo on the listening socket lfd with `threads` loops (the
 * calling thread is the first) until spk_bench_stop. Returns 0, or 1 on a setup failure. */
int spk_bench_echo_serve(int lfd, unsigned threads);

#endif
