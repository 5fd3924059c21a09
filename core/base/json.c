/*
 * json.c -- strict JSON (RFC 8259) and UTF-8 validators; see json.h.
 *
 * The JSON checker is a small state machine driven by one loop over the bytes. The
 * container stack is a bit array (1 = object, 0 = array) of SPK_JSON_MAX_DEPTH bits, so
 * the checker needs no allocation and no recursion, and hostile input cannot blow the C
 * stack. After a value completes, the state says what may follow: ',' or the closing
 * bracket of the innermost container, or the end of the text at depth 0.
 */
#include "json.h"

#include <stdint.h>
#include <string.h>

/* Length of the UTF-8 sequence at s[0..len), or 0 if it is not valid. */
static size_t utf8_seq(const unsigned char *s, size_t len)
{
    unsigned char c = s[0];
    if (c < 0x80)
        return 1;
    size_t n;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (len < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return 0; /* overlong or out of range */
    if (cp >= 0xD800 && cp <= 0xDFFF)
        return 0; /* surrogate */
    return n;
}

bool spk_utf8_valid(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        size_t n = utf8_seq(p + i, len - i);
        if (n == 0)
            return false;
        i += n;
    }
    return true;
}

size_t spk_json_escape(char *out, size_t cap, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    size_t o = 0, i = 0;
    while (i < len) {
        char esc[8];
        const char *src = esc;
        size_t n, step = 1;
        unsigned char c = p[i];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            n = 2;
        } else if (c == '\n' || c == '\t' || c == '\r') {
            esc[0] = '\\';
            esc[1] = c == '\n' ? 'n' : c == '\t' ? 't' : 'r';
            n = 2;
        } else if (c < 0x20 || c == 0x7f) {
            memcpy(esc, "\\u00", 4);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            n = 6;
        } else if (c < 0x80) {
            src = (const char *)p + i;
            n = 1;
        } else if ((step = utf8_seq(p + i, len - i)) != 0) {
            src = (const char *)p + i;
            n = step;
        } else {
            src = "\\ufffd";
            n = 6;
            step = 1;
        }
        if (o + n + 1 > cap)
            break;
        memcpy(out + o, src, n);
        o += n;
        i += step;
    }
    out[o] = '\0';
    return o;
}

static bool is_ws(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static bool is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

static bool is_hex(unsigned char c)
{
    return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* Scan a string starting after its opening quote; returns the index after the closing
 * quote, or 0 on error. */
static size_t scan_string(const unsigned char *p, size_t len, size_t i)
{
    while (i < len) {
        unsigned char c = p[i];
        if (c == '"')
            return i + 1;
        if (c < 0x20)
            return 0; /* control characters must be escaped */
        if (c == '\\') {
            if (i + 1 >= len)
                return 0;
            unsigned char e = p[i + 1];
            if (e == 'u') {
                if (i + 6 > len)
                    return 0;
                for (size_t k = 2; k < 6; k++)
                    if (!is_hex(p[i + k]))
                        return 0;
                i += 6;
            } else if (strchr("\"\\/bfnrt", e) != NULL && e != '\0') {
                i += 2;
            } else {
                return 0;
            }
            continue;
        }
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n = utf8_seq(p + i, len - i);
        if (n == 0)
            return 0;
        i += n;
    }
    return 0; /* unterminated */
}

/* Scan a number; returns the index after it, or 0 on error. */
static size_t scan_number(const unsigned char *p, size_t len, size_t i)
{
    if (i < len && p[i] == '-')
        i++;
    if (i >= len)
        return 0;
    if (p[i] == '0') {
        i++;
    } else if (p[i] >= '1' && p[i] <= '9') {
        while (i < len && is_digit(p[i]))
            i++;
    } else {
        return 0;
    }
    if (i < len && p[i] == '.') {
        i++;
        if (i >= len || !is_digit(p[i]))
            return 0;
        while (i < len && is_digit(p[i]))
            i++;
    }
    if (i < len && (p[i] == 'e' || p[i] == 'E')) {
        i++;
        if (i < len && (p[i] == '+' || p[i] == '-'))
            i++;
        if (i >= len || !is_digit(p[i]))
            return 0;
        while (i < len && is_digit(p[i]))
            i++;
    }
    return i;
}

static size_t scan_literal(const unsigned char *p, size_t len, size_t i, const char *lit)
{
    size_t n = strlen(lit);
    if (len - i < n || memcmp(p + i, lit, n) != 0)
        return 0;
    return i + n;
}

enum { EXPECT_VALUE, EXPECT_VALUE_OR_CLOSE, EXPECT_KEY, EXPECT_KEY_OR_CLOSE, EXPECT_COLON,
       EXPECT_COMMA_OR_CLOSE };

bool spk_json_valid(const char *text, size_t len)
{
    const unsigned char *p = (const unsigned char *)text;
    unsigned char stack[SPK_JSON_MAX_DEPTH / 8];
    size_t depth = 0;
    int state = EXPECT_VALUE;
    size_t i = 0;

    if (text == NULL)
        return false;
    for (;;) {
        while (i < len && is_ws(p[i]))
            i++;
        if (i >= len)
            return depth == 0 && state == EXPECT_COMMA_OR_CLOSE;
        unsigned char c = p[i];
        bool in_object = depth > 0 && (stack[(depth - 1) / 8] >> ((depth - 1) % 8)) & 1;

        if (state == EXPECT_COMMA_OR_CLOSE) {
            if (depth == 0)
                return false; /* trailing garbage after the top-level value */
            if (c == ',') {
                state = in_object ? EXPECT_KEY : EXPECT_VALUE;
                i++;
            } else if (c == (in_object ? '}' : ']')) {
                depth--;
                i++;
            } else {
                return false;
            }
            continue;
        }
        if (state == EXPECT_COLON) {
            if (c != ':')
                return false;
            state = EXPECT_VALUE;
            i++;
            continue;
        }
        if (state == EXPECT_KEY || state == EXPECT_KEY_OR_CLOSE) {
            if (c == '}' && state == EXPECT_KEY_OR_CLOSE) {
                depth--;
                state = EXPECT_COMMA_OR_CLOSE;
                i++;
                continue;
            }
            if (c != '"')
                return false;
            i = scan_string(p, len, i + 1);
            if (i == 0)
                return false;
            state = EXPECT_COLON;
            continue;
        }
        /* EXPECT_VALUE or EXPECT_VALUE_OR_CLOSE */
        if (c == ']' && state == EXPECT_VALUE_OR_CLOSE) {
            depth--;
            state = EXPECT_COMMA_OR_CLOSE;
            i++;
            continue;
        }
        if (c == '{' || c == '[') {
            if (depth >= SPK_JSON_MAX_DEPTH)
                return false;
            unsigned char bit = (unsigned char)(1u << (depth % 8));
            if (c == '{')
                stack[depth / 8] |= bit;
            else
                stack[depth / 8] &= (unsigned char)~bit;
            depth++;
            state = c == '{' ? EXPECT_KEY_OR_CLOSE : EXPECT_VALUE_OR_CLOSE;
            i++;
            continue;
        }
        size_t next;
        if (c == '"')
            next = scan_string(p, len, i + 1);
        else if (c == '-' || is_digit(c))
            next = scan_number(p, len, i);
        else if (c == 't')
            next = scan_literal(p, len, i, "true");
        else if (c == 'f')
            next = scan_literal(p, len, i, "false");
        else if (c == 'n')
            next = scan_literal(p, len, i, "null");
        else
            return false;
        if (next == 0)
            return false;
        i = next;
        state = EXPECT_COMMA_OR_CLOSE;
    }
}
