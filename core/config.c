/*
 * config.c -- load spoke.yaml into an spk_config (see config.h and docs/config.md).
 *
 * Two passes. First libyaml's event parser builds a small tree of nodes (mapping, list,
 * scalar), each with the 1-based line it starts on. That pass alone deals with YAML as
 * such: syntax errors, aliases, non-string keys, nesting depth. Then a schema pass walks
 * the tree with tables of known keys -- one table per top-level section, one for a
 * plugins.list entry. A table row names the key, a parser that checks the node's type,
 * syntax and range and stores the value at an offset in spk_config (or spk_plugin_conf),
 * and a printer for spk_config_dump(), so the parser and the dump cannot drift apart.
 * The row also holds the key's default and range, the one place each is written (a
 * test holds docs/config.md to them). Before the schema pass every row's default is
 * loaded through the row's own parser, as if the file said it; a key not written keeps
 * it. Only edge.id and run_dir are computed at load. Checks
 * that span keys (listen.upstream required, plugin paths resolved against plugins.dir,
 * duplicate plugin names and IDs, queue.max_bytes within queue.map_size) run last, when
 * every key is known.
 *
 * Every error goes through cfg_fail(), which formats "file:line: dotted.key: what is
 * wrong" into the errbuf and returns SPK_ECONFIG. The first error ends the load; the tree
 * and the half-built config are freed (spk_config_free copes with any partial state,
 * because every container's count is only raised once its element is fully owned).
 */
#include "hex.h"
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <yaml.h>

#include "log.h"
#include "metrics.h"
#include "policy.h"
#include "queue.h"

#define MAX_DEPTH         64    /* YAML nesting we accept; protects the recursion */
#define MAX_PLUGIN_CONFIG 10000 /* flattened `config:` entries per plugin */
#define MAX_NAME          64    /* plugins.list[].name */

/* Short names for the tables' ranges and defaults. */
#define KiB  SPK_KiB
#define MiB  SPK_MiB
#define GiB  SPK_GiB
#define TiB  SPK_TiB
#define SEC  SPK_SEC_MS
#define HOUR SPK_HOUR_MS
#define DAY  SPK_DAY_MS

/* ---- the node tree ----------------------------------------------------------------- */

enum node_kind { NODE_SCALAR, NODE_MAP, NODE_SEQ };

typedef struct node node;

typedef struct node_pair {
    char *key;
    int line; /* of the key */
    node *val;
} node_pair;

struct node {
    enum node_kind kind;
    int line;
    bool plain;       /* scalar written without quotes (only those can be null) */
    bool literal;     /* scalar written as a literal block (|): its text starts on the
                         line below, and its lines are the file's */
    char *text;       /* scalar value */
    size_t n;         /* pairs of a map, items of a list */
    node_pair *pairs; /* NODE_MAP */
    node **items;     /* NODE_SEQ */
};

static void node_free(node *n)
{
    if (n == NULL)
        return;
    free(n->text);
    for (size_t i = 0; n->kind == NODE_MAP && i < n->n; i++) {
        free(n->pairs[i].key);
        node_free(n->pairs[i].val);
    }
    for (size_t i = 0; n->kind == NODE_SEQ && i < n->n; i++)
        node_free(n->items[i]);
    free(n->pairs);
    free(n->items);
    free(n);
}

/* A plain empty scalar, "~" or "null": `key:` with nothing after it. */
static bool node_is_null(const node *n)
{
    if (n == NULL)
        return true;
    if (n->kind != NODE_SCALAR || !n->plain)
        return false;
    const char *t = n->text;
    return t[0] == '\0' || strcmp(t, "~") == 0 || strcmp(t, "null") == 0 ||
           strcmp(t, "Null") == 0 || strcmp(t, "NULL") == 0;
}

static const char *node_kind_name(const node *n)
{
    if (node_is_null(n))
        return "an empty value";
    switch (n->kind) {
    case NODE_MAP:
        return "a mapping";
    case NODE_SEQ:
        return "a list";
    case NODE_SCALAR:
        break;
    }
    return "a string";
}

/* The pair for `key` in map `m`, or NULL. */
static const node_pair *node_get(const node *m, const char *key)
{
    if (m == NULL || m->kind != NODE_MAP)
        return NULL;
    for (size_t i = 0; i < m->n; i++)
        if (strcmp(m->pairs[i].key, key) == 0)
            return &m->pairs[i];
    return NULL;
}

/* ---- pass 1: YAML events to a tree ------------------------------------------------- */

typedef struct tree_ctx {
    yaml_parser_t parser;
    const char *file;
    spk_errbuf *eb;
} tree_ctx;

static int mark_line(yaml_mark_t m)
{
    return m.line + 1 > (size_t)INT_MAX ? INT_MAX : (int)(m.line + 1);
}

static int tree_syntax_error(tree_ctx *t)
{
    const yaml_parser_t *p = &t->parser;
    const char *problem = p->problem ? p->problem : "unknown error";
    if (p->error == YAML_MEMORY_ERROR)
        return spk_errf(t->eb, SPK_ENOMEM, "%s: out of memory while parsing YAML", t->file);
    if (p->error == YAML_READER_ERROR)
        return spk_errf(t->eb, SPK_ECONFIG, "%s:%d: YAML syntax error: %s (byte %zu)", t->file,
                        mark_line(p->mark), problem, p->problem_offset);
    if (p->context != NULL)
        return spk_errf(t->eb, SPK_ECONFIG,
                        "%s:%d: YAML syntax error: %s (column %zu; %s that starts at line %d)",
                        t->file, mark_line(p->problem_mark), problem, p->problem_mark.column + 1,
                        p->context, mark_line(p->context_mark));
    return spk_errf(t->eb, SPK_ECONFIG, "%s:%d: YAML syntax error: %s (column %zu)", t->file,
                    mark_line(p->problem_mark), problem, p->problem_mark.column + 1);
}

static int tree_next(tree_ctx *t, yaml_event_t *ev)
{
    if (yaml_parser_parse(&t->parser, ev))
        return 0;
    return tree_syntax_error(t);
}

static int tree_nomem(tree_ctx *t)
{
    return spk_errf(t->eb, SPK_ENOMEM, "%s: out of memory", t->file);
}

static int tree_build(tree_ctx *t, yaml_event_t *ev, int depth, node **out);

/* Read the next event and build the node it starts. */
static int tree_build_next(tree_ctx *t, int depth, node **out)
{
    yaml_event_t ev;
    int rc = tree_next(t, &ev);
    if (rc != 0)
        return rc;
    rc = tree_build(t, &ev, depth, out);
    yaml_event_delete(&ev);
    return rc;
}

static int tree_map(tree_ctx *t, node *m, int depth)
{
    size_t cap = 0;
    for (;;) {
        yaml_event_t kev;
        int rc = tree_next(t, &kev);
        if (rc != 0)
            return rc;
        if (kev.type == YAML_MAPPING_END_EVENT) {
            yaml_event_delete(&kev);
            return 0;
        }
        if (kev.type != YAML_SCALAR_EVENT) {
            rc = spk_errf(t->eb, SPK_ECONFIG, "%s:%d: mapping keys must be strings, not %s",
                          t->file, mark_line(kev.start_mark),
                          kev.type == YAML_ALIAS_EVENT ? "aliases" : "collections");
            yaml_event_delete(&kev);
            return rc;
        }
        if (m->n == cap) {
            size_t ncap = cap ? cap * 2 : 8;
            node_pair *np = realloc(m->pairs, ncap * sizeof(*np));
            if (np == NULL) {
                yaml_event_delete(&kev);
                return tree_nomem(t);
            }
            m->pairs = np;
            cap = ncap;
        }
        node_pair *p = &m->pairs[m->n];
        p->line = mark_line(kev.start_mark);
        p->val = NULL;
        p->key = strndup((const char *)kev.data.scalar.value, kev.data.scalar.length);
        bool has_nul = strlen((const char *)kev.data.scalar.value) != kev.data.scalar.length;
        yaml_event_delete(&kev);
        if (p->key == NULL)
            return tree_nomem(t);
        m->n++;
        if (has_nul)
            return spk_errf(t->eb, SPK_ECONFIG, "%s:%d: a key contains a NUL character", t->file,
                            p->line);
        if ((rc = tree_build_next(t, depth + 1, &p->val)) != 0)
            return rc;
        /* `key:` with nothing after it: report it on the key's line, not the next one */
        if (node_is_null(p->val))
            p->val->line = p->line;
    }
}

static int tree_seq(tree_ctx *t, node *s, int depth)
{
    size_t cap = 0;
    for (;;) {
        yaml_event_t ev;
        int rc = tree_next(t, &ev);
        if (rc != 0)
            return rc;
        if (ev.type == YAML_SEQUENCE_END_EVENT) {
            yaml_event_delete(&ev);
            return 0;
        }
        if (s->n == cap) {
            size_t ncap = cap ? cap * 2 : 8;
            node **nv = realloc(s->items, ncap * sizeof(*nv));
            if (nv == NULL) {
                yaml_event_delete(&ev);
                return tree_nomem(t);
            }
            s->items = nv;
            cap = ncap;
        }
        s->items[s->n] = NULL;
        rc = tree_build(t, &ev, depth + 1, &s->items[s->n]);
        yaml_event_delete(&ev);
        if (s->items[s->n] != NULL)
            s->n++;
        if (rc != 0)
            return rc;
    }
}

/* Build the node that `ev` starts (ev stays owned by the caller). On failure *out may
 * hold a partial node, which the caller frees. */
static int tree_build(tree_ctx *t, yaml_event_t *ev, int depth, node **out)
{
    int line = mark_line(ev->start_mark);
    if (ev->type == YAML_ALIAS_EVENT)
        return spk_errf(t->eb, SPK_ECONFIG, "%s:%d: YAML aliases (*%s) are not supported", t->file,
                        line, (const char *)ev->data.alias.anchor);
    if (depth > MAX_DEPTH)
        return spk_errf(t->eb, SPK_ECONFIG, "%s:%d: nested deeper than %d levels", t->file, line,
                        MAX_DEPTH);
    node *n = calloc(1, sizeof(*n));
    if (n == NULL)
        return tree_nomem(t);
    *out = n;
    n->line = line;
    switch (ev->type) {
    case YAML_SCALAR_EVENT:
        n->kind = NODE_SCALAR;
        n->plain = ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
        n->literal = ev->data.scalar.style == YAML_LITERAL_SCALAR_STYLE;
        n->text = strndup((const char *)ev->data.scalar.value, ev->data.scalar.length);
        if (n->text == NULL)
            return tree_nomem(t);
        if (strlen(n->text) != ev->data.scalar.length)
            return spk_errf(t->eb, SPK_ECONFIG, "%s:%d: a value contains a NUL character", t->file,
                            line);
        return 0;
    case YAML_MAPPING_START_EVENT:
        n->kind = NODE_MAP;
        return tree_map(t, n, depth);
    case YAML_SEQUENCE_START_EVENT:
        n->kind = NODE_SEQ;
        return tree_seq(t, n, depth);
    default:
        return spk_errf(t->eb, SPK_ECONFIG, "%s:%d: unexpected YAML event", t->file, line);
    }
}

/* Parse one YAML document from f. An empty file gives *root = NULL. */
static int tree_read(FILE *f, const char *file, node **root, spk_errbuf *eb)
{
    tree_ctx t = {.file = file, .eb = eb};
    yaml_event_t ev;
    int rc;
    *root = NULL;
    if (!yaml_parser_initialize(&t.parser))
        return spk_errf(eb, SPK_ENOMEM, "%s: out of memory", file);
    yaml_parser_set_input_file(&t.parser, f);
    if ((rc = tree_next(&t, &ev)) != 0) /* STREAM-START */
        goto done;
    yaml_event_delete(&ev);
    if ((rc = tree_next(&t, &ev)) != 0)
        goto done;
    if (ev.type == YAML_STREAM_END_EVENT) {
        yaml_event_delete(&ev);
        goto done;
    }
    yaml_event_delete(&ev); /* DOCUMENT-START */
    if ((rc = tree_build_next(&t, 0, root)) != 0)
        goto done;
    if ((rc = tree_next(&t, &ev)) != 0) /* DOCUMENT-END */
        goto done;
    yaml_event_delete(&ev);
    if ((rc = tree_next(&t, &ev)) != 0)
        goto done;
    if (ev.type != YAML_STREAM_END_EVENT)
        rc = spk_errf(eb, SPK_ECONFIG, "%s:%d: only one YAML document is allowed", file,
                      mark_line(ev.start_mark));
    yaml_event_delete(&ev);
done:
    yaml_parser_delete(&t.parser);
    if (rc != 0) {
        node_free(*root);
        *root = NULL;
    }
    return rc;
}

/* ---- pass 2: the schema ------------------------------------------------------------ */

typedef struct cfg_ctx {
    const char *file;
    spk_errbuf *eb;
    spk_config *cfg;
} cfg_ctx;

static int cfg_fail(cfg_ctx *c, int line, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int cfg_fail(cfg_ctx *c, int line, const char *key, const char *fmt, ...)
{
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (key == NULL || key[0] == '\0')
        return spk_errf(c->eb, SPK_ECONFIG, "%s:%d: %s", c->file, line, msg);
    return spk_errf(c->eb, SPK_ECONFIG, "%s:%d: %s: %s", c->file, line, key, msg);
}

static int cfg_nomem(cfg_ctx *c)
{
    return spk_errf(c->eb, SPK_ENOMEM, "%s: out of memory", c->file);
}

typedef struct field field;
typedef int (*field_parse_fn)(cfg_ctx *c, const node *v, const char *key, void *base,
                              const field *f);
typedef void (*field_dump_fn)(FILE *out, const void *base, const field *f, int indent);

/* One known key, and the one place its default and range are written. `off`/`width`
 * locate the value in the section's struct; min..max is the accepted range of numbers,
 * durations and sizes; words name an enum's values by index. The default is `def` for a
 * number, duration, size, bool or enum (an index into words), `def_text` for a string or
 * an address list (NULL: none, or computed at load -- the row says which). */
struct field {
    const char *name;
    field_parse_fn parse;
    field_dump_fn dump;
    size_t off, width;
    uint64_t min, max;
    const char *const *words;
    uint64_t def;
    const char *def_text;
};

static void *at(void *base, const field *f)
{
    return (char *)base + f->off;
}

static const void *cat(const void *base, const field *f)
{
    return (const char *)base + f->off;
}

/* Store a range-checked number into an integer, bool or enum member of any width. */
static void store_uint(void *p, size_t width, uint64_t v)
{
    if (width == 1) {
        uint8_t x = (uint8_t)v;
        memcpy(p, &x, 1);
    } else if (width == 2) {
        uint16_t x = (uint16_t)v;
        memcpy(p, &x, 2);
    } else if (width == 4) {
        uint32_t x = (uint32_t)v;
        memcpy(p, &x, 4);
    } else {
        memcpy(p, &v, 8);
    }
}

static uint64_t load_uint(const void *p, size_t width)
{
    if (width == 1) {
        uint8_t x;
        memcpy(&x, p, 1);
        return x;
    }
    if (width == 2) {
        uint16_t x;
        memcpy(&x, p, 2);
        return x;
    }
    if (width == 4) {
        uint32_t x;
        memcpy(&x, p, 4);
        return x;
    }
    uint64_t x;
    memcpy(&x, p, 8);
    return x;
}

/* A scalar that is not empty, or an error naming what was expected. */
static int want_scalar(cfg_ctx *c, const node *v, const char *key, const char *what)
{
    if (v->kind == NODE_SCALAR && !node_is_null(v))
        return 0;
    return cfg_fail(c, v->line, key, "expected %s, got %s", what, node_kind_name(v));
}

static int set_string(cfg_ctx *c, char **slot, const char *text)
{
    char *s = strdup(text);
    if (s == NULL)
        return cfg_nomem(c);
    free(*slot);
    *slot = s;
    return 0;
}

static int p_str(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    int rc = want_scalar(c, v, key, "a string");
    return rc != 0 ? rc : set_string(c, at(base, f), v->text);
}

/* A string that may be left out with `~` (the default is "none"). */
static int p_str_opt(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    if (node_is_null(v)) {
        char **slot = at(base, f);
        free(*slot);
        *slot = NULL;
        return 0;
    }
    return p_str(c, v, key, base, f);
}

/* plugins.dir: trailing slashes dropped, so that dir + "/" + file is canonical (the loader
 * builds autoload paths the same way and compares them with the listed ones). */
static int p_dir(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    int rc = p_str(c, v, key, base, f);
    if (rc != 0)
        return rc;
    char *s = *(char **)at(base, f);
    for (size_t len = strlen(s); len > 1 && s[len - 1] == '/'; len--)
        s[len - 1] = '\0';
    return 0;
}

static int word_index(const char *const *words, const char *text)
{
    for (int i = 0; words[i] != NULL; i++)
        if (strcmp(words[i], text) == 0)
            return i;
    return -1;
}

static const char *const bool_true[] = {"true", "True", "TRUE", "yes", "Yes",
                                        "YES",  "on",   "On",   "ON",  NULL};
static const char *const bool_false[] = {"false", "False", "FALSE", "no",  "No",
                                         "NO",    "off",   "Off",   "OFF", NULL};

static int p_bool(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    static const char what[] = "true or false";
    int rc = want_scalar(c, v, key, what);
    if (rc != 0)
        return rc;
    if (word_index(bool_true, v->text) >= 0)
        *(bool *)at(base, f) = true;
    else if (word_index(bool_false, v->text) >= 0)
        *(bool *)at(base, f) = false;
    else
        return cfg_fail(c, v->line, key, "expected %s, got '%.100s'", what, v->text);
    return 0;
}

static int p_enum(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    char what[128] = "one of ";
    for (int i = 0; f->words[i] != NULL; i++) {
        strncat(what, f->words[i], sizeof(what) - strlen(what) - 1);
        if (f->words[i + 1] != NULL)
            strncat(what, ", ", sizeof(what) - strlen(what) - 1);
    }
    int rc = want_scalar(c, v, key, what);
    if (rc != 0)
        return rc;
    int i = word_index(f->words, v->text);
    if (i < 0)
        return cfg_fail(c, v->line, key, "expected %s, got '%.100s'", what, v->text);
    store_uint(at(base, f), f->width, (uint64_t)i);
    return 0;
}

static int p_uint(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    char what[96];
    snprintf(what, sizeof(what), "an integer in %llu..%llu", (unsigned long long)f->min,
             (unsigned long long)f->max);
    int rc = want_scalar(c, v, key, what);
    if (rc != 0)
        return rc;
    uint64_t n;
    const char *end;
    if (spk_parse_digits(v->text, &n, &end) != 0 || *end != '\0' || n < f->min || n > f->max)
        return cfg_fail(c, v->line, key, "expected %s, got '%.100s'", what, v->text);
    store_uint(at(base, f), f->width, n);
    return 0;
}

/* listen.workers: a number, or "auto" (stored as 0). */
static int p_workers(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    if (v->kind == NODE_SCALAR && strcmp(v->text, "auto") == 0) {
        store_uint(at(base, f), f->width, 0);
        return 0;
    }
    uint64_t n;
    const char *end;
    if (v->kind != NODE_SCALAR || spk_parse_digits(v->text, &n, &end) != 0 || *end != '\0' ||
        n < f->min || n > f->max)
        return cfg_fail(
            c, v->line, key, "expected 'auto' or an integer in %llu..%llu, got %s%.100s%s",
            (unsigned long long)f->min, (unsigned long long)f->max,
            v->kind == NODE_SCALAR ? "'" : "", v->kind == NODE_SCALAR ? v->text : node_kind_name(v),
            v->kind == NODE_SCALAR ? "'" : "");
    store_uint(at(base, f), f->width, n);
    return 0;
}

static int check_duration(cfg_ctx *c, const node *v, const char *key, const field *f, uint64_t *ms)
{
    static const char what[] = "a duration such as 50ms or 2s";
    int rc = want_scalar(c, v, key, what);
    if (rc != 0)
        return rc;
    if (spk_parse_duration_ms(v->text, ms) != 0)
        return cfg_fail(c, v->line, key, "expected %s, got '%.100s'", what, v->text);
    if (*ms < f->min || *ms > f->max) {
        char lo[32], hi[32];
        return cfg_fail(c, v->line, key, "%s is out of range %s..%s", v->text,
                        spk_fmt_duration(f->min, lo, sizeof(lo)),
                        spk_fmt_duration(f->max, hi, sizeof(hi)));
    }
    return 0;
}

static int p_duration(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    uint64_t ms;
    int rc = check_duration(c, v, key, f, &ms);
    if (rc == 0)
        store_uint(at(base, f), f->width, ms);
    return rc;
}

static int p_size(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    static const char what[] = "a size such as 64KiB or 1GiB";
    int rc = want_scalar(c, v, key, what);
    if (rc != 0)
        return rc;
    uint64_t b;
    if (spk_parse_size(v->text, &b) != 0)
        return cfg_fail(c, v->line, key, "expected %s, got '%.100s'", what, v->text);
    if (b < f->min || b > f->max) {
        char lo[32], hi[32];
        return cfg_fail(c, v->line, key, "%s is out of range %s..%s", v->text,
                        spk_fmt_size(f->min, lo, sizeof(lo)), spk_fmt_size(f->max, hi, sizeof(hi)));
    }
    store_uint(at(base, f), f->width, b);
    return 0;
}

/* queue.sync: "always", or a duration between syncs. */
static int p_sync(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    spk_config *cfg = base;
    if (v->kind == NODE_SCALAR && strcmp(v->text, "always") == 0) {
        cfg->queue_sync_always = true;
        return 0;
    }
    if (v->kind == NODE_SCALAR && !node_is_null(v) &&
        spk_parse_duration_ms(v->text, &(uint64_t){0}) != 0)
        return cfg_fail(c, v->line, key,
                        "expected 'always' or a duration such as 100ms, got '%.100s'", v->text);
    uint64_t ms;
    int rc = check_duration(c, v, key, f, &ms);
    if (rc != 0)
        return rc;
    cfg->queue_sync_always = false;
    cfg->queue_sync_interval_ms = ms;
    return 0;
}

static bool is_digit(char ch)
{
    return ch >= '0' && ch <= '9';
}

static bool is_alnum(char ch)
{
    return is_digit(ch) || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
}

/* RFC 1123 host name: dot-separated labels of [A-Za-z0-9-], 1..63 long, no '-' at an
 * end; 253 bytes at most. */
static bool valid_hostname(const char *h, size_t len)
{
    if (len == 0 || len > 253)
        return false;
    size_t label = 0;
    for (size_t i = 0; i < len; i++) {
        char ch = h[i];
        if (ch == '.') {
            if (label == 0 || h[i - 1] == '-')
                return false;
            label = 0;
            continue;
        }
        if (!is_alnum(ch) && !(ch == '-' && label > 0))
            return false;
        if (++label > 63)
            return false;
    }
    return label > 0 && h[len - 1] != '-';
}

/* Check the syntax of "host:port", "[v6]:port" or "unix:/path" without resolving it.
 * Returns NULL when valid, else the reason (in why). */
static const char *address_problem(const char *s, char *why, size_t cap)
{
    if (strncmp(s, "unix:", 5) == 0) {
        const char *path = s + 5;
        if (path[0] != '/')
            return "a unix socket path must be absolute (unix:/path)";
        if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
            snprintf(why, cap, "a unix socket path must be shorter than %zu bytes",
                     sizeof(((struct sockaddr_un *)0)->sun_path));
            return why;
        }
        return NULL;
    }
    char host[256];
    const char *port;
    if (s[0] == '[') {
        const char *end = strchr(s, ']');
        struct in6_addr a6;
        if (end == NULL || end[1] != ':' || (size_t)(end - s - 1) >= sizeof(host))
            return "expected [ipv6]:port";
        memcpy(host, s + 1, (size_t)(end - s - 1));
        host[end - s - 1] = '\0';
        if (inet_pton(AF_INET6, host, &a6) != 1)
            return "not an IPv6 address between the brackets";
        port = end + 2;
    } else {
        const char *colon = strrchr(s, ':');
        if (colon == NULL)
            return "expected host:port, [ipv6]:port or unix:/path";
        if (memchr(s, ':', (size_t)(colon - s)) != NULL)
            return "an IPv6 address must be in brackets, as in [::1]:6432";
        size_t len = (size_t)(colon - s);
        if (len == 0)
            return "the host is missing (0.0.0.0 means every interface)";
        if (len >= sizeof(host))
            return "the host name is too long";
        memcpy(host, s, len);
        host[len] = '\0';
        if (strspn(host, "0123456789.") == len) {
            struct in_addr a4;
            if (inet_pton(AF_INET, host, &a4) != 1)
                return "not an IPv4 address";
        } else if (!valid_hostname(host, len)) {
            return "not a valid host name";
        }
        port = colon + 1;
    }
    uint64_t pn;
    const char *end;
    if (spk_parse_digits(port, &pn, &end) != 0 || *end != '\0' || pn < 1 || pn > 65535)
        return "the port must be a number in 1..65535";
    return NULL;
}

static int check_address(cfg_ctx *c, const node *v, const char *key)
{
    int rc = want_scalar(c, v, key, "an address (host:port, [ipv6]:port or unix:/path)");
    if (rc != 0)
        return rc;
    char why[128];
    const char *problem = address_problem(v->text, why, sizeof(why));
    if (problem != NULL)
        return cfg_fail(c, v->line, key, "invalid address '%.200s': %s", v->text, problem);
    return 0;
}

static int p_address(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    int rc = check_address(c, v, key);
    return rc != 0 ? rc : set_string(c, at(base, f), v->text);
}

static int p_address_opt(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    return node_is_null(v) ? p_str_opt(c, v, key, base, f) : p_address(c, v, key, base, f);
}

/* uplink.url: http:// or https://, or ~ for no uplink. */
static int p_url(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    if (node_is_null(v))
        return p_str_opt(c, v, key, base, f);
    int rc = want_scalar(c, v, key, "a URL such as https://hub:7443");
    if (rc != 0)
        return rc;
    const char *t = v->text;
    size_t skip = strncmp(t, "https://", 8) == 0 ? 8 : strncmp(t, "http://", 7) == 0 ? 7 : 0;
    if (skip == 0 || t[skip] == '\0' || t[skip] == '/')
        return cfg_fail(c, v->line, key, "expected a URL such as https://hub:7443, got '%.200s'",
                        t);
    return set_string(c, at(base, f), t);
}

static void free_strv(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

/* listen.address: one address or a list of them. */
static int p_listen(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    spk_config *cfg = base;
    const node *one = v;
    size_t n = 1;
    if (v->kind == NODE_SEQ) {
        if (v->n == 0)
            return cfg_fail(c, v->line, key, "expected at least one address, got an empty list");
        if (v->n > SPK_LISTEN_MAX)
            return cfg_fail(c, v->line, key, "%zu addresses, more than the %d a worker listens on",
                            v->n, SPK_LISTEN_MAX);
        n = v->n;
    }
    char **list = calloc(n, sizeof(*list));
    if (list == NULL)
        return cfg_nomem(c);
    char sub[256];
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (v->kind == NODE_SEQ) {
            one = v->items[i];
            snprintf(sub, sizeof(sub), "%s[%zu]", key, i);
        } else {
            snprintf(sub, sizeof(sub), "%s", key);
        }
        if ((rc = check_address(c, one, sub)) == 0 && (list[i] = strdup(one->text)) == NULL)
            rc = cfg_nomem(c);
    }
    if (rc != 0) {
        free_strv(list, n);
        return rc;
    }
    free_strv(cfg->listen, cfg->n_listen);
    cfg->listen = list;
    cfg->n_listen = n;
    return 0;
}

/* run_dir: the admin socket spoked.sock must fit a sockaddr_un. */
#define MAX_RUN_DIR 90

static int p_run_dir(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    int rc = want_scalar(c, v, key, "a directory");
    if (rc != 0)
        return rc;
    if (strlen(v->text) > MAX_RUN_DIR)
        return cfg_fail(c, v->line, key,
                        "'%.100s' is longer than %d bytes (spoked.sock must fit a unix socket "
                        "address)",
                        v->text, MAX_RUN_DIR);
    return p_dir(c, v, key, base, f);
}

/* ---- plugins.list ------------------------------------------------------------------ */

static int p_name(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    if (node_is_null(v))
        return p_str_opt(c, v, key, base, f);
    int rc = want_scalar(c, v, key, "a plugin name");
    if (rc != 0)
        return rc;
    size_t len = strlen(v->text);
    if (len > MAX_NAME)
        return cfg_fail(c, v->line, key, "'%.100s' is longer than %d characters", v->text,
                        MAX_NAME);
    for (size_t i = 0; i < len; i++) {
        char ch = v->text[i];
        if (!is_alnum(ch) && ch != '.' && ch != '_' && ch != '-')
            return cfg_fail(c, v->line, key,
                            "'%.100s' may only contain letters, digits, '.', '_' and '-' "
                            "(convention: lowercase, vendor-prefixed, as in acme-cache)",
                            v->text);
    }
    return set_string(c, at(base, f), v->text);
}

static int p_sha256(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    static const char what[] = "64 hex digits (a SHA-256 sum)";
    spk_plugin_conf *pc = base;
    if (node_is_null(v)) {
        pc->has_sha256 = false;
        return 0;
    }
    int rc = want_scalar(c, v, key, what);
    if (rc != 0)
        return rc;
    const char *t = v->text;
    if (spk_hex_decode(t, pc->sha256, sizeof(pc->sha256)) != 0)
        return cfg_fail(c, v->line, key, "expected %s, got '%.100s'", what, t);
    pc->has_sha256 = true;
    return 0;
}

/* "KEY=value" with KEY in [A-Za-z_][A-Za-z0-9_]* */
static bool valid_env(const char *s)
{
    const char *eq = strchr(s, '=');
    if (eq == NULL || eq == s || is_digit(s[0]))
        return false;
    for (const char *p = s; p < eq; p++)
        if (!is_alnum(*p) && *p != '_')
            return false;
    return true;
}

/* A list of strings (args, env); kept as written. */
static int parse_strv(cfg_ctx *c, const node *v, const char *key, bool env, char ***out,
                      size_t *n_out)
{
    if (node_is_null(v))
        return 0;
    if (v->kind != NODE_SEQ)
        return cfg_fail(c, v->line, key, "expected a list of strings, got %s", node_kind_name(v));
    char **vec = calloc(v->n ? v->n : 1, sizeof(*vec));
    if (vec == NULL)
        return cfg_nomem(c);
    int rc = 0;
    size_t n = 0;
    char sub[256];
    for (; n < v->n; n++) {
        const node *it = v->items[n];
        snprintf(sub, sizeof(sub), "%s[%zu]", key, n);
        /* "" is a fine argument; an empty plain value is a mistake */
        if (it->kind != NODE_SCALAR || node_is_null(it)) {
            rc = cfg_fail(c, it->line, sub, "expected a string, got %s", node_kind_name(it));
            break;
        }
        if (env && !valid_env(it->text)) {
            rc = cfg_fail(c, it->line, sub,
                          "expected KEY=value with KEY made of [A-Za-z0-9_], not starting "
                          "with a digit, got '%.100s'",
                          it->text);
            break;
        }
        if ((vec[n] = strdup(it->text)) == NULL) {
            rc = cfg_nomem(c);
            break;
        }
    }
    if (rc != 0) {
        free_strv(vec, n);
        return rc;
    }
    free_strv(*out, *n_out);
    *out = vec;
    *n_out = n;
    return 0;
}

static int p_args(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    spk_plugin_conf *pc = base;
    return parse_strv(c, v, key, false, &pc->args, &pc->n_args);
}

static int p_env(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    spk_plugin_conf *pc = base;
    return parse_strv(c, v, key, true, &pc->env, &pc->n_env);
}

/* Duplicates among many keys, in O(n log n): (key, index) pairs sorted by key, then by
 * index, put equal keys next to each other with their first occurrence first. A map or a
 * plugin's `config:` with tens of thousands of keys costs no n^2 compares. */
typedef struct keyref {
    const char *key;
    size_t idx;
} keyref;

static int keyref_cmp(const void *a, const void *b)
{
    const keyref *x = a, *y = b;
    int d = strcmp(x->key, y->key);
    return d != 0 ? d : (x->idx > y->idx) - (x->idx < y->idx);
}

/* Sort refs[0..n) (see keyref) and find the first key, in index order, that repeats an
 * earlier one: returns its index and sets *first to the earlier one's; SIZE_MAX when
 * every key differs. */
static size_t first_duplicate(keyref *refs, size_t n, size_t *first)
{
    qsort(refs, n, sizeof(*refs), keyref_cmp);
    size_t dup = SIZE_MAX;
    for (size_t i = 1; i < n; i++) {
        if (refs[i].idx < dup && strcmp(refs[i].key, refs[i - 1].key) == 0) {
            dup = refs[i].idx;
            *first = refs[i - 1].idx;
        }
    }
    return dup;
}

static int check_duplicate_keys(cfg_ctx *c, const node *m, const char *key)
{
    if (m->n < 2)
        return 0;
    keyref *refs = malloc(m->n * sizeof(*refs));
    if (refs == NULL)
        return cfg_nomem(c);
    for (size_t i = 0; i < m->n; i++)
        refs[i] = (keyref){.key = m->pairs[i].key, .idx = i};
    size_t j = 0, i = first_duplicate(refs, m->n, &j);
    free(refs);
    if (i == SIZE_MAX)
        return 0;
    char sub[256];
    snprintf(sub, sizeof(sub), "%s%s%s", key, key[0] ? "." : "", m->pairs[i].key);
    return cfg_fail(c, m->pairs[i].line, sub, "duplicate key (first at line %d)",
                    m->pairs[j].line);
}

/* The flattened `config:` of one plugin, with the line of each entry for messages. */
typedef struct kv_acc {
    spoke_kv *kv;
    int *lines;
    size_t n, cap;
} kv_acc;

static void kv_free(spoke_kv *kv, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free((char *)kv[i].key);
        free((char *)kv[i].value);
    }
    free(kv);
}

/* Append key=value (takes ownership of fkey). Two entries that flatten to the same key
 * are found after the whole map is flattened (config_index). */
static int kv_push(cfg_ctx *c, kv_acc *acc, char *fkey, const node *v, const char *ykey)
{
    if (acc->n == MAX_PLUGIN_CONFIG) {
        free(fkey);
        return cfg_fail(c, v->line, ykey, "more than %d entries", MAX_PLUGIN_CONFIG);
    }
    if (acc->n == acc->cap) {
        size_t ncap = acc->cap ? acc->cap * 2 : 8;
        spoke_kv *nkv = realloc(acc->kv, ncap * sizeof(*nkv));
        if (nkv != NULL)
            acc->kv = nkv;
        int *nl = nkv ? realloc(acc->lines, ncap * sizeof(*nl)) : NULL;
        if (nl == NULL) {
            free(fkey);
            return cfg_nomem(c);
        }
        acc->lines = nl;
        acc->cap = ncap;
    }
    char *val = strdup(node_is_null(v) ? "" : v->text);
    if (val == NULL) {
        free(fkey);
        return cfg_nomem(c);
    }
    acc->kv[acc->n] = (spoke_kv){.key = fkey, .value = val};
    acc->lines[acc->n++] = v->line;
    return 0;
}

static char *join_key(const char *prefix, const char *part)
{
    char *s;
    if (prefix == NULL)
        return strdup(part);
    if (asprintf(&s, "%s.%s", prefix, part) < 0)
        return NULL;
    return s;
}

/* Flatten node v found at flattened key `fkey` (NULL at the root of config:). ykey is the
 * dotted key for messages. */
static int flatten(cfg_ctx *c, const node *v, const char *fkey, const char *ykey, kv_acc *acc)
{
    if (v->kind == NODE_SCALAR) {
        char *k = strdup(fkey);
        return k == NULL ? cfg_nomem(c) : kv_push(c, acc, k, v, ykey);
    }
    int rc = v->kind == NODE_MAP ? check_duplicate_keys(c, v, ykey) : 0;
    for (size_t i = 0; i < v->n && rc == 0; i++) {
        char idx[24];
        snprintf(idx, sizeof(idx), "%zu", i);
        const char *part = v->kind == NODE_MAP ? v->pairs[i].key : idx;
        const node *child = v->kind == NODE_MAP ? v->pairs[i].val : v->items[i];
        char *fk = join_key(fkey, part);
        char *yk = join_key(ykey, part);
        if (fk == NULL || yk == NULL)
            rc = cfg_nomem(c);
        else
            rc = flatten(c, child, fk, yk, acc);
        free(fk);
        free(yk);
    }
    return rc;
}

/* Refuse two entries of acc that flatten to the same key (`a: {b: 1}` and `a.b: 2`), and
 * build the index of acc's entries in key order (spk_plugin_conf.config_sorted) into
 * *out, which the caller owns (NULL for an empty map). */
static int config_index(cfg_ctx *c, const kv_acc *acc, const char *key, size_t **out)
{
    *out = NULL;
    if (acc->n == 0)
        return 0;
    keyref *refs = malloc(acc->n * sizeof(*refs));
    size_t *index = malloc(acc->n * sizeof(*index));
    if (refs == NULL || index == NULL) {
        free(refs);
        free(index);
        return cfg_nomem(c);
    }
    for (size_t i = 0; i < acc->n; i++)
        refs[i] = (keyref){.key = acc->kv[i].key, .idx = i};
    size_t j = 0, i = first_duplicate(refs, acc->n, &j);
    for (size_t k = 0; k < acc->n; k++)
        index[k] = refs[k].idx;
    free(refs);
    if (i == SIZE_MAX) {
        *out = index;
        return 0;
    }
    free(index);
    char sub[256];
    snprintf(sub, sizeof(sub), "%s.%s", key, acc->kv[i].key);
    return cfg_fail(c, acc->lines[i], sub, "flattens to the same key as the entry at line %d",
                    acc->lines[j]);
}

static int p_config(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    spk_plugin_conf *pc = base;
    if (node_is_null(v))
        return 0;
    if (v->kind != NODE_MAP)
        return cfg_fail(c, v->line, key, "expected a mapping, got %s", node_kind_name(v));
    kv_acc acc = {0};
    size_t *index = NULL;
    int rc = flatten(c, v, NULL, key, &acc);
    if (rc == 0)
        rc = config_index(c, &acc, key, &index);
    free(acc.lines);
    if (rc != 0) {
        kv_free(acc.kv, acc.n);
        return rc;
    }
    kv_free(pc->config, pc->n_config);
    free(pc->config_sorted);
    pc->config = acc.kv;
    pc->n_config = acc.n;
    pc->config_sorted = index;
    return 0;
}

const char *spk_plugin_conf_get(const spk_plugin_conf *pc, const char *key)
{
    if (pc == NULL || key == NULL)
        return NULL;
    if (pc->config_sorted == NULL) { /* not from the parser (a conf built by hand) */
        for (size_t i = 0; i < pc->n_config; i++)
            if (strcmp(pc->config[i].key, key) == 0)
                return pc->config[i].value;
        return NULL;
    }
    size_t lo = 0, hi = pc->n_config;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const spoke_kv *kv = &pc->config[pc->config_sorted[mid]];
        int d = strcmp(kv->key, key);
        if (d == 0)
            return kv->value;
        if (d < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* ---- the tables -------------------------------------------------------------------- */

static void d_str(FILE *out, const void *base, const field *f, int indent);
static void d_bool(FILE *out, const void *base, const field *f, int indent);
static void d_enum(FILE *out, const void *base, const field *f, int indent);
static void d_uint(FILE *out, const void *base, const field *f, int indent);
static void d_workers(FILE *out, const void *base, const field *f, int indent);
static void d_duration(FILE *out, const void *base, const field *f, int indent);
static void d_size(FILE *out, const void *base, const field *f, int indent);
static void d_sync(FILE *out, const void *base, const field *f, int indent);
static void d_listen(FILE *out, const void *base, const field *f, int indent);
static void d_sha256(FILE *out, const void *base, const field *f, int indent);
static void d_args(FILE *out, const void *base, const field *f, int indent);
static void d_env(FILE *out, const void *base, const field *f, int indent);
static void d_config(FILE *out, const void *base, const field *f, int indent);
static void d_plugins(FILE *out, const void *base, const field *f, int indent);
static int p_plugins(cfg_ctx *c, const node *v, const char *key, void *base, const field *f);
static int p_removed(cfg_ctx *c, const node *v, const char *key, void *base, const field *f);
static void d_removed(FILE *out, const void *base, const field *f, int indent);
static int p_lua(cfg_ctx *c, const node *v, const char *key, void *base, const field *f);
static void d_lua(FILE *out, const void *base, const field *f, int indent);
static int p_policies(cfg_ctx *c, const node *v, const char *key, void *base, const field *f);
static void d_policies(FILE *out, const void *base, const field *f, int indent);

#define FIELD(type, key, pfn, dfn, member, lo, hi, w, d, dt)                                       \
    {                                                                                              \
        key, pfn, dfn, offsetof(type, member), sizeof(((type *)0)->member), lo, hi, w, d, dt       \
    }
/* CF: a number, duration, size or bool with its range and default; CS: a string (or
 * address list) with its default text or NULL; CW: an enum with its words and default
 * index. PF/PS: the same for a plugins.list entry. */
#define CF(key, pfn, dfn, member, lo, hi, def)                                                     \
    FIELD(spk_config, key, pfn, dfn, member, lo, hi, NULL, def, NULL)
#define CS(key, pfn, dfn, member, def_text)                                                        \
    FIELD(spk_config, key, pfn, dfn, member, 0, 0, NULL, 0, def_text)
#define CW(key, member, words, def)                                                                \
    FIELD(spk_config, key, p_enum, d_enum, member, 0, 0, words, def, NULL)
#define PF(key, pfn, dfn, member, lo, hi, def)                                                     \
    FIELD(spk_plugin_conf, key, pfn, dfn, member, lo, hi, NULL, def, NULL)
#define PS(key, pfn, dfn, member) FIELD(spk_plugin_conf, key, pfn, dfn, member, 0, 0, NULL, 0, NULL)

/* A key that was removed: naming it is an error that says so (p_removed). */
#define REMOVED(key) {key, p_removed, d_removed, 0, 0, 0, 0, NULL, 0, NULL}

/* The queue's defaults and minimums are the queue's own (queue/queue.h: SPK_QUEUE_*),
 * never a literal in a row below. */
#define QUEUE_JOURNAL_ALIGN 4096u

static const char *const connect_words[] = {"eager", "lazy", NULL};
static const char *const compat_words[] = {"strict", "loose", NULL};
static const char *const level_words[] = {"debug", "info", "warn", "error", NULL};
static const char *const log_format_words[] = {"text", "json", NULL}; /* spk_log_format */

static const field edge_fields[] = {
    CS("id", p_str, d_str, edge_id, NULL), /* computed: the host name (computed_defaults) */
    CS("namespace", p_str, d_str, edge_namespace, "default"),
};

static const field listen_fields[] = {
    CS("address", p_listen, d_listen, listen, "127.0.0.1:6432"),
    CS("upstream", p_address, d_str, upstream, NULL), /* required */
    CF("workers", p_workers, d_workers, workers, 1, SPK_WORKERS_MAX, 0), /* 0: auto */
    CW("upstream_connect", upstream_connect, connect_words, SPK_CONNECT_EAGER),
    CF("connect_timeout", p_duration, d_duration, connect_timeout_ms, 1, HOUR, 5 * SEC),
    CF("read_chunk", p_size, d_size, read_chunk, KiB, 16 * MiB, 64 * KiB),
    CF("high_watermark", p_size, d_size, high_watermark, 0, GiB, MiB),
    CF("backlog", p_uint, d_uint, backlog, 1, 65535, 1024),
    CF("max_connections", p_uint, d_uint, max_connections, 1, 10000000, 100000),
    CF("max_open_files", p_uint, d_uint, max_open_files, 0, 1048576, 0), /* 0: inherited */
};

static const field plugins_fields[] = {
    CS("dir", p_dir, d_str, plugins_dir, "/usr/lib/spoke/plugins"),
    CF("autoload", p_bool, d_bool, autoload, 0, 0, false),
    CW("compatibility", compatibility, compat_words, SPK_COMPAT_STRICT),
    CF("health_check_period", p_duration, d_duration, health_check_period_ms, 1, DAY, 5 * SEC),
    CF("hook_timeout", p_duration, d_duration, hook_timeout_ms, 1, HOUR, 50),
    CF("start_timeout", p_duration, d_duration, start_timeout_ms, 1, HOUR, 5 * SEC),
    CF("reload_on_crash", p_bool, d_bool, reload_on_crash, 0, 0, true),
    CF("health_fail_limit", p_uint, d_uint, health_fail_limit, 1, 1000, 3),
    CF("crash_limit", p_uint, d_uint, crash_limit, 1, SPK_CRASH_LIMIT_MAX, 3),
    CF("crash_window", p_duration, d_duration, crash_window_ms, 1, 7 * DAY, 60 * SEC),
    CF("drain_timeout", p_duration, d_duration, drain_timeout_ms, 0, DAY, 30 * SEC),
    CF("tick", p_duration, d_duration, tick_ms, 1, HOUR, SEC),
    CS("list", p_plugins, d_plugins, plugins, NULL), /* empty */
    CF("strict_modes", p_bool, d_bool, strict_modes, 0, 0, true),
};

static const field queue_fields[] = {
    CS("path", p_str, d_str, queue_path, "/var/lib/spoke/queue"),
    CF("max_pending", p_uint, d_uint, queue_max_pending, 1, 1000000000,
       SPK_QUEUE_DEFAULT_MAX_PENDING),
    CF("max_bytes", p_size, d_size, queue_max_bytes, SPK_QUEUE_MAX_BYTES_MIN, 16 * TiB,
       SPK_QUEUE_DEFAULT_MAX_BYTES),
    CF("retention", p_duration, d_duration, queue_retention_ms, SEC, 365 * DAY,
       SPK_QUEUE_DEFAULT_RETENTION_MS),
    CF("sync", p_sync, d_sync, queue_sync_interval_ms, 1, HOUR,
       SPK_QUEUE_DEFAULT_SYNC_INTERVAL_MS),
    CF("map_size", p_size, d_size, queue_map_size, SPK_QUEUE_MAP_SIZE_MIN, 16 * TiB,
       SPK_QUEUE_DEFAULT_MAP_SIZE),
    CF("journal_size", p_size, d_size, queue_journal_size, SPK_QUEUE_JOURNAL_MIN, 64 * GiB,
       SPK_QUEUE_DEFAULT_JOURNAL_SIZE),
    REMOVED("writemap"),
    REMOVED("segment_size"),
};

/* The KV store's defaults are spk_kv_opts_init()'s (core/kv.h) for the map size. */
static const field kv_fields[] = {
    CS("path", p_str, d_str, kv_path, "/var/lib/spoke/kv"),
    CF("map_size", p_size, d_size, kv_map_size, MiB, 16 * TiB, GiB),
    CF("sync", p_duration, d_duration, kv_sync_ms, 1, HOUR, SEC),
};

static const field uplink_fields[] = {
    CS("url", p_url, d_str, uplink_url, NULL), /* none: no uplink */
    CF("heartbeat", p_duration, d_duration, uplink_heartbeat_ms, 1, DAY, 30 * SEC),
    CF("batch_size", p_uint, d_uint, uplink_batch_size, 1, 10000, 100),
    CS("token_file", p_str_opt, d_str, uplink_token_file, NULL),
    CS("ca", p_str_opt, d_str, uplink_ca, NULL),
    CS("cert", p_str_opt, d_str, uplink_cert, NULL),
    CS("key", p_str_opt, d_str, uplink_key, NULL),
    CF("max_batch_bytes", p_size, d_size, uplink_max_batch_bytes, 64 * KiB, 256 * MiB, 4 * MiB),
    CF("timeout", p_duration, d_duration, uplink_timeout_ms, 1, HOUR, 10 * SEC),
};

/* hubd (control role). The listener rows write the same fields as listen's. */
static const field hub_fields[] = {
    CS("listen", p_listen, d_listen, listen, "127.0.0.1:7443"),
    CF("workers", p_workers, d_workers, workers, 1, SPK_WORKERS_MAX, 0), /* 0: auto */
    CF("backlog", p_uint, d_uint, backlog, 1, 65535, 1024),
    CS("store", p_str, d_str, hub_store, "/var/lib/spoke/hub"),
    CF("map_size", p_size, d_size, hub_map_size, MiB, 16 * TiB, 4 * GiB),
    CF("dedupe_retention", p_duration, d_duration, hub_dedupe_retention_ms, HOUR, 365 * DAY,
       48 * HOUR),
    CF("heartbeat", p_duration, d_duration, hub_heartbeat_ms, 0, DAY, 0), /* 0: the edge's */
    CF("batch_size", p_uint, d_uint, hub_batch_size, 0, 10000, 0),
};

static const field tls_fields[] = {
    CS("cert", p_str_opt, d_str, tls_cert, NULL),
    CS("key", p_str_opt, d_str, tls_key, NULL),
    CS("client_ca", p_str_opt, d_str, tls_client_ca, NULL),
};

static const field auth_fields[] = {
    CS("token_file", p_str_opt, d_str, auth_token_file, NULL),
};

static const field limits_fields[] = {
    CF("max_message", p_size, d_size, limit_max_message, 2 * MiB, 256 * MiB, 16 * MiB),
    CF("max_streams", p_uint, d_uint, limit_max_streams, 1, 1000, 100),
    CF("max_header_list", p_size, d_size, limit_max_header_list, KiB, MiB, 16 * KiB),
    CF("max_connections", p_uint, d_uint, max_connections, 1, 100000, 1024),
    CF("request_timeout", p_duration, d_duration, limit_request_timeout_ms, 1, HOUR, 10 * SEC),
    CF("idle_timeout", p_duration, d_duration, limit_idle_timeout_ms, 1, DAY, 5 * 60 * SEC),
};

static const field metrics_fields[] = {
    CS("listen", p_address_opt, d_str, metrics_listen, NULL), /* none: no endpoint */
    CF("merger", p_bool, d_bool, metrics_merger, 0, 0, true),
    CF("merge_period", p_duration, d_duration, metrics_merge_period_ms, 100, HOUR, 10 * SEC),
    CF("hook_sample", p_uint, d_uint, metrics_hook_sample, 0, 65536, SPK_HOOK_SAMPLE_DEFAULT),
};

static const field log_fields[] = {
    CW("level", log_level, level_words, SPOKE_LOG_INFO),
    CW("format", log_format, log_format_words, SPK_LOG_TEXT),
};

/* Top-level keys that are not sections. */
static int p_run_dir(cfg_ctx *c, const node *v, const char *key, void *base, const field *f);
static const field root_fields[] = {
    CS("run_dir", p_run_dir, d_str, run_dir, NULL), /* computed (computed_defaults) */
    CS("user", p_str_opt, d_str, user, NULL),   /* none: see core/privs.h */
    CS("group", p_str_opt, d_str, group, NULL), /* none: the user's primary group */
};

/* policies: (the engine is core/policy.c; docs/policies.md) */
static const field policies_fields[] = {
    CF("timeout", p_uint, d_uint, policy_timeout, 1000, 1000000000, 100000), /* instructions */
    CF("memory", p_size, d_size, policy_memory, 256 * KiB, GiB, 4 * MiB),
    CS("setup", p_lua, d_lua, policy_setup, NULL), /* none */
    CS("list", p_policies, d_policies, policies, NULL), /* empty */
};

static const char *const action_words[] = {"log", "terminate", "passthrough", "close",
                                           "send_to_control", NULL};
static const char *const then_words[] = {"default", "builtin", "passthrough", "terminate",
                                         "close", NULL};
static const char *const plevel_words[] = {"signal", "debug", "info", "warn", "error", NULL};

#define YF(key, pfn, dfn, member, lo, hi, def)                                                     \
    FIELD(spk_policy_conf, key, pfn, dfn, member, lo, hi, NULL, def, NULL)
#define YW(key, member, words, def)                                                                \
    FIELD(spk_policy_conf, key, p_enum, d_enum, member, 0, 0, words, def, NULL)
static int p_action(cfg_ctx *c, const node *v, const char *key, void *base, const field *f);
static void d_action(FILE *out, const void *base, const field *f, int indent);
static const field policy_entry_fields[] = {
    YF("name", p_str_opt, d_str, name, 0, 0, 0),
    YF("signal", p_str, d_str, signal, 0, 0, 0), /* required */
    YF("when", p_lua, d_lua, when, 0, 0, 0),
    YF("action", p_action, d_action, action, 0, 0, 0),
    YF("run", p_lua, d_lua, run, 0, 0, 0),
    YW("level", level, plevel_words, 0),
    YF("message", p_str_opt, d_str, message, 0, 0, 0),
    YF("answer", p_str_opt, d_str, answer, 0, 0, 0),
    YF("to", p_uint, d_uint, to, 0, UINT32_MAX, 0),
    YW("then", then, then_words, SPK_PT_DEFAULT),
};

static const field plugin_entry_fields[] = {
    PF("id", p_uint, d_uint, id, 0, UINT32_MAX, 0),
    PS("name", p_name, d_str, name),
    PS("file", p_str, d_str, file),
    PS("sha256", p_sha256, d_sha256, sha256),
    PF("enabled", p_bool, d_bool, enabled, 0, 0, true),
    PS("args", p_args, d_args, args),
    PS("env", p_env, d_env, env),
    PS("config", p_config, d_config, config),
    PS("metrics_socket", p_str_opt, d_str, metrics_socket),
};

#define N(a) (sizeof(a) / sizeof((a)[0]))

typedef struct section {
    const char *name;
    const field *fields;
    size_t n;
    unsigned roles; /* ROLE_BIT(SPOKE_ROLE_EDGE) | ROLE_BIT(SPOKE_ROLE_CONTROL) */
} section;

#define ROLE_BIT(r) (1u << (r))
#define EDGE ROLE_BIT(SPOKE_ROLE_EDGE)
#define CONTROL ROLE_BIT(SPOKE_ROLE_CONTROL)

static const section sections[] = {
    {"edge", edge_fields, N(edge_fields), EDGE},
    {"listen", listen_fields, N(listen_fields), EDGE},
    {"hub", hub_fields, N(hub_fields), CONTROL},
    {"tls", tls_fields, N(tls_fields), CONTROL},
    {"auth", auth_fields, N(auth_fields), CONTROL},
    {"limits", limits_fields, N(limits_fields), CONTROL},
    {"plugins", plugins_fields, N(plugins_fields), EDGE | CONTROL},
    {"queue", queue_fields, N(queue_fields), EDGE},
    {"kv", kv_fields, N(kv_fields), EDGE},
    {"uplink", uplink_fields, N(uplink_fields), EDGE},
    {"metrics", metrics_fields, N(metrics_fields), EDGE | CONTROL},
    {"log", log_fields, N(log_fields), EDGE | CONTROL},
    {"policies", policies_fields, N(policies_fields), EDGE},
};

static bool section_in_role(const section *s, spoke_role role)
{
    return (s->roles & ROLE_BIT(role)) != 0;
}

/* ---- defaults ---------------------------------------------------------------------- */

/* The text a config file would hold for row f's default, or NULL when it has none. */
static const char *default_text(const field *f, char *buf, size_t cap)
{
    if (f->parse == p_duration || f->parse == p_sync)
        return spk_fmt_duration(f->def, buf, cap);
    if (f->parse == p_size)
        return spk_fmt_size(f->def, buf, cap);
    if (f->parse == p_bool)
        return f->def ? "true" : "false";
    if (f->parse == p_enum)
        return f->words[f->def];
    if (f->parse == p_workers && f->def == 0)
        return "auto";
    if (f->parse == p_uint || f->parse == p_workers) {
        snprintf(buf, cap, "%llu", (unsigned long long)f->def);
        return buf;
    }
    return f->def_text;
}

/* Give every row of a table its default, by loading the default's text through the
 * row's own parser: a default is range-checked like a value from the file, and the dump
 * prints it as the file would write it. A default that does not load is a bug in a
 * table; the message says so. */
static int apply_defaults(cfg_ctx *c, const char *prefix, const field *fields, size_t n,
                          void *base)
{
    for (size_t i = 0; i < n; i++) {
        const field *f = &fields[i];
        char buf[32], key[400]; /* prefix (at most 255) "." name */
        const char *text = default_text(f, buf, sizeof(buf));
        if (text == NULL)
            continue;
        snprintf(key, sizeof(key), "%s%s%s", prefix, prefix[0] ? "." : "", f->name);
        node v = {.kind = NODE_SCALAR, .plain = true, .text = (char *)text};
        int rc = f->parse(c, &v, key, base, f);
        if (rc != 0 && rc != SPK_ENOMEM && c->eb != NULL) {
            spk_errbuf why = *c->eb;
            return spk_errf(c->eb, rc, "built-in default of %s does not load (a bug): %s", key,
                            why.msg);
        }
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* Apply every pair of map `m` (at dotted key `key`) through the table to `base`. */
static int apply_map(cfg_ctx *c, const node *m, const char *key, const field *fields, size_t n,
                     void *base)
{
    int rc = check_duplicate_keys(c, m, key);
    for (size_t i = 0; i < m->n && rc == 0; i++) {
        const node_pair *p = &m->pairs[i];
        char sub[256];
        int len = snprintf(sub, sizeof(sub), "%s.%s", key, p->key);
        if (len < 0 || (size_t)len >= sizeof(sub))
            return cfg_fail(c, p->line, key, "key '%.64s...' is too long", p->key);
        const field *f = NULL;
        for (size_t j = 0; j < n && f == NULL; j++)
            if (strcmp(fields[j].name, p->key) == 0)
                f = &fields[j];
        if (f == NULL) {
            char known[512] = "";
            for (size_t j = 0; j < n; j++)
                if (fields[j].parse != p_removed)
                    snprintf(known + strlen(known), sizeof(known) - strlen(known), "%s%s",
                             known[0] ? ", " : "", fields[j].name);
            return cfg_fail(c, p->line, sub, "unknown key (known keys in %s: %s)", key, known);
        }
        rc = f->parse(c, p->val, sub, base, f);
    }
    return rc;
}

static int parse_plugin_entry(cfg_ctx *c, const node *v, const char *key, spk_plugin_conf *pc)
{
    pc->line = v->line;
    int rc = apply_defaults(c, key, plugin_entry_fields, N(plugin_entry_fields), pc);
    if (rc != 0)
        return rc;
    if (v->kind != NODE_MAP)
        return cfg_fail(c, v->line, key, "expected a mapping with at least `file:`, got %s",
                        node_kind_name(v));
    rc = apply_map(c, v, key, plugin_entry_fields, N(plugin_entry_fields), pc);
    if (rc == 0 && pc->file == NULL)
        rc = cfg_fail(c, v->line, key, "`file:` is required");
    else if (rc == 0 && pc->file[0] == '\0')
        rc = cfg_fail(c, node_get(v, "file")->val->line, key, "`file:` must not be empty");
    return rc;
}

static void plugin_conf_clear(spk_plugin_conf *pc)
{
    free(pc->name);
    free(pc->file);
    free(pc->path);
    free(pc->metrics_socket);
    free_strv(pc->args, pc->n_args);
    free_strv(pc->env, pc->n_env);
    kv_free(pc->config, pc->n_config);
    free(pc->config_sorted);
    memset(pc, 0, sizeof(*pc));
}

static int p_plugins(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    spk_config *cfg = base;
    if (node_is_null(v))
        return 0;
    if (v->kind != NODE_SEQ)
        return cfg_fail(c, v->line, key, "expected a list of plugin entries, got %s",
                        node_kind_name(v));
    if (v->n == 0)
        return 0;
    cfg->plugins = calloc(v->n, sizeof(*cfg->plugins));
    if (cfg->plugins == NULL)
        return cfg_nomem(c);
    for (size_t i = 0; i < v->n; i++) {
        char sub[256];
        snprintf(sub, sizeof(sub), "%s[%zu]", key, i);
        cfg->n_plugins = i + 1; /* so that spk_config_free frees a half-parsed entry */
        int rc = parse_plugin_entry(c, v->items[i], sub, &cfg->plugins[i]);
        if (rc != 0)
            return rc;
    }
    size_t enabled = 0;
    for (size_t i = 0; i < cfg->n_plugins; i++)
        enabled += cfg->plugins[i].enabled;
    if (enabled > SPK_PLUGINS_MAX)
        return cfg_fail(c, v->line, key, "%zu plugins enabled, more than the %d a generation runs",
                        enabled, SPK_PLUGINS_MAX);
    return 0;
}

/* ---- policies ---------------------------------------------------------------------- */

/* A piece of Lua: its text and the line its code starts on (a literal block's text starts
 * on the line after its `|`), so core/policy.c can name the file's line in Lua's
 * messages; only a literal block's lines are the file's. */
static int p_lua(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    spk_lua_text *t = at(base, f);
    if (node_is_null(v)) {
        free(t->code);
        t->code = NULL;
        return 0;
    }
    int rc = want_scalar(c, v, key, "Lua code (a string)");
    if (rc != 0)
        return rc;
    if ((rc = set_string(c, &t->code, v->text)) != 0)
        return rc;
    t->line = v->literal ? v->line + 1 : v->line;
    t->lines = v->literal;
    return 0;
}

static int p_action(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    spk_policy_conf *pc = base;
    static const field words = {.words = action_words, .off = offsetof(spk_policy_conf, action),
                                .width = sizeof(int)};
    int rc = p_enum(c, v, key, base, &words);
    if (rc == 0)
        pc->has_action = true;
    return rc;
}

/* Which action each parameter belongs to (a parameter of another action is an error). */
static const struct {
    const char *key;
    int action, action2;
} policy_params[] = {
    {"level", SPK_PA_LOG, SPK_PA_LOG},
    {"message", SPK_PA_LOG, SPK_PA_LOG},
    {"answer", SPK_PA_TERMINATE, SPK_PA_TERMINATE},
    {"to", SPK_PA_SEND_TO_CONTROL, SPK_PA_SEND_TO_CONTROL},
    {"then", SPK_PA_LOG, SPK_PA_SEND_TO_CONTROL},
};

static int parse_policy_entry(cfg_ctx *c, const node *v, const char *key, spk_policy_conf *pc)
{
    pc->line = v->line;
    int rc = apply_defaults(c, key, policy_entry_fields, N(policy_entry_fields), pc);
    if (rc != 0)
        return rc;
    if (v->kind != NODE_MAP)
        return cfg_fail(c, v->line, key, "expected a mapping with `signal:` and `action:` or "
                        "`run:`, got %s", node_kind_name(v));
    if ((rc = apply_map(c, v, key, policy_entry_fields, N(policy_entry_fields), pc)) != 0)
        return rc;
    if (pc->signal == NULL || pc->signal[0] == '\0')
        return cfg_fail(c, v->line, key, "`signal:` is required (a signal name, or * for "
                        "every signal of a plugin)");
    if (pc->has_action == (pc->run.code != NULL))
        return cfg_fail(c, v->line, key, "give exactly one of `action:` (log, terminate, "
                        "passthrough, close, send_to_control) and `run:` (an action in Lua)");
    if (pc->run.code != NULL)
        pc->action = SPK_PA_LUA;
    for (size_t i = 0; i < N(policy_params); i++) {
        const node_pair *np = node_get(v, policy_params[i].key);
        if (np != NULL && pc->action != policy_params[i].action &&
            pc->action != policy_params[i].action2)
            return cfg_fail(c, np->line, key, "`%s:` is a parameter of action %s%s%s, not of "
                            "this policy's action", policy_params[i].key,
                            action_words[policy_params[i].action],
                            policy_params[i].action2 != policy_params[i].action ? " and " : "",
                            policy_params[i].action2 != policy_params[i].action
                                ? action_words[policy_params[i].action2] : "");
    }
    return 0;
}

static void policy_conf_clear(spk_policy_conf *pc)
{
    free(pc->name);
    free(pc->signal);
    free(pc->when.code);
    free(pc->run.code);
    free(pc->message);
    free(pc->answer);
    memset(pc, 0, sizeof(*pc));
}

static int p_policies(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    spk_config *cfg = base;
    if (node_is_null(v))
        return 0;
    if (v->kind != NODE_SEQ)
        return cfg_fail(c, v->line, key, "expected a list of policies, got %s",
                        node_kind_name(v));
    if (v->n == 0)
        return 0;
    cfg->policies = calloc(v->n, sizeof(*cfg->policies));
    if (cfg->policies == NULL)
        return cfg_nomem(c);
    for (size_t i = 0; i < v->n; i++) {
        char sub[256];
        snprintf(sub, sizeof(sub), "%s[%zu]", key, i);
        cfg->n_policies = i + 1; /* so that spk_config_free frees a half-parsed entry */
        int rc = parse_policy_entry(c, v->items[i], sub, &cfg->policies[i]);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* ---- defaults and checks that span keys -------------------------------------------- */

/* "/run/spoke" for root; else the config file's directory (made absolute, so that a
 * later chdir does not move it). */
static int default_run_dir(spk_config *cfg, const char *path)
{
    if (geteuid() == 0) {
        cfg->run_dir = strdup("/run/spoke");
        return cfg->run_dir ? 0 : SPK_ENOMEM;
    }
    char *abs = realpath(path, NULL);
    if (abs == NULL) /* vanished since it was read: fall back to the path as given */
        abs = strdup(path);
    if (abs == NULL)
        return SPK_ENOMEM;
    char *slash = strrchr(abs, '/');
    if (slash == NULL) {
        free(abs);
        abs = strdup(".");
    } else {
        slash[slash == abs ? 1 : 0] = '\0';
    }
    cfg->run_dir = abs;
    return abs ? 0 : SPK_ENOMEM;
}

/* The defaults no row can hold: edge.id is the host name, run_dir depends on the user
 * and the config file's place. */
static int computed_defaults(spk_config *cfg, const char *path)
{
    char host[256] = "";
    if (gethostname(host, sizeof(host) - 1) != 0 || host[0] == '\0')
        snprintf(host, sizeof(host), "localhost");
    host[sizeof(host) - 1] = '\0';
    if ((cfg->edge_id = strdup(host)) == NULL)
        return SPK_ENOMEM;
    return default_run_dir(cfg, path);
}

/* Every key's default: the rows' (the one place each is written), then the computed. */
static int set_defaults(cfg_ctx *c, const char *path)
{
    spk_config *cfg = c->cfg;
    if ((cfg->file = strdup(path)) == NULL)
        return cfg_nomem(c);
    int rc = apply_defaults(c, "", root_fields, N(root_fields), cfg);
    for (size_t i = 0; i < N(sections) && rc == 0; i++)
        if (section_in_role(&sections[i], cfg->role))
            rc = apply_defaults(c, sections[i].name, sections[i].fields, sections[i].n, cfg);
    if (rc == 0 && computed_defaults(cfg, path) != 0)
        rc = cfg_nomem(c);
    return rc;
}

static int apply_root(cfg_ctx *c, const node *root)
{
    if (root == NULL || node_is_null(root))
        return 0;
    if (root->kind != NODE_MAP)
        return cfg_fail(c, root->line, NULL,
                        "expected a mapping of sections (edge, listen, plugins, ...), got %s",
                        node_kind_name(root));
    int rc = check_duplicate_keys(c, root, "");
    for (size_t i = 0; i < root->n && rc == 0; i++) {
        const node_pair *p = &root->pairs[i];
        const section *s = NULL;
        for (size_t j = 0; j < N(sections) && s == NULL; j++)
            if (strcmp(sections[j].name, p->key) == 0 &&
                section_in_role(&sections[j], c->cfg->role))
                s = &sections[j];
        const field *rf = NULL;
        for (size_t j = 0; j < N(root_fields) && s == NULL && rf == NULL; j++)
            if (strcmp(root_fields[j].name, p->key) == 0)
                rf = &root_fields[j];
        if (rf != NULL) {
            rc = rf->parse(c, p->val, p->key, c->cfg, rf);
            continue;
        }
        if (s == NULL) {
            char known[256] = "";
            for (size_t j = 0; j < N(sections); j++)
                if (section_in_role(&sections[j], c->cfg->role))
                    snprintf(known + strlen(known), sizeof(known) - strlen(known), "%s%s",
                             known[0] ? ", " : "", sections[j].name);
            return cfg_fail(c, p->line, p->key, "unknown section (known: %s; and the keys run_dir, user, group)",
                            known);
        }
        if (node_is_null(p->val))
            continue;
        if (p->val->kind != NODE_MAP)
            return cfg_fail(c, p->val->line, p->key, "expected a mapping, got %s",
                            node_kind_name(p->val));
        rc = apply_map(c, p->val, p->key, s->fields, s->n, c->cfg);
    }
    return rc;
}

/* The line of key `key` of section `sect` (or of the section, or 1) for messages. */
static int key_line(const node *root, const char *sect, const char *key)
{
    const node_pair *s = node_get(root, sect);
    if (s == NULL)
        return 1;
    const node_pair *k = key ? node_get(s->val, key) : NULL;
    return k != NULL ? k->line : s->line;
}

static int resolve_paths(cfg_ctx *c)
{
    spk_config *cfg = c->cfg;
    for (size_t i = 0; i < cfg->n_plugins; i++) {
        spk_plugin_conf *pc = &cfg->plugins[i];
        int rc;
        if (pc->file[0] == '/')
            rc = (pc->path = strdup(pc->file)) == NULL ? -1 : 0;
        else
            rc = asprintf(&pc->path, "%s/%s", cfg->plugins_dir, pc->file) < 0 ? -1 : 0;
        if (rc != 0) {
            pc->path = NULL;
            return cfg_nomem(c);
        }
    }
    return 0;
}

/* Plugin names and IDs are unique (first_duplicate, so a long list costs n log n). */
static int check_plugin_duplicates(cfg_ctx *c)
{
    const spk_config *cfg = c->cfg;
    size_t n = cfg->n_plugins, nn = 0, ni = 0;
    if (n < 2)
        return 0;
    keyref *names = malloc(n * sizeof(*names)), *ids = malloc(n * sizeof(*ids));
    char(*idtext)[12] = malloc(n * sizeof(*idtext));
    if (names == NULL || ids == NULL || idtext == NULL) {
        free(names);
        free(ids);
        free(idtext);
        return cfg_nomem(c);
    }
    for (size_t i = 0; i < n; i++) {
        const spk_plugin_conf *pc = &cfg->plugins[i];
        if (pc->name != NULL)
            names[nn++] = (keyref){.key = pc->name, .idx = i};
        if (pc->id != 0) {
            snprintf(idtext[i], sizeof(idtext[i]), "%u", pc->id);
            ids[ni++] = (keyref){.key = idtext[i], .idx = i};
        }
    }
    size_t jn = 0, ji = 0;
    size_t in = first_duplicate(names, nn, &jn), ii = first_duplicate(ids, ni, &ji);
    free(names);
    free(ids);
    free(idtext);
    bool by_name = in != SIZE_MAX && (in < ii || (in == ii && jn <= ji));
    if (in == SIZE_MAX && ii == SIZE_MAX)
        return 0;
    size_t i = by_name ? in : ii, j = by_name ? jn : ji;
    const spk_plugin_conf *a = &cfg->plugins[j], *b = &cfg->plugins[i];
    char key[64];
    snprintf(key, sizeof(key), "plugins.list[%zu].%s", i, by_name ? "name" : "id");
    if (by_name)
        return cfg_fail(c, b->line, key,
                        "'%s' is already the name of plugins.list[%zu] at line %d "
                        "(plugin names must be unique)",
                        b->name, j, a->line);
    return cfg_fail(c, b->line, key,
                    "%u is already the ID of plugins.list[%zu] at line %d "
                    "(plugin IDs must be unique)",
                    b->id, j, a->line);
}

/* Checks that span keys of spoked's sections. */
static int finish_edge(cfg_ctx *c, const node *root)
{
    spk_config *cfg = c->cfg;
    char a[32], b[32];
    if (cfg->upstream == NULL)
        return cfg_fail(c, key_line(root, "listen", NULL), "listen.upstream",
                        "required key is missing (the server to proxy to, e.g. "
                        "127.0.0.1:5432)");
    if (cfg->queue_max_bytes > cfg->queue_map_size)
        return cfg_fail(c, key_line(root, "queue", "max_bytes"), "queue.max_bytes",
                        "%s exceeds queue.map_size (%s); raise queue.map_size",
                        spk_fmt_size(cfg->queue_max_bytes, a, sizeof(a)),
                        spk_fmt_size(cfg->queue_map_size, b, sizeof(b)));
    if (cfg->queue_journal_size % QUEUE_JOURNAL_ALIGN != 0)
        return cfg_fail(c, key_line(root, "queue", "journal_size"), "queue.journal_size",
                        "%s is not a multiple of 4 KiB",
                        spk_fmt_size(cfg->queue_journal_size, a, sizeof(a)));
    if ((cfg->uplink_cert == NULL) != (cfg->uplink_key == NULL))
        return cfg_fail(c, key_line(root, "uplink", cfg->uplink_cert ? "cert" : "key"),
                        cfg->uplink_cert ? "uplink.cert" : "uplink.key",
                        "mutual TLS needs both uplink.cert and uplink.key");
    return 0;
}

/* Whether a listen address is on this machine only: 127.0.0.0/8, [::1], localhost or a
 * unix socket. */
static bool loopback_address(const char *a)
{
    return strncmp(a, "unix:", 5) == 0 || strncmp(a, "127.", 4) == 0 ||
           strncmp(a, "[::1]:", 6) == 0 || strncmp(a, "localhost:", 10) == 0;
}

/* Checks that span keys of hubd's sections. */
static int finish_control(cfg_ctx *c, const node *root)
{
    spk_config *cfg = c->cfg;
    if ((cfg->tls_cert == NULL) != (cfg->tls_key == NULL))
        return cfg_fail(c, key_line(root, "tls", cfg->tls_cert ? "cert" : "key"),
                        cfg->tls_cert ? "tls.cert" : "tls.key",
                        "TLS needs both tls.cert and tls.key");
    if (cfg->tls_client_ca != NULL && cfg->tls_cert == NULL)
        return cfg_fail(c, key_line(root, "tls", "client_ca"), "tls.client_ca",
                        "client certificates need TLS: set tls.cert and tls.key");
    if (cfg->auth_token_file == NULL && cfg->tls_client_ca == NULL) {
        for (size_t i = 0; i < cfg->n_listen; i++)
            if (!loopback_address(cfg->listen[i]))
                return cfg_fail(c, key_line(root, "hub", "listen"), "hub.listen",
                                "%s is reachable from other machines but no edge is "
                                "authenticated: set auth.token_file or tls.client_ca (a hub "
                                "without authentication may only listen on loopback)",
                                cfg->listen[i]);
    }
    return 0;
}

static int finish(cfg_ctx *c, const node *root)
{
    int rc = c->cfg->role == SPOKE_ROLE_CONTROL ? finish_control(c, root) : finish_edge(c, root);
    if (rc == 0)
        rc = check_plugin_duplicates(c);
    if (rc == 0 && c->cfg->role == SPOKE_ROLE_EDGE)
        rc = spk_policy_check(c->cfg, c->eb); /* the Lua compiles, with the file's lines */
    return rc != 0 ? rc : resolve_paths(c);
}

/* ---- public ------------------------------------------------------------------------ */

static int open_config(const char *path, FILE **out, spk_errbuf *eb)
{
    struct stat st;
    FILE *f = fopen(path, "rbe");
    if (f == NULL)
        return spk_errf(eb,
                        errno == ENOENT   ? SPK_ENOENT
                        : errno == ENOMEM ? SPK_ENOMEM
                                          : SPK_EIO,
                        "cannot open %s: %s", path, strerror(errno));
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
        fclose(f);
        return spk_errf(eb, SPK_EIO, "cannot open %s: %s", path, strerror(EISDIR));
    }
    *out = f;
    return 0;
}

int spk_config_load(const char *path, spk_config **out, spk_errbuf *eb)
{
    return spk_config_load_role(path, SPOKE_ROLE_EDGE, out, eb);
}

int spk_config_load_role(const char *path, spoke_role role, spk_config **out, spk_errbuf *eb)
{
    node *root = NULL;
    spk_config *cfg = NULL;
    FILE *f = NULL;
    *out = NULL;
    if (path == NULL)
        return spk_errf(eb, SPK_EINVAL, "no configuration file given");
    int rc = open_config(path, &f, eb);
    if (rc != 0)
        return rc;
    rc = tree_read(f, path, &root, eb);
    fclose(f);
    if (rc != 0)
        return rc;
    cfg_ctx c = {.file = path, .eb = eb};
    if ((cfg = calloc(1, sizeof(*cfg))) == NULL) {
        rc = spk_errf(eb, SPK_ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    c.cfg = cfg;
    cfg->role = role;
    if ((rc = set_defaults(&c, path)) != 0)
        goto fail;
    if ((rc = apply_root(&c, root)) != 0 || (rc = finish(&c, root)) != 0)
        goto fail;
    node_free(root);
    *out = cfg;
    return 0;
fail:
    node_free(root);
    spk_config_free(cfg);
    return rc;
}

void spk_config_free(spk_config *cfg)
{
    if (cfg == NULL)
        return;
    free(cfg->file);
    free(cfg->edge_id);
    free(cfg->edge_namespace);
    free_strv(cfg->listen, cfg->n_listen);
    free(cfg->upstream);
    free(cfg->plugins_dir);
    for (size_t i = 0; i < cfg->n_plugins; i++)
        plugin_conf_clear(&cfg->plugins[i]);
    free(cfg->plugins);
    free(cfg->queue_path);
    free(cfg->kv_path);
    free(cfg->uplink_url);
    free(cfg->uplink_token_file);
    free(cfg->uplink_ca);
    free(cfg->uplink_cert);
    free(cfg->uplink_key);
    free(cfg->hub_store);
    free(cfg->tls_cert);
    free(cfg->tls_key);
    free(cfg->tls_client_ca);
    free(cfg->auth_token_file);
    free(cfg->metrics_listen);
    free(cfg->run_dir);
    free(cfg->user);
    free(cfg->group);
    free(cfg->policy_setup.code);
    for (size_t i = 0; i < cfg->n_policies; i++)
        policy_conf_clear(&cfg->policies[i]);
    free(cfg->policies);
    free(cfg);
}

int spk_config_add_autoload(spk_config *cfg, const char *file, const char *path)
{
    spk_plugin_conf pc = {.autoloaded = true};
    cfg_ctx c = {.file = cfg->file, .cfg = cfg};
    if (apply_defaults(&c, "", plugin_entry_fields, N(plugin_entry_fields), &pc) != 0)
        return SPK_ENOMEM; /* the entry rows' defaults allocate nothing else can fail on */
    pc.file = strdup(file);
    pc.path = strdup(path);
    spk_plugin_conf *nv = NULL;
    if (pc.file != NULL && pc.path != NULL)
        nv = realloc(cfg->plugins, (cfg->n_plugins + 1) * sizeof(*nv));
    if (nv == NULL) {
        plugin_conf_clear(&pc);
        return SPK_ENOMEM;
    }
    cfg->plugins = nv;
    cfg->plugins[cfg->n_plugins++] = pc;
    return 0;
}

/* ---- dump -------------------------------------------------------------------------- */

/* If the UTF-8 character at p is one YAML reads as a line break (NEL, LS, PS: folded to a
 * space in a quoted scalar) or refuses raw (C1 controls, U+FEFF, U+FFFE/F), write it as a
 * \u escape and return true. Strings here are valid UTF-8 (libyaml checked them). */
static bool yaml_unsafe(const unsigned char *p, FILE *out)
{
    unsigned cp;
    if (p[0] >= 0xc0 && p[0] < 0xe0)
        cp = (p[0] & 0x1fu) << 6 | (p[1] & 0x3fu);
    else if (p[0] >= 0xe0 && p[0] < 0xf0)
        cp = (p[0] & 0x0fu) << 12 | (p[1] & 0x3fu) << 6 | (p[2] & 0x3fu);
    else
        return false;
    if (!(cp >= 0x80 && cp <= 0x9f) && cp != 0x2028 && cp != 0x2029 && cp != 0xfeff &&
        cp != 0xfffe && cp != 0xffff)
        return false;
    fprintf(out, "\\u%04x", cp);
    return true;
}

/* Plain when it reads back as the same string, else double-quoted with escapes. */
static void put_str(FILE *out, const char *s)
{
    bool plain = s[0] != '\0' && (is_alnum(s[0]) || s[0] == '/' || s[0] == '.' || s[0] == '_');
    for (const char *p = s; *p && plain; p++)
        plain = is_alnum(*p) || strchr("._/:@+-", *p) != NULL;
    if (plain && s[strlen(s) - 1] == ':') /* "k: g:" would be a mapping in a mapping */
        plain = false;
    if (plain && (word_index(bool_true, s) >= 0 || word_index(bool_false, s) >= 0 ||
                  strcmp(s, "null") == 0 || strcmp(s, "Null") == 0 || strcmp(s, "NULL") == 0))
        plain = false;
    if (plain) {
        fputs(s, out);
        return;
    }
    fputc('"', out);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(out, "\\%c", *p);
        else if (*p == '\n')
            fputs("\\n", out);
        else if (*p == '\t')
            fputs("\\t", out);
        else if (*p < 0x20 || *p == 0x7f)
            fprintf(out, "\\x%02x", *p);
        else if (*p >= 0x80 && yaml_unsafe(p, out))
            p += *p < 0xe0 ? 1 : 2; /* the rest of the character */
        else
            fputc(*p, out);
    }
    fputc('"', out);
}

static void put_key(FILE *out, int indent, const char *name)
{
    fprintf(out, "%*s%s:", indent, "", name);
}

/* queue.writemap and queue.segment_size went with the segment files and the writable
 * map (docs/queue.md): the queue keeps its records in the journal and LMDB only. */
static int p_removed(cfg_ctx *c, const node *v, const char *key, void *base, const field *f)
{
    (void)base;
    (void)f;
    return cfg_fail(c, v->line, key, "this key was removed (the queue keeps its records in "
                    "the journal and LMDB only, large ones in LMDB's overflow pages); delete "
                    "it from the file");
}

static void d_removed(FILE *out, const void *base, const field *f, int indent)
{
    (void)out;
    (void)base;
    (void)f;
    (void)indent;
}

static void d_str(FILE *out, const void *base, const field *f, int indent)
{
    const char *s = *(char *const *)cat(base, f);
    put_key(out, indent, f->name);
    if (s == NULL) {
        fputs(" ~\n", out);
        return;
    }
    fputc(' ', out);
    put_str(out, s);
    fputc('\n', out);
}

static void d_bool(FILE *out, const void *base, const field *f, int indent)
{
    put_key(out, indent, f->name);
    fprintf(out, " %s\n", *(const bool *)cat(base, f) ? "true" : "false");
}

static void d_enum(FILE *out, const void *base, const field *f, int indent)
{
    uint64_t v = load_uint(cat(base, f), f->width);
    const char *word = "?";
    for (uint64_t i = 0; f->words[i] != NULL; i++)
        if (i == v)
            word = f->words[i];
    put_key(out, indent, f->name);
    fprintf(out, " %s\n", word);
}

static void d_uint(FILE *out, const void *base, const field *f, int indent)
{
    put_key(out, indent, f->name);
    fprintf(out, " %llu\n", (unsigned long long)load_uint(cat(base, f), f->width));
}

static void d_workers(FILE *out, const void *base, const field *f, int indent)
{
    if (load_uint(cat(base, f), f->width) == 0) {
        put_key(out, indent, f->name);
        fputs(" auto\n", out);
        return;
    }
    d_uint(out, base, f, indent);
}

static void d_duration(FILE *out, const void *base, const field *f, int indent)
{
    char buf[32];
    put_key(out, indent, f->name);
    fprintf(out, " %s\n", spk_fmt_duration(load_uint(cat(base, f), f->width), buf, sizeof(buf)));
}

static void d_size(FILE *out, const void *base, const field *f, int indent)
{
    char buf[32];
    put_key(out, indent, f->name);
    fprintf(out, " %s\n", spk_fmt_size(load_uint(cat(base, f), f->width), buf, sizeof(buf)));
}

static void d_sync(FILE *out, const void *base, const field *f, int indent)
{
    const spk_config *cfg = base;
    if (cfg->queue_sync_always) {
        put_key(out, indent, f->name);
        fputs(" always\n", out);
        return;
    }
    d_duration(out, base, f, indent);
}

static void put_strv(FILE *out, int indent, const char *name, char *const *v, size_t n)
{
    put_key(out, indent, name);
    if (n == 0) {
        fputs(" []\n", out);
        return;
    }
    fputc('\n', out);
    for (size_t i = 0; i < n; i++) {
        fprintf(out, "%*s- ", indent + 2, "");
        put_str(out, v[i]);
        fputc('\n', out);
    }
}

static void d_listen(FILE *out, const void *base, const field *f, int indent)
{
    const spk_config *cfg = base;
    put_strv(out, indent, f->name, cfg->listen, cfg->n_listen);
}

static void d_sha256(FILE *out, const void *base, const field *f, int indent)
{
    const spk_plugin_conf *pc = base;
    put_key(out, indent, f->name);
    if (!pc->has_sha256) {
        fputs(" ~\n", out);
        return;
    }
    fputc(' ', out);
    for (size_t i = 0; i < 32; i++)
        fprintf(out, "%02x", pc->sha256[i]);
    fputc('\n', out);
}

static void d_args(FILE *out, const void *base, const field *f, int indent)
{
    const spk_plugin_conf *pc = base;
    put_strv(out, indent, f->name, pc->args, pc->n_args);
}

static void d_env(FILE *out, const void *base, const field *f, int indent)
{
    const spk_plugin_conf *pc = base;
    put_strv(out, indent, f->name, pc->env, pc->n_env);
}

/* The flattened form: keys with dots read back to the same entries. */
static void d_config(FILE *out, const void *base, const field *f, int indent)
{
    const spk_plugin_conf *pc = base;
    put_key(out, indent, f->name);
    if (pc->n_config == 0) {
        fputs(" {}\n", out);
        return;
    }
    fputc('\n', out);
    for (size_t i = 0; i < pc->n_config; i++) {
        fprintf(out, "%*s", indent + 2, "");
        put_str(out, pc->config[i].key);
        fputs(": ", out);
        put_str(out, pc->config[i].value);
        fputc('\n', out);
    }
}

static void d_plugins(FILE *out, const void *base, const field *f, int indent)
{
    const spk_config *cfg = base;
    put_key(out, indent, f->name);
    if (cfg->n_plugins == 0) {
        fputs(" []\n", out);
        return;
    }
    fputc('\n', out);
    for (size_t i = 0; i < cfg->n_plugins; i++) {
        const spk_plugin_conf *pc = &cfg->plugins[i];
        if (pc->autoloaded)
            fprintf(out, "%*s# autoloaded from plugins.dir\n", indent + 2, "");
        else
            fprintf(out, "%*s# line %d\n", indent + 2, "", pc->line);
        fprintf(out, "%*s-\n", indent + 2, "");
        for (size_t j = 0; j < N(plugin_entry_fields); j++) {
            const field *pf = &plugin_entry_fields[j];
            if (pf->dump == d_str && *(char *const *)cat(pc, pf) == NULL)
                fprintf(out, "%*s# %s: (the plugin's own)\n", indent + 4, "", pf->name);
            else
                pf->dump(out, pc, pf, indent + 4);
            if (strcmp(pf->name, "file") == 0 && pc->path != NULL) {
                fprintf(out, "%*s# path: ", indent + 4, "");
                put_str(out, pc->path);
                fputc('\n', out);
            }
        }
    }
}

static void d_lua(FILE *out, const void *base, const field *f, int indent)
{
    const spk_lua_text *t = cat(base, f);
    put_key(out, indent, f->name);
    if (t->code == NULL) {
        fputs(" ~\n", out);
        return;
    }
    fputc(' ', out);
    put_str(out, t->code);
    fputc('\n', out);
}

static void d_action(FILE *out, const void *base, const field *f, int indent)
{
    const spk_policy_conf *pc = base;
    if (!pc->has_action) {
        fprintf(out, "%*s# %s: (none: run)\n", indent, "", f->name);
        return;
    }
    put_key(out, indent, f->name);
    fprintf(out, " %s\n", action_words[pc->action]);
}

static void d_policies(FILE *out, const void *base, const field *f, int indent)
{
    const spk_config *cfg = base;
    put_key(out, indent, f->name);
    if (cfg->n_policies == 0) {
        fputs(" []\n", out);
        return;
    }
    fputc('\n', out);
    for (size_t i = 0; i < cfg->n_policies; i++) {
        const spk_policy_conf *pc = &cfg->policies[i];
        fprintf(out, "%*s# line %d\n%*s-\n", indent + 2, "", pc->line, indent + 2, "");
        for (size_t j = 0; j < N(policy_entry_fields); j++) {
            const field *pf = &policy_entry_fields[j];
            bool other = false; /* a parameter of another action: not printed */
            for (size_t k = 0; k < N(policy_params); k++)
                if (strcmp(policy_params[k].key, pf->name) == 0)
                    other = pc->action != policy_params[k].action &&
                            pc->action != policy_params[k].action2;
            if (!other)
                pf->dump(out, pc, pf, indent + 4);
        }
    }
}

void spk_config_dump(const spk_config *cfg, FILE *f)
{
    fprintf(f, "# effective configuration of %s (defaults included)\n",
            cfg->file ? cfg->file : "(unknown)");
    for (size_t i = 0; i < N(root_fields); i++)
        root_fields[i].dump(f, cfg, &root_fields[i], 0);
    for (size_t i = 0; i < N(sections); i++) {
        const section *s = &sections[i];
        if (!section_in_role(s, cfg->role))
            continue;
        fprintf(f, "%s:\n", s->name);
        for (size_t j = 0; j < s->n; j++)
            s->fields[j].dump(f, cfg, &s->fields[j], 2);
    }
}
