/*
 * status.c -- create and map the supervisor/worker shared region (see status.h).
 */
#include "status.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

int spk_status_create(spk_status **out, int *fd, spk_errbuf *eb)
{
    int mfd = memfd_create("spoke-status", MFD_CLOEXEC);
    if (mfd < 0)
        return spk_errf(eb, SPK_EIO, "status region: memfd_create: %s", strerror(errno));
    if (ftruncate(mfd, sizeof(spk_status)) != 0) {
        int e = errno;
        close(mfd);
        return spk_errf(eb, SPK_EIO, "status region: ftruncate: %s", strerror(e));
    }
    int rc = spk_status_map(mfd, out, eb);
    if (rc != 0) {
        close(mfd);
        return rc;
    }
    (*out)->magic = SPK_STATUS_MAGIC;
    (*out)->n_slots = SPK_STATUS_SLOTS;
    *fd = mfd;
    return 0;
}

int spk_status_map(int fd, spk_status **out, spk_errbuf *eb)
{
    void *p = mmap(NULL, sizeof(spk_status), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return spk_errf(eb, SPK_EIO, "status region: mmap: %s", strerror(errno));
    *out = p;
    return 0;
}

void spk_status_unmap(spk_status *st)
{
    if (st != NULL)
        munmap(st, sizeof(*st));
}

uint64_t spk_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}
