/*
 * bench_net.c -- the stop flag, signals and descriptor limit of the network subcommands
 * (see bench_net.h).
 */
#include "bench_net.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

volatile sig_atomic_t spk_bench_stop;

static void on_stop_signal(int sig)
{
    (void)sig;
    spk_bench_stop = 1;
}

int spk_bench_install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0) {
        fprintf(stderr, "spoke-bench: sigaction: %s\n", strerror(errno));
        return -1;
    }
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

void spk_bench_raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

void spk_bench_unlink_if_unix(const spk_addr *a)
{
    if (a->ss.ss_family == AF_UNIX)
        unlink(((const struct sockaddr_un *)&a->ss)->sun_path);
}
