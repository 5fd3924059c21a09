/*
 * metrics_merge.h -- the metrics merger (GatewayD's): plugins that serve their own
 * Prometheus text on a Unix socket (plugins.list[].metrics_socket) are scraped every
 * metrics.merge_period, each series relabelled plugin="<name>", and merged into /metrics.
 *
 * Everything runs on the caller's loop and never blocks it: each scrape is a
 * non-blocking connect, one "GET /metrics HTTP/1.0" request and a read to EOF, bounded
 * by a deadline (the merge period, at most SPK_MERGE_TIMEOUT_S) and a size
 * (SPK_MERGE_MAX_BYTES). A socket that is slow (past the deadline), gone (connect or I/O
 * error), or answers garbage (not HTTP 200, or a line that is not Prometheus text, or a
 * family named spoke_*) is skipped until its next good scrape, and counted. /metrics
 * serves the last good text of each socket; it never waits for a scrape.
 *
 * Families of the same name from two plugins are merged under one TYPE (the first
 * plugin's HELP); a family whose type differs from the first is left out and counted.
 * A series that has a `plugin` label of its own keeps it as `exported_plugin`, as
 * Prometheus does on a label conflict. Timestamps are dropped.
 */
#ifndef SPK_METRICS_MERGE_H
#define SPK_METRICS_MERGE_H

#include <ev.h>

#include "err.h"
#include "metrics.h"

#define SPK_MERGE_TIMEOUT_S 2.0
#define SPK_MERGE_MAX_BYTES (4u << 20)

typedef struct spk_merger spk_merger;

/* A new merger on `loop` scraping every `period_ms`; NULL when out of memory. */
spk_merger *spk_merger_new(struct ev_loop *loop, uint64_t period_ms);

/* Free m: pending scrapes are closed. NULL is allowed. */
void spk_merger_free(spk_merger *m);

/* The sockets to scrape: (name[i], path[i]) for i < n, both copied. A source that stays
 * (same name and path) keeps its last text and counters. Returns 0 or SPK_ENOMEM. */
int spk_merger_set_sources(spk_merger *m, const char *const *names, const char *const *paths,
                           size_t n, uint64_t period_ms);

/* Parse Prometheus text from one plugin (an HTTP response or bare text) and relabel it
 * with plugin="name": the merger's own parser, exposed for tests. Returns 0, or
 * SPK_ECORRUPT with the first bad line in eb. */
int spk_merger_check_text(const char *name, const char *text, size_t len, spk_mbuf *out,
                          spk_errbuf *eb);

/* Append the merged families and the merger's own counters
 * (spoke_metrics_merge_scrapes_total{plugin,result}) to out. */
void spk_merger_render(const spk_merger *m, spk_mbuf *out);

#endif
