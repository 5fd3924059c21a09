/*
 * hub_auth.c -- token files and the per-call identity check (hub_auth.h).
 *
 * A table is an array of (edge ID, SHA-256 of its token). Finding a token hashes it once
 * and compares the digest with every entry with CRYPTO_memcmp, remembering a match
 * without branching out early, so the comparison's time depends only on the table size.
 */
#include "hub_auth.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "grpc.h"
#include "hex.h"

#define MAX_EDGE_ID 256

typedef struct entry {
    char *edge_id;
    uint8_t digest[SHA256_DIGEST_LENGTH];
} entry;

struct spk_hub_tokens {
    entry *e;
    size_t n;
};

void spk_hub_tokens_free(spk_hub_tokens *t)
{
    if (t == NULL)
        return;
    for (size_t i = 0; i < t->n; i++)
        free(t->e[i].edge_id);
    free(t->e);
    free(t);
}

size_t spk_hub_tokens_count(const spk_hub_tokens *t)
{
    return t != NULL ? t->n : 0;
}

static int parse_line(spk_hub_tokens *t, char *line, const char *path, int lineno,
                      spk_errbuf *eb)
{
    char *hash = strchr(line, '#');
    if (hash != NULL)
        *hash = '\0';
    char *save = NULL;
    char *id = strtok_r(line, " \t\r\n", &save);
    if (id == NULL)
        return 0; /* blank or comment */
    char *hex = strtok_r(NULL, " \t\r\n", &save);
    if (hex == NULL || strtok_r(NULL, " \t\r\n", &save) != NULL)
        return spk_errf(eb, SPK_ECONFIG, "%s:%d: expected 'EDGE_ID SHA256_HEX'", path, lineno);
    if (strlen(id) > MAX_EDGE_ID)
        return spk_errf(eb, SPK_ECONFIG, "%s:%d: edge ID longer than %d bytes", path, lineno,
                        MAX_EDGE_ID);
    if (strlen(hex) != 2 * SHA256_DIGEST_LENGTH)
        return spk_errf(eb, SPK_ECONFIG, "%s:%d: edge %s: the SHA-256 must be 64 hex digits, "
                        "got %zu characters", path, lineno, id, strlen(hex));
    entry en = {0};
    if (spk_hex_decode(hex, en.digest, sizeof(en.digest)) != 0)
        return spk_errf(eb, SPK_ECONFIG, "%s:%d: edge %s: '%s' is not hexadecimal", path,
                        lineno, id, hex);
    for (size_t i = 0; i < t->n; i++)
        if (strcmp(t->e[i].edge_id, id) == 0)
            return spk_errf(eb, SPK_ECONFIG, "%s:%d: edge %s is listed twice", path, lineno, id);
    entry *ne = realloc(t->e, (t->n + 1) * sizeof(*ne));
    if (ne == NULL)
        return spk_errf(eb, SPK_ENOMEM, "out of memory");
    t->e = ne;
    if ((en.edge_id = strdup(id)) == NULL)
        return spk_errf(eb, SPK_ENOMEM, "out of memory");
    t->e[t->n++] = en;
    return 0;
}

int spk_hub_tokens_load(const char *path, spk_hub_tokens **out, spk_errbuf *eb)
{
    *out = NULL;
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return spk_errf(eb, errno == ENOENT ? SPK_ENOENT : SPK_EIO, "auth.token_file %s: %s",
                        path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) == 0 && (sb.st_mode & 0022) != 0) {
        fclose(f);
        return spk_errf(eb, SPK_ECONFIG, "auth.token_file %s: writable by group or others "
                        "(mode %03o): anyone who can write it can add an edge", path,
                        (unsigned)(sb.st_mode & 0777));
    }
    spk_hub_tokens *t = calloc(1, sizeof(*t));
    if (t == NULL) {
        fclose(f);
        return spk_errf(eb, SPK_ENOMEM, "out of memory");
    }
    char line[1024];
    int lineno = 0, rc = 0;
    while (rc == 0 && fgets(line, sizeof(line), f) != NULL) {
        lineno++;
        if (strchr(line, '\n') == NULL && !feof(f))
            rc = spk_errf(eb, SPK_ECONFIG, "%s:%d: line longer than %zu bytes", path, lineno,
                          sizeof(line) - 2);
        else
            rc = parse_line(t, line, path, lineno, eb);
    }
    if (rc == 0 && ferror(f))
        rc = spk_errf(eb, SPK_EIO, "auth.token_file %s: read error", path);
    fclose(f);
    if (rc != 0) {
        spk_hub_tokens_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

const char *spk_hub_tokens_find(const spk_hub_tokens *t, const char *token, size_t len)
{
    if (t == NULL || token == NULL)
        return NULL;
    uint8_t d[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)token, len, d);
    const char *found = NULL;
    for (size_t i = 0; i < t->n; i++) {
        int eq = CRYPTO_memcmp(d, t->e[i].digest, sizeof(d)) == 0;
        /* No early exit: every entry is compared whatever matched. */
        found = eq ? t->e[i].edge_id : found;
    }
    return found;
}

static int deny(spk_hub_identity *id, int status, const char *fmt, const char *a, const char *b)
{
    id->status = status;
    snprintf(id->reason, sizeof(id->reason), fmt, a, b);
    return status;
}

int spk_hub_auth_check(const spk_hub_tokens *tokens, bool require_cert, const char *edge_id,
                       const char *authorization, const char *const *names, size_t n,
                       spk_hub_identity *id)
{
    id->status = SPK_GRPC_OK;
    id->reason[0] = '\0';
    if (edge_id == NULL || edge_id[0] == '\0')
        return deny(id, SPK_GRPC_INVALID_ARGUMENT, "the call names no edge_id%s%s", "", "");
    if (tokens != NULL) {
        static const char bearer[] = "Bearer ";
        if (authorization == NULL ||
            strncasecmp(authorization, bearer, sizeof(bearer) - 1) != 0)
            return deny(id, SPK_GRPC_UNAUTHENTICATED, "no bearer token%s%s", "", "");
        const char *tok = authorization + sizeof(bearer) - 1;
        const char *who = spk_hub_tokens_find(tokens, tok, strlen(tok));
        if (who == NULL)
            return deny(id, SPK_GRPC_UNAUTHENTICATED, "unknown token%s%s", "", "");
        if (strcmp(who, edge_id) != 0)
            return deny(id, SPK_GRPC_PERMISSION_DENIED,
                        "the token belongs to edge '%.100s', not to '%.100s'", who, edge_id);
    }
    if (require_cert) {
        if (n == 0)
            return deny(id, SPK_GRPC_UNAUTHENTICATED, "no verified client certificate%s%s", "",
                        "");
        for (size_t i = 0; i < n; i++)
            if (strcmp(names[i], edge_id) == 0)
                return SPK_GRPC_OK;
        return deny(id, SPK_GRPC_PERMISSION_DENIED,
                    "the client certificate (CN '%.100s') does not name edge '%.100s'", names[0],
                    edge_id);
    }
    return SPK_GRPC_OK;
}
