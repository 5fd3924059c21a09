/*
 * uplink.h -- the edge's uplink: the process that drains the queue to hubd.
 *
 * spoked's supervisor starts it (`spoked --uplink`) when the config has an `uplink:`
 * section, restarts it with backoff like a worker, and shows it in `spoked status`. It
 * runs no plugin code. One libev loop, one gRPC client (transport/grpc_client.h):
 *
 *   - every uplink.heartbeat it sends Heartbeat (identity, version, queue depth and age,
 *     the plugins and their states) and drains the queue: batch after batch of the oldest
 *     pending payloads, in sequence order, each batch one SendPluginControlBatch call of
 *     at most uplink.batch_size payloads and uplink.max_batch_bytes bytes;
 *   - between heartbeats it sends at once whenever a whole batch is waiting;
 *   - from each answer it deletes from the queue exactly the payloads the hub answered
 *     ACCEPTED or DUPLICATE, and the REFUSED ones (logged and counted: resending cannot
 *     help them); it keeps everything else. NO_RECEIVER payloads stay queued and their
 *     plugin is "parked": its payloads are passed over and retried every
 *     SPK_UPLINK_PARK_BEATS heartbeats, until a control plugin with that ID answers or
 *     the queue's retention expires them;
 *   - a failed call (hub down, slow, an error status, a malformed answer) keeps the whole
 *     batch and retries after an exponential backoff with full jitter, from
 *     SPK_UPLINK_BACKOFF_MIN_MS up to the heartbeat (at most SPK_UPLINK_BACKOFF_MAX_MS).
 *
 * At most one batch is in memory, and one batch call is in flight at a time, so a batch
 * is never sent twice at once; a batch that is resent after a lost answer is deduplicated
 * by hubd (edge ID, sequence).
 */
#ifndef SPK_UPLINK_H
#define SPK_UPLINK_H

#include <stdint.h>

#include "config.h"
#include "err.h"
#include "status.h"

#define SPK_UPLINK_BACKOFF_MIN_MS 100u
#define SPK_UPLINK_BACKOFF_MAX_MS 60000u
#define SPK_UPLINK_PARK_BEATS 10u   /* NO_RECEIVER: retried every 10 heartbeats */

/* Run the uplink until SIGTERM/SIGINT (one last drain of what is queued, at most twice the
 * call deadline, then return 0) or SIGQUIT (return at once). `slot` is the supervisor's status slot for
 * this process (NULL: unsupervised, as in tests). Returns 0, or an error with a reason
 * in eb when it cannot start (no uplink.url, the queue, the token file). */
int spk_uplink_run(const spk_config *cfg, spk_wslot *slot, spk_errbuf *eb);

#endif
