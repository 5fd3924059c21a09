/*
 * json.h -- strict well-formedness checks for JSON text (RFC 8259) and UTF-8.
 *
 * send_to_control_json() refuses text that is not exactly one well-formed JSON value, and
 * the queue refuses strings that are not UTF-8 (a protobuf `string` field must be UTF-8,
 * and a receiver in another language would reject the whole batch otherwise). Both checks
 * are single passes over the input: no allocation, no recursion (nesting is tracked with a
 * fixed bit stack), and they never read past `len`.
 */
#ifndef SPK_JSON_H
#define SPK_JSON_H

#include <stdbool.h>
#include <stddef.h>

/* Deepest nesting of arrays/objects spk_json_valid() accepts; deeper text is refused. */
#define SPK_JSON_MAX_DEPTH 512

/* True when text[0..len) is one JSON value (RFC 8259: object, array, string, number,
 * true, false or null), optionally surrounded by JSON whitespace, in valid UTF-8 (no BOM,
 * no overlong forms, no surrogates, no NUL bytes outside escapes). Strings must have
 * valid escapes; "\uD800" style lone surrogate escapes are accepted, as RFC 8259 allows
 * them syntactically. Nesting deeper than SPK_JSON_MAX_DEPTH is refused. `text` may be
 * NULL only when len is 0 (which is not valid JSON). */
bool spk_json_valid(const char *text, size_t len);

/* True when s[0..len) is valid UTF-8 (RFC 3629: no overlong forms, no surrogates,
 * nothing above U+10FFFF). NUL bytes are allowed by this function. */
bool spk_utf8_valid(const char *s, size_t len);

/* The one JSON string escaper (RFC 8259): writes s[0..len) as the body of a JSON string
 * (no quotes) into out[0..cap), NUL-terminated: '"' and '\\' are escaped, control
 * characters become \n, \t, \r or \u00XX, and a byte that does not start a valid UTF-8
 * sequence becomes \ufffd, so the result is always valid JSON in valid UTF-8. Stops
 * before an escape or character that would not fit (never splits one). Returns the bytes
 * written, without the NUL; cap must be at least 1. */
size_t spk_json_escape(char *out, size_t cap, const char *s, size_t len);

#endif
