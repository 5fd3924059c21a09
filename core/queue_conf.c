/*
 * queue_conf.c -- spk_config's queue.* keys onto spk_queue_opts (see queue_conf.h).
 *
 * A key left at 0 in the config means "the queue's default": spk_queue_opts_init() holds
 * those, and only what the operator set overrides them.
 */
#include "queue_conf.h"

#include "log.h"
#include "queue.h"

int spk_queue_conf_open(const spk_config *cfg, spk_queue **out, spk_errbuf *eb)
{
    *out = NULL;
    if (cfg == NULL || cfg->queue_path == NULL)
        return spk_errf(eb, SPK_EINVAL, "no queue.path configured");
    spk_queue_opts o;
    spk_queue_opts_init(&o);
    o.max_pending = cfg->queue_max_pending;
    o.max_bytes = cfg->queue_max_bytes;
    o.retention_ms = cfg->queue_retention_ms;
    o.sync_always = cfg->queue_sync_always;
    if (cfg->queue_sync_interval_ms != 0)
        o.sync_interval_ms = cfg->queue_sync_interval_ms;
    o.map_size = cfg->queue_map_size;
    if (cfg->queue_journal_size != 0)
        o.journal_size = cfg->queue_journal_size;
    return spk_queue_open(cfg->queue_path, &o, out, eb);
}

int spk_queue_conf_sync_tick(spk_queue *q, double now, double *last)
{
    if (q == NULL || !spk_queue_sync_due(q, (uint64_t)((now - *last) * 1000.0)))
        return 0;
    *last = now;
    unsigned failed_before = spk_queue_sync_failures(q);
    spk_errbuf eb;
    int rc = spk_queue_sync(q, &eb);
    if (rc == SPK_ECORRUPT) { /* every sound record moved: report the damage, go on */
        spk_error("%s", eb.msg);
        rc = 0;
    }
    if (rc == 0) {
        if (failed_before > 0)
            spk_info("queue sync works again (after %u failed attempts)", failed_before);
        return 1;
    }
    if (failed_before == 0)
        spk_error("%s; retrying the queue sync with backoff (%u ms, doubling to %u s); "
                  "logged again when it works",
                  eb.msg, (unsigned)spk_queue_sync_retry_ms(q),
                  SPK_QUEUE_SYNC_RETRY_MAX_MS / 1000u);
    return rc;
}
