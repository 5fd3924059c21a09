/*
 * supervisor.h -- the master process of spoked and of hubd: it never loads plugin code.
 *
 * It parses the config, binds the listening sockets, creates the shared status region and
 * starts `listen.workers` worker processes (fork + exec of spoked itself in worker mode,
 * so every worker starts from a clean process image). Then it watches them:
 *
 *   - a worker that exits or is killed is restarted with exponential backoff (100 ms
 *     doubling to 10 s; reset once a worker has run for a minute). The listening sockets
 *     stay open in the supervisor, so clients connecting meanwhile wait in the backlog.
 *   - a crash (death by a signal, a watchdog kill, or a failed health check) is blamed on
 *     the plugin and hook the worker's slot names; crash_limit crashes of one plugin within
 *     crash_window quarantine it: the workers are replaced by ones without it.
 *   - a hook running past hook_timeout is logged and counted; past ten times that the
 *     worker is killed. A worker whose heartbeat stops is killed. Draining workers are
 *     watched too, so a fini that hangs is killed and blamed like any other hook.
 *   - SIGHUP starts a new generation from the re-read config and plugins directory; when
 *     all its workers are ready the old generation drains and exits. If the new one fails,
 *     the old one keeps serving and the log (and `spoked status`) says why.
 *   - SIGTERM/SIGINT: workers drain and exit, then the supervisor exits 0. SIGQUIT: now.
 *
 * Operators reach it through `run_dir`: spoked.pid, and spoked.sock, a Unix socket that
 * answers "status" with a human-readable report (hubd.pid and hubd.sock for hubd).
 *
 * The role decides the config's sections and what the workers run (cli.c): spoked's
 * workers proxy (worker.h) and it also runs the uplink and syncs the queue; hubd's
 * workers serve gRPC to the edges (hub.h), and its report lists the edges it has seen.
 */
#ifndef SPK_SUPERVISOR_H
#define SPK_SUPERVISOR_H

#include "config.h"
#include "err.h"

/* Run the supervisor for the config file at `path` in `role` until it stops. `self_exe`
 * is the program to exec for workers (normally "/proc/self/exe"). Returns the process
 * exit code. */
int spk_supervisor_main(const char *path, const char *self_exe, spoke_role role);

#endif
