/*
 * spoke_queue.c -- spoke-queue: the operator's view of an edge's durable queue.
 *
 *   spoke-queue stat PATH          pending count and bytes, oldest age, per-plugin counts,
 *                                  lifetime acked/expired/purged counters
 *   spoke-queue peek [N] [--from SEQ] [--limit N] [--full] PATH
 *                                  N records (default 10; --limit N, 0 = all) from the
 *                                  oldest or from sequence number SEQ on, decoded and
 *                                  escaped: 64 bytes of each payload, all with --full.
 *                                  Streamed a page of PAGE_RECORDS at a time, so memory
 *                                  stays bounded however many records are listed
 *   spoke-queue show SEQ PATH      the record with sequence number SEQ, whole
 *   spoke-queue purge [--yes] PATH delete every pending record, after typing "yes"
 *   spoke-queue verify PATH        check every record's CRC and the counters (exit 3 when
 *                                  something is damaged)
 *
 * It opens the queue like any other process (safe while spoked runs) and never creates
 * one: a missing PATH is an error.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "queue.h"
#include "spoke/control/v1/control.pb-c.h"

#define PREVIEW 64
#define PAGE_RECORDS 64
#define PAGE_BYTES (4u << 20)

static void usage(FILE *out)
{
    fprintf(out, "usage: spoke-queue stat PATH\n"
                 "       spoke-queue peek [N] [--from SEQ] [--limit N] [--full] PATH\n"
                 "       spoke-queue show SEQ PATH\n"
                 "       spoke-queue purge [--yes] PATH\n"
                 "       spoke-queue verify PATH\n");
}

static void print_escaped(const uint8_t *p, size_t n, size_t max)
{
    putchar('"');
    for (size_t i = 0; i < n && i < max; i++) {
        uint8_t c = p[i];
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c == '\n')
            fputs("\\n", stdout);
        else if (c >= 0x20 && c < 0x7f)
            putchar(c);
        else
            printf("\\x%02x", c);
    }
    putchar('"');
    if (n > max)
        printf("... (%zu bytes)", n);
}

static void print_time(int64_t ms)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    char buf[64];
    gmtime_r(&t, &tm);
    strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
    printf("%s.%03dZ", buf, (int)(ms % 1000));
}

static void print_age(int64_t ms)
{
    if (ms < 1000)
        printf("%lldms", (long long)ms);
    else if (ms < 120000)
        printf("%.1fs", (double)ms / 1000);
    else if (ms < 7200000)
        printf("%.1fm", (double)ms / 60000);
    else
        printf("%.1fh", (double)ms / 3600000);
}

static int open_existing(const char *path, spk_queue **q)
{
    spk_queue_opts o;
    spk_errbuf eb = {{0}};
    spk_queue_opts_init(&o);
    o.create = false;
    int rc = spk_queue_open(path, &o, q, &eb);
    if (rc != 0)
        fprintf(stderr, "spoke-queue: %s\n", eb.msg);
    return rc;
}

static int cmd_stat(spk_queue *q)
{
    spk_queue_stats st;
    spk_errbuf eb = {{0}};
    if (spk_queue_stats_get(q, &st, &eb) != 0) {
        fprintf(stderr, "spoke-queue: %s\n", eb.msg);
        return 1;
    }
    printf("pending:       %llu records\n", (unsigned long long)st.pending);
    printf("pending bytes: %llu\n", (unsigned long long)st.pending_bytes);
    printf("oldest:        ");
    if (st.pending > 0) {
        print_age(st.oldest_age_ms);
        printf(" (seq %llu)\n", (unsigned long long)st.oldest_seq);
    } else {
        printf("-\n");
    }
    printf("next seq:      %llu\n", (unsigned long long)st.next_seq);
    printf("acked:         %llu\n", (unsigned long long)st.acked);
    printf("expired:       %llu\n", (unsigned long long)st.expired);
    printf("purged:        %llu\n", (unsigned long long)st.purged);
    printf("damaged:       %llu%s\n", (unsigned long long)st.damaged,
           st.damaged > 0 ? " (journal records skipped: a stray write or disk damage)" : "");
    printf("journal:       %llu of %llu bytes in use, %llu records not yet in LMDB\n",
           (unsigned long long)st.journal_used, (unsigned long long)st.journal_size,
           (unsigned long long)st.staged);
    if (st.dead_readers_cleared > 0)
        printf("stale readers cleared at open: %llu\n",
               (unsigned long long)st.dead_readers_cleared);
    printf("per plugin:\n");
    if (st.n_plugins == 0)
        printf("  (none)\n");
    for (size_t i = 0; i < st.n_plugins; i++)
        printf("  plugin %-10u %10llu records %14llu bytes\n", st.plugins[i].plugin_id,
               (unsigned long long)st.plugins[i].pending,
               (unsigned long long)st.plugins[i].bytes);
    spk_queue_stats_free(&st);
    return 0;
}

static void print_item(const spk_queue_item *it, size_t preview)
{
    printf("seq %llu", (unsigned long long)it->seq);
    if (it->status != 0) {
        printf("  CORRUPT (%s): fails its CRC; purge or ack it\n", spk_strerror(it->status));
        return;
    }
    Spoke__Control__V1__EdgePayload *ep =
        spoke__control__v1__edge_payload__unpack(NULL, it->wire_len, it->wire);
    if (ep == NULL) {
        printf("  CORRUPT: does not decode\n");
        return;
    }
    printf("  plugin %u  time ", ep->plugin_id);
    print_time(ep->edge_timestamp_ms);
    printf("  %zu bytes", ep->payload.len);
    if (ep->edge_id[0] != '\0')
        printf("  edge %s", ep->edge_id);
    if (ep->content_type[0] != '\0')
        printf("  type %s", ep->content_type);
    printf("\n  correlation id: ");
    print_escaped((const uint8_t *)ep->correlation_id, strlen(ep->correlation_id), 256);
    printf("\n");
    for (size_t k = 0; k < ep->n_metadata; k++) {
        printf("  meta ");
        print_escaped((const uint8_t *)ep->metadata[k]->key, strlen(ep->metadata[k]->key),
                      preview);
        printf(" = ");
        print_escaped((const uint8_t *)ep->metadata[k]->value, strlen(ep->metadata[k]->value),
                      preview);
        printf("\n");
    }
    printf("  payload: ");
    print_escaped(ep->payload.data, ep->payload.len, preview);
    printf("\n");
    spoke__control__v1__edge_payload__free_unpacked(ep, NULL);
}

/* `limit` records (0: all) from sequence number `from` on, a page at a time. */
static int cmd_peek(spk_queue *q, uint64_t from, uint64_t limit, bool full)
{
    spk_errbuf eb = {{0}};
    uint64_t shown = 0, first = from;
    for (;;) {
        spk_queue_batch b;
        size_t want = PAGE_RECORDS;
        if (limit > 0 && limit - shown < want)
            want = (size_t)(limit - shown);
        if (want == 0)
            break;
        if (spk_queue_read_from(q, from, want, PAGE_BYTES, &b, &eb) != 0) {
            fprintf(stderr, "spoke-queue: %s\n", eb.msg);
            return 1;
        }
        for (size_t i = 0; i < b.n; i++)
            print_item(&b.items[i], full ? SIZE_MAX : PREVIEW);
        shown += b.n;
        size_t n = b.n;
        if (n > 0)
            from = b.items[n - 1].seq + 1;
        spk_queue_batch_free(&b);
        if (n == 0)
            break;
    }
    if (shown == 0 && first <= 1)
        printf("(queue is empty)\n");
    else if (shown == 0)
        printf("(no pending record from seq %llu on)\n", (unsigned long long)first);
    return 0;
}

static int cmd_show(spk_queue *q, uint64_t seq)
{
    spk_queue_batch b;
    spk_errbuf eb = {{0}};
    if (spk_queue_read_from(q, seq, 1, 0, &b, &eb) != 0) {
        fprintf(stderr, "spoke-queue: %s\n", eb.msg);
        return 1;
    }
    int rc = 0;
    if (b.n == 1 && b.items[0].seq == seq) {
        print_item(&b.items[0], SIZE_MAX);
    } else {
        fprintf(stderr, "spoke-queue: no pending record with sequence number %llu\n",
                (unsigned long long)seq);
        rc = 1;
    }
    spk_queue_batch_free(&b);
    return rc;
}

static int cmd_verify(spk_queue *q)
{
    spk_errbuf eb = {{0}};
    uint64_t bad = 0;
    int rc = spk_queue_verify(q, &bad, &eb);
    if (rc == SPK_ECORRUPT) {
        printf("DAMAGED: %s\n", eb.msg);
        return 3;
    }
    if (rc != 0) {
        fprintf(stderr, "spoke-queue: %s\n", eb.msg);
        return 1;
    }
    printf("ok: every record passes its CRC and the counters agree\n");
    return 0;
}

static int cmd_purge(spk_queue *q, const char *path, int yes)
{
    spk_errbuf eb = {{0}};
    if (!yes) {
        spk_queue_stats st;
        if (spk_queue_stats_get(q, &st, &eb) != 0) {
            fprintf(stderr, "spoke-queue: %s\n", eb.msg);
            return 1;
        }
        spk_queue_stats_free(&st);
        printf("Delete all %llu pending records in %s? They will never reach the control "
               "plane. Type yes to confirm: ", (unsigned long long)st.pending, path);
        fflush(stdout);
        char line[32];
        if (fgets(line, sizeof(line), stdin) == NULL || strcmp(line, "yes\n") != 0) {
            printf("not purged\n");
            return 1;
        }
    }
    uint64_t purged = 0;
    if (spk_queue_purge(q, &purged, &eb) != 0 || spk_queue_sync(q, &eb) != 0) {
        fprintf(stderr, "spoke-queue: %s\n", eb.msg);
        return 1;
    }
    printf("purged %llu records\n", (unsigned long long)purged);
    return 0;
}

/* A number for `what`, or -1 (with a message) when `arg` is not one. */
static int parse_u64(const char *arg, const char *what, bool positive, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(arg, &end, 10);
    if (errno != 0 || *end != '\0' || arg[0] == '-' || arg[0] == '\0' || (positive && v == 0)) {
        fprintf(stderr, "spoke-queue: %s must be a %s number, got '%s'\n", what,
                positive ? "positive" : "non-negative", arg);
        return -1;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    const char *path = argv[argc - 1];
    uint64_t from = 0, limit = 10, seq = 0;
    bool full = false;
    int yes = 0;
    if (strcmp(cmd, "stat") == 0 || strcmp(cmd, "verify") == 0) {
        if (argc != 3) {
            usage(stderr);
            return 2;
        }
    } else if (strcmp(cmd, "peek") == 0) {
        for (int i = 2; i < argc - 1; i++) {
            if (strcmp(argv[i], "--full") == 0) {
                full = true;
            } else if (strcmp(argv[i], "--from") == 0 && i + 1 < argc - 1) {
                if (parse_u64(argv[++i], "peek: --from SEQ", false, &from) != 0)
                    return 2;
            } else if (strcmp(argv[i], "--limit") == 0 && i + 1 < argc - 1) {
                if (parse_u64(argv[++i], "peek: --limit N", false, &limit) != 0)
                    return 2;
            } else if (argv[i][0] != '-') {
                if (parse_u64(argv[i], "peek: N", true, &limit) != 0)
                    return 2;
            } else {
                usage(stderr);
                return 2;
            }
        }
    } else if (strcmp(cmd, "show") == 0) {
        if (argc != 4) {
            usage(stderr);
            return 2;
        }
        if (parse_u64(argv[2], "show: SEQ", true, &seq) != 0)
            return 2;
    } else if (strcmp(cmd, "purge") == 0) {
        if (argc == 4 && strcmp(argv[2], "--yes") == 0) {
            yes = 1;
        } else if (argc != 3) {
            usage(stderr);
            return 2;
        }
    } else {
        usage(stderr);
        return 2;
    }

    spk_queue *q = NULL;
    if (open_existing(path, &q) != 0)
        return 1;
    int rc;
    if (strcmp(cmd, "stat") == 0)
        rc = cmd_stat(q);
    else if (strcmp(cmd, "peek") == 0)
        rc = cmd_peek(q, from, limit, full);
    else if (strcmp(cmd, "show") == 0)
        rc = cmd_show(q, seq);
    else if (strcmp(cmd, "verify") == 0)
        rc = cmd_verify(q);
    else
        rc = cmd_purge(q, path, yes);
    spk_queue_close(q);
    return rc;
}
