/*
 * bench_stats.h -- the counters the bench plugins share with spoke-bench: one small file,
 * mmap'd MAP_SHARED by every process that opens it, updated with relaxed atomics.
 *
 * spoke-bench creates the file (zeroed, sized with ftruncate) before it starts hubd or
 * spoked, names it in the plugin's `config: { stats: PATH }`, and reads it while they run:
 * a snapshot before and after the timed part, subtracted, gives what happened in between.
 * Every worker of every process adds into the same file, so there is nothing to merge.
 *
 *   bench-sink   (control, tools/bench_plugins/bench_sink.c): `count` payloads delivered
 *                to it, `lat_ms[d]` payloads whose received_timestamp_ms -
 *                edge_timestamp_ms was d ms (the last bin: that many or more);
 *   bench-source (edge, tools/bench_plugins/bench_source.c): `count` payloads
 *                send_to_control accepted, `queue_full` refused with the queue full,
 *                `errors` refused for any other reason; it sends only while `go` != 0.
 */
#ifndef SPK_BENCH_STATS_H
#define SPK_BENCH_STATS_H

#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#define SPK_BSTATS_LAT_BINS 65536u /* 1 ms each; the last holds 65535 ms and more */

typedef struct spk_bstats {
    _Atomic uint32_t go;          /* bench-source: sends while non-zero (spoke-bench sets it) */
    _Atomic uint32_t instances;   /* plugin instances that mapped the file (init) */
    _Atomic uint64_t count;
    _Atomic uint64_t errors;
    _Atomic uint64_t queue_full;
    _Atomic uint64_t lat_sum_ms;
    _Atomic uint64_t lat_ms[SPK_BSTATS_LAT_BINS];
} spk_bstats;

/* Map the file at `path` (created and sized if missing); NULL on failure. The mapping
 * lives until the process exits or spk_bstats_unmap(). */
static inline spk_bstats *spk_bstats_map(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return NULL;
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < (off_t)sizeof(spk_bstats) && ftruncate(fd, (off_t)sizeof(spk_bstats)) != 0) {
        close(fd);
        return NULL;
    }
    void *p = mmap(NULL, sizeof(spk_bstats), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? NULL : (spk_bstats *)p;
}

static inline void spk_bstats_unmap(spk_bstats *s)
{
    if (s != NULL)
        munmap(s, sizeof(*s));
}

#endif
