/*
 * pgsql.h -- what pg-cache needs to know about the SQL text of a simple Query: whether its
 * answer may be cached, which names it reads, and which tables it writes. Not a parser:
 * a lexer that knows PostgreSQL's quoting (strings, E'' strings, dollar quotes, quoted
 * identifiers, nested comments) and a few rules per statement, each chosen so that a
 * mistake costs a cache miss or a needless invalidation, never a stale answer for the
 * cases it handles (docs/plugins.md, pg-cache, lists those it does not).
 *
 * Reads are over-approximated: a cacheable query depends on EVERY identifier it contains
 * (columns, aliases and schemas too, each part of a qualified name alone) except reserved
 * words and function names. A table it reads is therefore always among them, however it
 * is written (subqueries, CTEs, LATERAL, joins). Writes name their target table precisely
 * (INSERT INTO t, UPDATE t, DELETE FROM t, MERGE INTO t, TRUNCATE t, u, COPY t FROM,
 * ALTER TABLE t, DROP TABLE t, u): the last part of a qualified name. Statements whose
 * effect cannot be bounded that way (other DDL, GRANT, CALL, DO, EXECUTE, anything
 * unknown) set writes_all.
 */
#ifndef PGSQL_H
#define PGSQL_H

#include <stddef.h>

#define PGSQL_NAME_MAX  63u /* PostgreSQL truncates identifiers to NAMEDATALEN - 1 */
#define PGSQL_MAX_NAMES 32u /* a query naming more is not cached; a write, invalidates all */

typedef struct pgsql_names {
    size_t n;
    char v[PGSQL_MAX_NAMES][PGSQL_NAME_MAX + 1];
    int overflow; /* more than PGSQL_MAX_NAMES distinct names */
} pgsql_names;

typedef struct pgsql_info {
    int statements;     /* non-empty statements in the text */
    int cacheable;      /* exactly one read-only statement (SELECT, WITH, VALUES, TABLE)
                           without volatile functions, locking clauses, INTO, system
                           catalogs; its answer may be cached */
    int writes_all;     /* a statement whose writes cannot be bounded: invalidate all */
    int session_change; /* SET, RESET, DISCARD, CREATE TEMP ...: from now on this session's
                           answers may differ from another session's */
    const char *why;    /* why it is not cacheable (static text), or NULL */
    pgsql_names reads;  /* cacheable: the names its answer depends on (see above) */
    pgsql_names writes; /* tables written (unquoted names lowercased) */
} pgsql_info;

/* Analyse sql[0..len) (not NUL-terminated). Never fails: text it cannot make sense of is
 * not cacheable and, when it may write, sets writes_all. Returns 0, or -1 when memory ran
 * out (then *out says: not cacheable, writes_all). */
int pgsql_analyze(const char *sql, size_t len, pgsql_info *out);

#endif
