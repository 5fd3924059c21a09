/*
 * notify.h -- readiness and state for a service manager: systemd's sd_notify protocol.
 *
 * A supervisor started by systemd with Type=notify finds a datagram socket's address in
 * $NOTIFY_SOCKET ("/path" or "@abstract") and sends it newline-separated KEY=value
 * assignments (sd_notify(3)): READY=1 when it serves, RELOADING=1 with MONOTONIC_USEC= when
 * a reload starts and READY=1 again when it is over (succeeded or failed), STOPPING=1 when
 * it begins to stop, STATUS= a line for `systemctl status`. Those few lines of protocol are
 * written here rather than linking libsystemd for them. Without $NOTIFY_SOCKET everything
 * is a no-op. Only the supervisor calls these (NotifyAccess=main): spk_notify_init()
 * removes the variable from the environment, so workers and plugins never see it.
 */
#ifndef SPK_NOTIFY_H
#define SPK_NOTIFY_H

/* Take $NOTIFY_SOCKET (once, first thing in the supervisor) and unset it. */
void spk_notify_init(void);

/* Send one message of printf-formatted assignments. Returns 0 (also when there is no
 * socket to send to) or a negative errno value; a failure is logged once at warn, never
 * fatal: a service manager that stopped listening does not stop the gateway. */
int spk_notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The supervisor's states, in one place: */
/* Serving: generation `gen` with `n` workers (first start, and after each reload). */
void spk_notify_ready(unsigned gen, int n);
/* A reload began (SIGHUP). */
void spk_notify_reloading(void);
/* A reload failed: the serving generation keeps serving. */
void spk_notify_reload_failed(const char *why);
/* Stopping (SIGTERM, SIGINT, SIGQUIT, or a failed start). */
void spk_notify_stopping(void);

#endif
