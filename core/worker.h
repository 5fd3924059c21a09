/*
 * worker.h -- one serving process: loads the plugins, builds the chain, runs the proxy on
 * the listening sockets it is given, and calls on_tick on schedule, on one libev loop.
 *
 * spk_worker_run() returns when the worker has stopped: after SIGTERM/SIGINT once open
 * connections have finished (at most plugins.drain_timeout), at once after SIGQUIT.
 */
#ifndef SPK_WORKER_H
#define SPK_WORKER_H

#include <stddef.h>

#include "chain.h"
#include "config.h"
#include "err.h"

typedef struct spk_worker_opts {
    const int *listen_fds; /* borrowed, already listening */
    size_t n_listen;
    spk_slot *slot;        /* where to publish hook activity; NULL: a private one */
    int id;                /* worker number, for logs */
} spk_worker_opts;

/* Serve until stopped. `cfg` is borrowed (autoloaded plugins are appended to it).
 * Returns 0 after a clean stop, or an error (plugin refused, init failed...) with the
 * reason in eb. */
int spk_worker_run(spk_config *cfg, const spk_worker_opts *opts, spk_errbuf *eb);

#endif
