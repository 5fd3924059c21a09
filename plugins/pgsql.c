/*
 * pgsql.c -- the SQL lexer and statement rules behind pg-cache (see pgsql.h).
 *
 * The text is cut into tokens once (identifiers lowercased unless quoted; strings,
 * numbers, comments and parameters reduced to their kind), then into statements at
 * top-level semicolons, and each statement is classified by its first words.
 */
#include "pgsql.h"

#include <stdlib.h>
#include <string.h>

enum tkind { TK_IDENT, TK_QIDENT, TK_STRING, TK_NUMBER, TK_PARAM, TK_PUNCT, TK_OP };

typedef struct tok {
    unsigned char kind;
    char c; /* TK_PUNCT: the character */
    char name[PGSQL_NAME_MAX + 1];
} tok;

typedef struct toks {
    tok *v;
    size_t n, cap;
} toks;

/* ---- lexer ------------------------------------------------------------------------- */

static int ident_start(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c >= 0x80;
}

static int ident_char(unsigned char c)
{
    return ident_start(c) || (c >= '0' && c <= '9') || c == '$';
}

static tok *push(toks *t, int kind)
{
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        tok *v = realloc(t->v, cap * sizeof(*v));
        if (v == NULL)
            return NULL;
        t->v = v;
        t->cap = cap;
    }
    tok *k = &t->v[t->n++];
    k->kind = (unsigned char)kind;
    k->c = 0;
    k->name[0] = '\0';
    return k;
}

/* Past a '...' string starting at s[i] == '\''; `esc`: backslash escapes (E''). */
static size_t skip_string(const char *s, size_t n, size_t i, int esc)
{
    for (i++; i < n; i++) {
        if (esc && s[i] == '\\') {
            i++;
            continue;
        }
        if (s[i] == '\'') {
            if (i + 1 < n && s[i + 1] == '\'') {
                i++;
                continue;
            }
            return i + 1;
        }
    }
    return n;
}

/* A dollar quote's opening tag at s[i] == '$': its length ("$$" = 2, "$tag$"), or 0. */
static size_t dollar_tag(const char *s, size_t n, size_t i)
{
    size_t j = i + 1;
    if (j < n && s[j] == '$')
        return 2;
    if (j >= n || !ident_start((unsigned char)s[j]))
        return 0;
    while (j < n && ident_char((unsigned char)s[j]) && s[j] != '$')
        j++;
    return j < n && s[j] == '$' ? j - i + 1 : 0;
}

/* A string's text, trimmed and lowercased, into k->name when it is short: what the
 * special date/time inputs ('now', 'today', ...) need. */
static void string_word(tok *k, const char *s, size_t n)
{
    while (n > 0 && (*s == ' ' || *s == '\t'))
        s++, n--;
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    if (n > 16)
        return;
    for (size_t j = 0; j < n; j++)
        k->name[j] = s[j] >= 'A' && s[j] <= 'Z' ? (char)(s[j] - 'A' + 'a') : s[j];
    k->name[n] = '\0';
}

static int lex(const char *s, size_t n, toks *t)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
            i++;
        } else if (c == '-' && i + 1 < n && s[i + 1] == '-') {
            while (i < n && s[i] != '\n')
                i++;
        } else if (c == '/' && i + 1 < n && s[i + 1] == '*') {
            int depth = 1;
            for (i += 2; i < n && depth > 0; i++) {
                if (s[i] == '/' && i + 1 < n && s[i + 1] == '*')
                    depth++, i++;
                else if (s[i] == '*' && i + 1 < n && s[i + 1] == '/')
                    depth--, i++;
            }
        } else if (c == '\'') {
            tok *k = push(t, TK_STRING);
            if (k == NULL)
                return -1;
            size_t b = i + 1;
            i = skip_string(s, n, i, 0);
            string_word(k, s + b, i > b ? i - b - 1 : 0);
        } else if (c == '"') {
            tok *k = push(t, TK_QIDENT);
            if (k == NULL)
                return -1;
            size_t o = 0;
            for (i++; i < n; i++) {
                if (s[i] == '"') {
                    if (i + 1 < n && s[i + 1] == '"')
                        i++;
                    else
                        break;
                }
                if (o < PGSQL_NAME_MAX)
                    k->name[o++] = s[i];
            }
            k->name[o] = '\0';
            i++;
        } else if (c == '$' && i + 1 < n && s[i + 1] >= '0' && s[i + 1] <= '9') {
            if (push(t, TK_PARAM) == NULL)
                return -1;
            for (i++; i < n && s[i] >= '0' && s[i] <= '9'; i++)
                ;
        } else if (c == '$' && dollar_tag(s, n, i) > 0) {
            size_t tl = dollar_tag(s, n, i);
            if (push(t, TK_STRING) == NULL)
                return -1;
            const char *end = NULL;
            for (size_t j = i + tl; j + tl <= n; j++)
                if (s[j] == '$' && memcmp(s + j, s + i, tl) == 0) {
                    end = s + j;
                    break;
                }
            i = end ? (size_t)(end - s) + tl : n;
        } else if (ident_start(c)) {
            size_t b = i;
            while (i < n && ident_char((unsigned char)s[i]))
                i++;
            /* E'..', B'..', X'..', U&'..' are strings; U&".." a quoted identifier */
            if (i < n && s[i] == '\'' && i - b == 1) {
                tok *k = push(t, TK_STRING);
                if (k == NULL)
                    return -1;
                size_t q = i + 1;
                i = skip_string(s, n, i, s[b] == 'e' || s[b] == 'E');
                string_word(k, s + q, i > q ? i - q - 1 : 0);
                continue;
            }
            tok *k = push(t, TK_IDENT);
            if (k == NULL)
                return -1;
            size_t len = i - b < PGSQL_NAME_MAX ? i - b : PGSQL_NAME_MAX;
            for (size_t j = 0; j < len; j++) {
                char ch = s[b + j];
                k->name[j] = ch >= 'A' && ch <= 'Z' ? (char)(ch - 'A' + 'a') : ch;
            }
            k->name[len] = '\0';
        } else if (c >= '0' && c <= '9') {
            if (push(t, TK_NUMBER) == NULL)
                return -1;
            while (i < n && (ident_char((unsigned char)s[i]) || s[i] == '.'))
                i++;
        } else if (c == '(' || c == ')' || c == ',' || c == ';' || c == '.' || c == '[' ||
                   c == ']' || c == '*') {
            tok *k = push(t, TK_PUNCT);
            if (k == NULL)
                return -1;
            k->c = (char)c;
            i++;
        } else {
            if (push(t, TK_OP) == NULL)
                return -1;
            i++;
        }
    }
    return 0;
}

/* ---- words ------------------------------------------------------------------------- */

static int is(const tok *k, const char *word)
{
    return k != NULL && k->kind == TK_IDENT && strcmp(k->name, word) == 0;
}

static int punct(const tok *k, char c)
{
    return k != NULL && k->kind == TK_PUNCT && k->c == c;
}

static int in_list(const char *w, const char *const *list)
{
    for (; *list != NULL; list++)
        if (strcmp(w, *list) == 0)
            return 1;
    return 0;
}

/* The word lists are packed by hand. */
/* clang-format off */
/* PostgreSQL's reserved key words (and those reserved except as function or type names):
 * never a table's name unless quoted. */
static const char *const reserved[] = {
    "all", "analyse", "analyze", "and", "any", "array", "as", "asc", "asymmetric",
    "authorization", "binary", "both", "case", "cast", "check", "collate", "collation",
    "column", "concurrently", "constraint", "create", "cross", "current_catalog",
    "current_date", "current_role", "current_schema", "current_time", "current_timestamp",
    "current_user", "default", "deferrable", "desc", "distinct", "do", "else", "end",
    "except", "false", "fetch", "for", "foreign", "freeze", "from", "full", "grant", "group",
    "having", "ilike", "in", "initially", "inner", "intersect", "into", "is", "isnull",
    "join", "lateral", "leading", "left", "like", "limit", "localtime", "localtimestamp",
    "natural", "not", "notnull", "null", "offset", "on", "only", "or", "order", "outer",
    "overlaps", "placing", "primary", "references", "returning", "right", "select",
    "session_user", "similar", "some", "symmetric", "table", "tablesample", "then", "to",
    "trailing", "true", "union", "unique", "user", "using", "variadic", "verbose", "when",
    "where", "window", "with", NULL};

/* Words whose value changes between two runs of the same query. */
static const char *const volatile_words[] = {
    "current_date", "current_time", "current_timestamp", "localtime", "localtimestamp",
    "tablesample", NULL};

/* Date/time inputs read as the current time when the query runs ('now'::timestamp). */
static const char *const volatile_strings[] = {"now", "today", "tomorrow", "yesterday",
                                               NULL};

/* Built-in functions whose result changes between calls, or that have side effects, or
 * depend on the session (any pg_* function is treated so too). age(x) alone is relative
 * to today. */
static const char *const volatile_funcs[] = {
    "now", "age", "random", "random_normal", "setseed", "nextval", "currval", "lastval", "setval",
    "clock_timestamp", "statement_timestamp", "transaction_timestamp", "timeofday",
    "gen_random_uuid", "uuid_generate_v1", "uuid_generate_v1mc", "uuid_generate_v4",
    "txid_current", "txid_current_if_assigned", "txid_current_snapshot", "current_setting",
    "set_config", "inet_client_addr", "inet_client_port", "inet_server_addr",
    "inet_server_port", "version", "dblink", "dblink_exec", "lo_import", "lo_export",
    "lo_create", "lo_unlink", "lo_get", "lo_put", "lo_open", "loread", "lowrite", NULL};

/* First words of statements that neither write data nor change what the session sees. */
static const char *const harmless[] = {
    "begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release", "show",
    "listen", "unlisten", "notify", "checkpoint", "vacuum", "analyze", "analyse", "lock",
    "fetch", "move", "close", "declare", "deallocate", "prepare", "load", "values", NULL};

/* First words of statements that change the session's settings or private objects. */
static const char *const session_words[] = {"set", "reset", "discard", NULL};
/* clang-format on */

/* ---- names ------------------------------------------------------------------------- */

static void add_name(pgsql_names *ns, const char *name)
{
    if (name[0] == '\0')
        return;
    for (size_t i = 0; i < ns->n; i++)
        if (strcmp(ns->v[i], name) == 0)
            return;
    if (ns->n == PGSQL_MAX_NAMES) {
        ns->overflow = 1;
        return;
    }
    strcpy(ns->v[ns->n++], name);
}

/* The qualified name starting at v[i] (a.b.c): its last part, and the index after it.
 * NULL when v[i] is not a name. */
static const char *qualified(const tok *v, size_t n, size_t *i)
{
    if (*i >= n || (v[*i].kind != TK_IDENT && v[*i].kind != TK_QIDENT))
        return NULL;
    const char *last = v[*i].name;
    (*i)++;
    while (*i + 1 < n && punct(&v[*i], '.') &&
           (v[*i + 1].kind == TK_IDENT || v[*i + 1].kind == TK_QIDENT)) {
        last = v[*i + 1].name;
        *i += 2;
    }
    return last;
}

/* A write to the table named at v[i], skipping ONLY / IF EXISTS first. */
static void write_target(pgsql_info *in, const tok *v, size_t n, size_t i)
{
    while (i < n && (is(&v[i], "only") || is(&v[i], "if") || is(&v[i], "exists")))
        i++;
    const char *t = qualified(v, n, &i);
    if (t == NULL)
        in->writes_all = 1; /* e.g. UPDATE (subquery): not a form we bound */
    else
        add_name(&in->writes, t);
}

/* TRUNCATE [TABLE] [ONLY] a [*], [ONLY] b ... / DROP TABLE [IF EXISTS] a, b [CASCADE] */
static void write_list(pgsql_info *in, const tok *v, size_t n, size_t i)
{
    for (;;) {
        while (i < n && (is(&v[i], "only") || is(&v[i], "if") || is(&v[i], "exists")))
            i++;
        const char *t = qualified(v, n, &i);
        if (t == NULL) {
            in->writes_all = 1;
            return;
        }
        add_name(&in->writes, t);
        if (i < n && punct(&v[i], '*'))
            i++;
        if (i < n && punct(&v[i], ',')) {
            i++;
            continue;
        }
        break;
    }
    for (; i < n; i++)
        if (is(&v[i], "cascade"))
            in->writes_all = 1; /* dependent tables or views go too */
}

/* Data-modifying words inside a read statement (WITH x AS (DELETE ...) SELECT ...) and
 * its locking clauses. Returns non-zero when the statement may not be cached. */
static int modifying_parts(pgsql_info *in, const tok *v, size_t n)
{
    int found = 0;
    for (size_t i = 0; i < n; i++) {
        const tok *prev = i > 0 ? &v[i - 1] : NULL;
        if (is(&v[i], "insert") && i + 1 < n && is(&v[i + 1], "into")) {
            write_target(in, v, n, i + 2), found = 1;
        } else if (is(&v[i], "merge") && i + 1 < n && is(&v[i + 1], "into")) {
            write_target(in, v, n, i + 2), found = 1;
        } else if (is(&v[i], "delete") && i + 1 < n && is(&v[i + 1], "from")) {
            write_target(in, v, n, i + 2), found = 1;
        } else if (is(&v[i], "update") && !is(prev, "for") && !is(prev, "key") && !is(prev, "no")) {
            write_target(in, v, n, i + 1), found = 1;
        } else if (is(&v[i], "for") && i + 1 < n &&
                   (is(&v[i + 1], "update") || is(&v[i + 1], "share") || is(&v[i + 1], "no") ||
                    is(&v[i + 1], "key"))) {
            in->why = "a locking clause (FOR UPDATE/SHARE)", found = 1;
        } else if (is(&v[i], "into") && !is(prev, "insert") && !is(prev, "merge")) {
            in->why = "SELECT INTO creates a table", found = 1;
        }
    }
    if (found && in->why == NULL)
        in->why = "a data-modifying WITH";
    return found;
}

/* A read statement: check what makes it uncacheable, collect the names it depends on. */
static void read_statement(pgsql_info *in, const tok *v, size_t n)
{
    if (modifying_parts(in, v, n))
        return;
    for (size_t i = 0; i < n; i++) {
        const tok *k = &v[i];
        int call = i + 1 < n && punct(&v[i + 1], '(');
        if (k->kind == TK_STRING && in_list(k->name, volatile_strings)) {
            in->why = "a date/time input read as the current time ('now', 'today' ...)";
            return;
        }
        if (k->kind == TK_IDENT && in_list(k->name, volatile_words)) {
            in->why = "a volatile value (CURRENT_TIMESTAMP, TABLESAMPLE ...)";
            return;
        }
        if ((k->kind == TK_IDENT || k->kind == TK_QIDENT) && call) { /* "now"() is now() */
            if (in_list(k->name, volatile_funcs) || strncmp(k->name, "pg_", 3) == 0) {
                in->why = "a volatile or session-dependent function";
                return;
            }
            continue; /* a function name, not a relation */
        }
        if (k->kind == TK_PARAM) {
            in->why = "a parameter ($n) outside the extended protocol";
            return;
        }
        if (k->kind != TK_IDENT && k->kind != TK_QIDENT)
            continue;
        if (k->kind == TK_IDENT && in_list(k->name, reserved))
            continue;
        if (strncmp(k->name, "pg_", 3) == 0 || strcmp(k->name, "information_schema") == 0) {
            in->why = "a system catalog";
            return;
        }
        add_name(&in->reads, k->name);
    }
    if (in->reads.overflow) {
        in->why = "too many names";
        return;
    }
    in->cacheable = 1;
}

static void statement(pgsql_info *in, const tok *v, size_t n, int *reads)
{
    size_t f = 0;
    while (f < n && punct(&v[f], '('))
        f++; /* (SELECT ...) UNION (SELECT ...) */
    if (f == n)
        return;
    in->statements++;
    const tok *k = &v[f];
    const tok *k2 = f + 1 < n ? &v[f + 1] : NULL;
    if (is(k, "select") || is(k, "with") || is(k, "table") || (is(k, "values") && f == 0)) {
        (*reads)++;
        read_statement(in, v, n);
    } else if (is(k, "insert") || is(k, "merge")) {
        write_target(in, v, n, f + 2); /* INSERT INTO t / MERGE INTO t */
    } else if (is(k, "update")) {
        write_target(in, v, n, f + 1);
    } else if (is(k, "delete")) {
        write_target(in, v, n, f + 2);
    } else if (is(k, "truncate")) {
        write_list(in, v, n, f + 1 + (is(k2, "table") ? 1 : 0));
    } else if (is(k, "drop") && is(k2, "table")) {
        write_list(in, v, n, f + 2);
    } else if (is(k, "alter") && is(k2, "table")) {
        write_target(in, v, n, f + 2);
    } else if (is(k, "copy")) {
        size_t i = f + 1;
        const char *t = qualified(v, n, &i);
        int from = 0;
        for (size_t j = f + 1; j < n; j++)
            from |= is(&v[j], "from");
        if (from && t != NULL)
            add_name(&in->writes, t);
        else if (from)
            in->writes_all = 1;
    } else if (is(k, "create")) {
        for (size_t j = f + 1; j < n && j < f + 4; j++)
            if (is(&v[j], "temp") || is(&v[j], "temporary"))
                in->session_change = 1; /* a private table may shadow a shared one */
        in->writes_all = 1;
    } else if (is(k, "explain")) {
        for (size_t j = f + 1; j < n; j++)
            if (is(&v[j], "insert") || is(&v[j], "update") || is(&v[j], "delete") ||
                is(&v[j], "merge"))
                in->writes_all = 1; /* EXPLAIN ANALYZE runs it */
    } else if (k->kind == TK_IDENT && in_list(k->name, session_words)) {
        in->session_change = 1;
    } else if (k->kind == TK_IDENT && in_list(k->name, harmless)) {
        /* nothing to invalidate */
    } else {
        in->writes_all = 1; /* DDL, GRANT, CALL, DO, EXECUTE, REFRESH, COMMENT, unknown */
    }
}

int pgsql_analyze(const char *sql, size_t len, pgsql_info *out)
{
    memset(out, 0, sizeof(*out));
    toks t = {0};
    if (lex(sql, len, &t) != 0) {
        free(t.v);
        out->writes_all = 1;
        out->why = "out of memory";
        return -1;
    }
    int reads = 0;
    size_t b = 0;
    for (size_t i = 0; i <= t.n; i++) {
        if (i < t.n && !punct(&t.v[i], ';'))
            continue;
        statement(out, t.v + b, i - b, &reads);
        b = i + 1;
    }
    free(t.v);
    if (out->writes.overflow)
        out->writes_all = 1;
    if (out->statements != 1 || reads != 1) {
        if (out->cacheable || out->why == NULL)
            out->why = out->statements == 0 ? "an empty query" : "not one read-only statement";
        out->cacheable = 0;
    }
    if (out->cacheable && (out->writes.n > 0 || out->writes_all || out->session_change)) {
        out->cacheable = 0;
        out->why = "it writes";
    }
    return 0;
}
