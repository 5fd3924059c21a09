/*
 * grpc.c -- gRPC framing, status codes, grpc-timeout and grpc-message (see grpc.h).
 *
 * The body reassembler keeps the prefix and the message in one buffer that grows by
 * doubling up to the declared length (never past max_msg + 5), so a peer that declares a
 * huge message is refused after 5 bytes and one that trickles bytes costs amortised
 * O(1) per byte.
 */
#include "grpc.h"

#include "hex.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const code_names[] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *spk_grpc_code_name(int code)
{
    if (code < 0 || (size_t)code >= sizeof(code_names) / sizeof(code_names[0]))
        return "UNKNOWN_CODE";
    return code_names[code];
}

bool spk_grpc_code_transient(int code)
{
    switch (code) {
    case SPK_GRPC_UNAVAILABLE:
    case SPK_GRPC_DEADLINE_EXCEEDED:
    case SPK_GRPC_RESOURCE_EXHAUSTED:
    case SPK_GRPC_ABORTED:
    case SPK_GRPC_INTERNAL:
    case SPK_GRPC_UNKNOWN:
        return true;
    default:
        return false;
    }
}

void spk_grpc_prefix(uint8_t out[SPK_GRPC_PREFIX], uint32_t len)
{
    out[0] = 0;
    out[1] = (uint8_t)(len >> 24);
    out[2] = (uint8_t)(len >> 16);
    out[3] = (uint8_t)(len >> 8);
    out[4] = (uint8_t)len;
}

static uint32_t prefix_len(const uint8_t *p)
{
    return (uint32_t)p[1] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 8 | p[4];
}

bool spk_grpc_content_type_ok(const char *value, size_t len)
{
    size_t n = sizeof(SPK_GRPC_CONTENT_TYPE) - 1;
    if (len < n || strncmp(value, SPK_GRPC_CONTENT_TYPE, n) != 0)
        return false;
    return len == n || value[n] == '+' || value[n] == ';';
}

/* ---- bodies --------------------------------------------------------------------------- */

void spk_grpc_body_init(spk_grpc_body *b, size_t max_msg)
{
    memset(b, 0, sizeof(*b));
    b->max_msg = max_msg;
}

void spk_grpc_body_free(spk_grpc_body *b)
{
    free(b->buf);
    spk_grpc_body_init(b, b->max_msg);
}

static spk_grpc_code body_reserve(spk_grpc_body *b, size_t need, spk_errbuf *eb)
{
    if (need <= b->cap)
        return SPK_GRPC_OK;
    size_t cap = b->cap != 0 ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    /* Never more than the whole message: the prefix told us its size. */
    if (b->len >= SPK_GRPC_PREFIX) {
        size_t whole = SPK_GRPC_PREFIX + prefix_len(b->buf);
        if (cap > whole && need <= whole)
            cap = whole;
    }
    uint8_t *nb = realloc(b->buf, cap);
    if (nb == NULL) {
        spk_errf(eb, SPK_ENOMEM, "out of memory for a %zu-byte message", need);
        return SPK_GRPC_INTERNAL;
    }
    b->buf = nb;
    b->cap = cap;
    return SPK_GRPC_OK;
}

spk_grpc_code spk_grpc_body_append(spk_grpc_body *b, const void *data, size_t n,
                                   spk_errbuf *eb)
{
    const uint8_t *p = data;
    if (n == 0)
        return SPK_GRPC_OK;
    /* Work out the whole message's size (from the prefix we have, or complete it from
     * `data`) and check everything before changing b, so an error leaves it unchanged. */
    uint8_t hdr[SPK_GRPC_PREFIX];
    size_t have = b->len < SPK_GRPC_PREFIX ? b->len : SPK_GRPC_PREFIX;
    if (have > 0)
        memcpy(hdr, b->buf, have);
    size_t take = SPK_GRPC_PREFIX - have < n ? SPK_GRPC_PREFIX - have : n;
    memcpy(hdr + have, p, take);
    if (have + take == SPK_GRPC_PREFIX) {
        if (hdr[0] != 0) {
            spk_errf(eb, SPK_EINVAL, "compressed message (flag %u) but no grpc-encoding "
                     "is offered", hdr[0]);
            return SPK_GRPC_UNIMPLEMENTED;
        }
        uint32_t mlen = prefix_len(hdr);
        if (mlen > b->max_msg) {
            spk_errf(eb, SPK_EINVAL, "message of %u bytes is over the limit of %zu", mlen,
                     b->max_msg);
            return SPK_GRPC_RESOURCE_EXHAUSTED;
        }
        if (n > SPK_GRPC_PREFIX + (size_t)mlen - b->len) {
            spk_errf(eb, SPK_EINVAL, "more than one message in a unary call");
            return SPK_GRPC_INVALID_ARGUMENT;
        }
    }
    spk_grpc_code rc = body_reserve(b, b->len + n, eb);
    if (rc != SPK_GRPC_OK)
        return rc;
    memcpy(b->buf + b->len, p, n);
    b->len += n;
    return SPK_GRPC_OK;
}

spk_grpc_code spk_grpc_body_finish(const spk_grpc_body *b, const uint8_t **msg, size_t *len,
                                   spk_errbuf *eb)
{
    if (b->len == 0) {
        spk_errf(eb, SPK_EINVAL, "the stream ended with no message");
        return SPK_GRPC_INVALID_ARGUMENT;
    }
    if (b->len < SPK_GRPC_PREFIX) {
        spk_errf(eb, SPK_EINVAL, "the stream ended inside a message prefix (%zu of 5 bytes)",
                 b->len);
        return SPK_GRPC_INVALID_ARGUMENT;
    }
    size_t mlen = prefix_len(b->buf);
    if (b->len - SPK_GRPC_PREFIX != mlen) {
        spk_errf(eb, SPK_EINVAL, "the stream ended after %zu of the message's %zu bytes",
                 b->len - SPK_GRPC_PREFIX, mlen);
        return SPK_GRPC_INVALID_ARGUMENT;
    }
    *msg = b->buf + SPK_GRPC_PREFIX;
    *len = mlen;
    return SPK_GRPC_OK;
}

/* ---- grpc-timeout --------------------------------------------------------------------- */

int spk_grpc_timeout_parse(const char *value, size_t len, uint64_t *ms)
{
    if (len < 2 || len > 9)
        return SPK_EINVAL;
    uint64_t v = 0;
    for (size_t i = 0; i + 1 < len; i++) {
        if (value[i] < '0' || value[i] > '9')
            return SPK_EINVAL;
        v = v * 10 + (uint64_t)(value[i] - '0');
    }
    switch (value[len - 1]) {
    case 'H': v *= 3600000; break;
    case 'M': v *= 60000; break;
    case 'S': v *= 1000; break;
    case 'm': break;
    case 'u': v = (v + 999) / 1000; break;
    case 'n': v = (v + 999999) / 1000000; break;
    default: return SPK_EINVAL;
    }
    *ms = v;
    return 0;
}

char *spk_grpc_timeout_format(uint64_t ms, char *buf, size_t cap)
{
    if (ms == 0)
        ms = 1;
    uint64_t s = ms / 1000 + (ms % 1000 != 0); /* rounded up, without overflow */
    if (ms <= 99999999)
        snprintf(buf, cap, "%llum", (unsigned long long)ms);
    else if (s <= 99999999)
        snprintf(buf, cap, "%lluS", (unsigned long long)s);
    else
        snprintf(buf, cap, "99999999S");
    return buf;
}

/* ---- grpc-message --------------------------------------------------------------------- */

size_t spk_grpc_message_encode(const char *msg, size_t n, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    if (cap == 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)msg[i];
        bool plain = c >= 0x20 && c <= 0x7E && c != '%';
        size_t need = plain ? 1 : 3;
        if (o + need > cap - 1)
            break;
        if (plain) {
            out[o++] = (char)c;
        } else {
            out[o++] = '%';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        }
    }
    out[o] = '\0';
    return o;
}


size_t spk_grpc_message_decode(const char *value, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n && o + 1 < cap; i++) {
        int hi, lo;
        if (value[i] == '%' && i + 2 < n &&
            (hi = spk_hex_digit(value[i + 1])) >= 0 && (lo = spk_hex_digit(value[i + 2])) >= 0) {
            out[o++] = (char)(hi << 4 | lo);
            i += 2;
        } else {
            out[o++] = value[i];
        }
    }
    if (cap > 0)
        out[o] = '\0';
    return o;
}
