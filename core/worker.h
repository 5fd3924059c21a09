/*
 * worker.h -- one serving process: loads the plugins, builds the chain, runs the proxy on
 * the listening sockets it is given, calls on_tick and the health checks on schedule, all
 * on one libev loop.
 *
 * Supervised (opts.wslot set), the worker publishes its plugins, hook activity and
 * heartbeat in its status slot, reports READY once it could serve, and accepts only after
 * the supervisor's SIGUSR1. SIGTERM/SIGINT: stop accepting, drain open connections (at most
 * plugins.drain_timeout), return. SIGQUIT: close everything, return at once.
 */
#ifndef SPK_WORKER_H
#define SPK_WORKER_H

#include <stdbool.h>
#include <stddef.h>

#include "config.h"
#include "err.h"
#include "status.h"

typedef struct spk_worker_opts {
    const int *listen_fds;  /* borrowed, already listening */
    size_t n_listen;
    spk_wslot *wslot;       /* the supervisor's slot for this worker; NULL: unsupervised */
    const char *const *quarantine; /* plugin keys not to load (spk_plugin_key) */
    size_t n_quarantine;
} spk_worker_opts;

/* Serve until stopped. `cfg` is borrowed (autoloaded plugins are appended to it).
 * Returns 0 after a clean stop, SPK_EPLUGIN_INIT & co. when it could not start (reason in
 * eb), or SPK_EBUSY when a plugin failed plugins.health_fail_limit health checks in a row
 * (the plugin's index + 1 is in opts->wslot->health_failed). */
int spk_worker_run(spk_config *cfg, const spk_worker_opts *opts, spk_errbuf *eb);

#endif
