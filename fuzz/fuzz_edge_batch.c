/*
 * fuzz_edge_batch.c -- what hubd does with a request message before any plugin sees it.
 *
 * The input is one SendPluginControlBatchRequest as it arrives (the message of the gRPC
 * body): it is unpacked with protobuf-c as hubd's on_call does, its edge_id checked as
 * there, and each payload checked by spk_hub_payload_validate() (core/hub.c), the same
 * function deliver_payload() calls. A payload that passes is then as hubd hands it to a
 * plugin: every metadata string must be within the limits, NUL-terminated and UTF-8.
 * The same bytes are also unpacked as a HeartbeatRequest. The corpus (fuzz/corpus/
 * edge_batch) holds batch requests built as the uplink builds them, from records of the
 * real queue (fuzz-seeds).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub.h"
#include "json.h"
#include "spoke/control/v1/control.pb-c.h"

static void check(bool ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_edge_batch: %s\n", what);
        abort();
    }
}

static void payload(const Spoke__Control__V1__EdgePayload *p)
{
    spoke_kv md[SPOKE_MAX_METADATA];
    Spoke__Control__V1__PayloadResult r = SPOKE__CONTROL__V1__PAYLOAD_RESULT__INIT;
    if (spk_hub_payload_validate(p, md, &r) != 0) {
        check(r.outcome == SPOKE__CONTROL__V1__PAYLOAD_RESULT__OUTCOME__REFUSED && r.code != NULL &&
                  r.reason != NULL,
              "a refused payload without outcome, code or reason");
        if (r.reason != protobuf_c_empty_string)
            free(r.reason);
        return;
    }
    check(p->plugin_id != 0, "plugin_id 0 accepted");
    check(p->payload.len <= SPOKE_MAX_PAYLOAD, "payload over the limit accepted");
    check(p->n_metadata <= SPOKE_MAX_METADATA, "too many metadata entries accepted");
    for (size_t i = 0; i < p->n_metadata; i++) {
        size_t kl = strlen(md[i].key), vl = strlen(md[i].value);
        check(kl <= SPOKE_MAX_METADATA_KEY && vl <= SPOKE_MAX_METADATA_VALUE,
              "metadata over the limits accepted");
        check(spk_utf8_valid(md[i].key, kl) && spk_utf8_valid(md[i].value, vl),
              "metadata that is not UTF-8 accepted");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    Spoke__Control__V1__SendPluginControlBatchRequest *b =
        spoke__control__v1__send_plugin_control_batch_request__unpack(NULL, size, data);
    if (b != NULL) {
        /* on_call: a batch without a valid edge_id is refused before its payloads */
        if (b->edge_id != NULL && b->edge_id[0] != '\0' &&
            spk_utf8_valid(b->edge_id, strlen(b->edge_id)))
            for (size_t i = 0; i < b->n_payloads; i++)
                payload(b->payloads[i]);
        spoke__control__v1__send_plugin_control_batch_request__free_unpacked(b, NULL);
    }
    Spoke__Control__V1__HeartbeatRequest *h =
        spoke__control__v1__heartbeat_request__unpack(NULL, size, data);
    if (h != NULL)
        spoke__control__v1__heartbeat_request__free_unpacked(h, NULL);
    return 0;
}
