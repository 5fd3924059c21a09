/*
 * hub_auth.h -- who is calling hubd: bearer tokens and client certificates.
 *
 * TOKEN FILE (hub `auth.token_file`): one edge a line, "EDGE_ID SHA256_HEX", where the hex
 * is the SHA-256 of the edge's token (what its uplink.token_file holds), so the hub never
 * stores a token itself; `#` starts a comment, blank lines are skipped:
 *
 *     # edge            sha256 of its token (printf %s TOKEN | sha256sum)
 *     edge-us-west-1    9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
 *
 * A call's "authorization: Bearer TOKEN" authenticates the edge whose line holds
 * SHA-256(TOKEN); every line is compared, in constant time, so the time taken does not
 * tell which line came close.
 *
 * CLIENT CERTIFICATES (hub `tls.client_ca`): a certificate that verified against the CA
 * names the edge by its subject CN or one of its DNS/URI subject alternative names.
 *
 * With both configured, a call must pass both and they must name the same edge. A batch
 * or heartbeat whose edge_id is not the authenticated edge is PERMISSION_DENIED; a call
 * with no valid credential is UNAUTHENTICATED. With neither, every call is accepted and
 * edge_id is taken as sent (hubd allows that only on a loopback listener).
 */
#ifndef SPK_HUB_AUTH_H
#define SPK_HUB_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct spk_hub_tokens spk_hub_tokens;

/* Load a token file. Returns 0 and a table the caller frees with spk_hub_tokens_free(),
 * or SPK_ENOENT/SPK_EIO (cannot read it), SPK_ECONFIG ("FILE:LINE: ..." for a malformed
 * line, a duplicate edge ID, or a file others can write), SPK_ENOMEM. */
int spk_hub_tokens_load(const char *path, spk_hub_tokens **out, spk_errbuf *eb);
void spk_hub_tokens_free(spk_hub_tokens *t);
size_t spk_hub_tokens_count(const spk_hub_tokens *t);

/* The edge ID whose token is `token` (len bytes), borrowed from t; NULL when none. */
const char *spk_hub_tokens_find(const spk_hub_tokens *t, const char *token, size_t len);

/* The outcome of checking one call. */
typedef struct spk_hub_identity {
    int status;           /* spk_grpc_code: OK, UNAUTHENTICATED or PERMISSION_DENIED */
    char reason[256];     /* for the log and grpc-message when status != OK */
} spk_hub_identity;

/* Check a call claiming to come from `edge_id`:
 *   tokens         the token table, or NULL when tokens are not configured
 *   authorization  the call's authorization header, or NULL
 *   names, n       the names of its verified client certificate (n = 0: none)
 *   require_cert   client certificates are configured (tls.client_ca)
 * Fills *id and returns its status. */
int spk_hub_auth_check(const spk_hub_tokens *tokens, bool require_cert, const char *edge_id,
                       const char *authorization, const char *const *names, size_t n,
                       spk_hub_identity *id);

#endif
