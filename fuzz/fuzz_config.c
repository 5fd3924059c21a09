/*
 * fuzz_config.c -- the config parser (core/config.c) on any bytes.
 *
 * Each input is written to a memfd and loaded by path, as spoked loads its file, in both
 * roles (edge: spoked, control: hubd). A load either fails with a message or succeeds;
 * what succeeds must survive its own dump: spk_config_dump() promises YAML that
 * spk_config_load() reads back to the same values, so the dump of the reloaded config
 * must equal the first dump byte for byte, but for its comments (the file's name, the
 * entries' line numbers). A difference aborts (a finding), as a crash,
 * a leak or undefined behaviour does under the sanitizers.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"

static int in_fd = -1, dump_fd = -1;
static char in_path[64], dump_path[64];

static int open_memfd(const char *name, char *path, size_t cap)
{
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0) {
        perror("memfd_create");
        abort();
    }
    snprintf(path, cap, "/proc/self/fd/%d", fd);
    return fd;
}

static void put(int fd, const void *data, size_t size)
{
    if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != (ssize_t)size) {
        perror("memfd write");
        abort();
    }
}

/* The dump of cfg as a malloc'd string (*len bytes). */
static char *dump(const spk_config *cfg, size_t *len)
{
    char *buf = NULL;
    FILE *f = open_memstream(&buf, len);
    if (f == NULL)
        abort();
    spk_config_dump(cfg, f);
    fclose(f);
    return buf;
}

/* Drop the comment lines of a dump in place (the file's name, entries' line numbers: they
 * differ between the input and its dump by design); returns s. */
static char *strip_comments(char *s)
{
    char *w = s;
    for (char *line = s; *line != '\0';) {
        char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) + 1 : strlen(line);
        const char *t = line + strspn(line, " ");
        if (*t != '#') {
            memmove(w, line, len);
            w += len;
        }
        line += len;
    }
    *w = '\0';
    return s;
}

static void round_trip(const spk_config *cfg, spoke_role role, const uint8_t *data, size_t size)
{
    size_t len1, len2;
    char *d1 = dump(cfg, &len1);
    put(dump_fd, d1, len1);
    spk_config *again = NULL;
    spk_errbuf eb = {{0}};
    if (spk_config_load_role(dump_path, role, &again, &eb) != 0) {
        fprintf(stderr,
                "the dump of a config that loads does not load: %s\n--- input\n%.*s\n"
                "--- dump\n%s\n",
                eb.msg, (int)size, (const char *)data, d1);
        abort();
    }
    char *d2 = dump(again, &len2);
    if (strcmp(strip_comments(d1), strip_comments(d2)) != 0) {
        fprintf(stderr,
                "the dump of the reloaded dump differs\n--- first\n%s\n--- second\n%s\n"
                "--- input\n%.*s\n",
                d1, d2, (int)size, (const char *)data);
        abort();
    }
    free(d1);
    free(d2);
    spk_config_free(again);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    in_fd = open_memfd("spoke.yaml", in_path, sizeof(in_path));
    dump_fd = open_memfd("dump.yaml", dump_path, sizeof(dump_path));
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const spoke_role roles[] = {SPOKE_ROLE_EDGE, SPOKE_ROLE_CONTROL};
    put(in_fd, data, size);
    for (size_t i = 0; i < sizeof(roles) / sizeof(roles[0]); i++) {
        spk_config *cfg = NULL;
        spk_errbuf eb = {{0}};
        if (spk_config_load_role(in_path, roles[i], &cfg, &eb) != 0)
            continue;
        round_trip(cfg, roles[i], data, size);
        spk_config_free(cfg);
    }
    return 0;
}
