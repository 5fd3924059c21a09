/*
 * queue_conf.h -- open the durable queue with the config's queue.* keys.
 *
 * The one place that turns an spk_config into spk_queue_opts, so that every process that
 * opens the queue opens it the same way: a worker for send_to_control (host.c) and the
 * supervisor for its queue sync and metrics (supervisor.c), later the uplink.
 */
#ifndef SPK_QUEUE_CONF_H
#define SPK_QUEUE_CONF_H

#include "config.h"
#include "err.h"

struct spk_queue; /* queue/queue.h */

/* Open the queue at cfg->queue_path with cfg's queue.* options. Call it in the process
 * that will use the queue, after fork. On success *out is a queue the caller closes with
 * spk_queue_close(). Errors: SPK_EINVAL (no queue.path), else spk_queue_open()'s codes
 * (queue/queue.h), with the message in eb. */
int spk_queue_conf_open(const spk_config *cfg, struct spk_queue **out, spk_errbuf *eb);

/* One tick of the queue's sync timer, for the one process that owns it (the supervisor,
 * or a --single-process worker), polled every SPK_QUEUE_SYNC_POLL_MS: when
 * spk_queue_sync_due() says so (its backoff included), sync, and log each change of state
 * once: the first failure, with the error and the backoff, and the first success after
 * failures, with how many failed. *last is when the last sync was tried (the loop's
 * ev_now); updated when one is. Returns 1 (a sync ran and succeeded), 0 (none was due),
 * or the failed sync's negative code. */
int spk_queue_conf_sync_tick(struct spk_queue *q, double now, double *last);

#endif
