/*
 * fuzz_grpc_body.c -- gRPC framing (transport/grpc.c) as both ends receive it.
 *
 * Input: [limit][chunk][body...]. The body bytes are handed to spk_grpc_body_append() in
 * DATA frames of (chunk + 1) bytes, with a message limit of 1 << (limit % 24) bytes, then
 * spk_grpc_body_finish(); a message that comes out is decoded as hubd decodes the
 * request of each method it serves (SendPluginControlBatchRequest, HeartbeatRequest,
 * grpc.health.v1 HealthCheckRequest) and as the uplink decodes the batch response.
 * Oracles: a finished message lies inside the body after its 5-byte prefix, is as long
 * as the prefix says and no longer than the limit. The whole input is also fed to the
 * header parsers: grpc-timeout, and grpc-message, whose decode must undo its encode.
 * The corpus (fuzz/corpus/grpc_body) holds batch requests framed as the uplink frames
 * them, from records of the real queue (fuzz-seeds).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grpc.h"
#include "grpc/health/v1/health.pb-c.h"
#include "spoke/control/v1/control.pb-c.h"

static void check(bool ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_grpc_body: %s\n", what);
        abort();
    }
}

static void decode(const uint8_t *msg, size_t len)
{
    Spoke__Control__V1__SendPluginControlBatchRequest *b =
        spoke__control__v1__send_plugin_control_batch_request__unpack(NULL, len, msg);
    if (b != NULL)
        spoke__control__v1__send_plugin_control_batch_request__free_unpacked(b, NULL);
    Spoke__Control__V1__SendPluginControlBatchResponse *r =
        spoke__control__v1__send_plugin_control_batch_response__unpack(NULL, len, msg);
    if (r != NULL)
        spoke__control__v1__send_plugin_control_batch_response__free_unpacked(r, NULL);
    Spoke__Control__V1__HeartbeatRequest *h =
        spoke__control__v1__heartbeat_request__unpack(NULL, len, msg);
    if (h != NULL)
        spoke__control__v1__heartbeat_request__free_unpacked(h, NULL);
    Grpc__Health__V1__HealthCheckRequest *c =
        grpc__health__v1__health_check_request__unpack(NULL, len, msg);
    if (c != NULL)
        grpc__health__v1__health_check_request__free_unpacked(c, NULL);
}

static void framing(const uint8_t *data, size_t size)
{
    if (size < 2)
        return;
    size_t max_msg = (size_t)1 << (data[0] % 24), chunk = (size_t)data[1] + 1;
    const uint8_t *body = data + 2;
    size_t n = size - 2;
    spk_grpc_body b;
    spk_errbuf eb;
    spk_grpc_body_init(&b, max_msg);
    for (size_t off = 0; off < n; off += chunk) {
        size_t take = n - off < chunk ? n - off : chunk;
        uint8_t *frame = malloc(take); /* exactly one DATA frame's bytes */
        check(frame != NULL, "out of memory");
        memcpy(frame, body + off, take);
        spk_grpc_code rc = spk_grpc_body_append(&b, frame, take, &eb);
        free(frame);
        if (rc != SPK_GRPC_OK) {
            spk_grpc_body_free(&b);
            return;
        }
    }
    const uint8_t *msg;
    size_t len;
    if (spk_grpc_body_finish(&b, &msg, &len, &eb) == SPK_GRPC_OK) {
        check(n >= SPK_GRPC_PREFIX + len, "message longer than the body");
        check(len <= max_msg, "message over the limit");
        uint32_t declared =
            (uint32_t)body[1] << 24 | (uint32_t)body[2] << 16 | (uint32_t)body[3] << 8 | body[4];
        check(declared == len, "message length differs from its prefix");
        check(memcmp(msg, body + SPK_GRPC_PREFIX, len) == 0, "message differs from the body");
        decode(msg, len);
    }
    spk_grpc_body_free(&b);
}

static void headers(const uint8_t *data, size_t size)
{
    uint64_t ms;
    if (spk_grpc_timeout_parse((const char *)data, size, &ms) == 0) {
        /* rounded up: 0 ms only for a value of 0; what is formatted parses back no shorter */
        char buf[32];
        uint64_t back;
        check(ms > 0 || strspn((const char *)data, "0") == size - 1,
              "a grpc-timeout above 0 parsed to 0 ms");
        spk_grpc_timeout_format(ms, buf, sizeof(buf));
        check(spk_grpc_timeout_parse(buf, strlen(buf), &back) == 0 &&
                  (back >= ms || ms > 99999999ull * 1000),
              "a formatted grpc-timeout does not parse back to at least its value");
    }
    (void)spk_grpc_content_type_ok((const char *)data, size);
    /* decode(encode(m)) == m, for a message that fits whole */
    size_t cap = 3 * size + 1;
    char *enc = malloc(cap), *dec = malloc(size + 1);
    check(enc != NULL && dec != NULL, "out of memory");
    size_t elen = spk_grpc_message_encode((const char *)data, size, enc, cap);
    size_t dlen = spk_grpc_message_decode(enc, elen, dec, size + 1);
    check(dlen == size && memcmp(dec, data, size) == 0,
          "grpc-message: decoding the encoding does not give the message back");
    /* and decoding anything stays inside its buffer */
    spk_grpc_message_decode((const char *)data, size, dec, size + 1);
    free(enc);
    free(dec);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    framing(data, size);
    headers(data, size);
    return 0;
}
