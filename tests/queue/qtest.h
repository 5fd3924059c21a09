/*
 * qtest.h -- helpers shared by the queue tests: temporary directories.
 */
#ifndef SPK_QTEST_H
#define SPK_QTEST_H

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int qtest_rm_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* Remove a directory tree; errors are ignored. */
static inline void qtest_rmrf(const char *path)
{
    nftw(path, qtest_rm_cb, 16, FTW_DEPTH | FTW_PHYS);
}

/* Make a fresh temporary directory under $TMPDIR (or /tmp); returns a malloc'd path. */
static inline char *qtest_tmpdir(const char *tag)
{
    const char *base = getenv("TMPDIR");
    char tmpl[512];
    snprintf(tmpl, sizeof(tmpl), "%s/spk-%s-XXXXXX", base != NULL ? base : "/tmp", tag);
    if (mkdtemp(tmpl) == NULL)
        return NULL;
    return strdup(tmpl);
}

#endif
