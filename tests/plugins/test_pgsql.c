/*
 * test_pgsql.c -- plugins/pgsql.c: what pg-cache may cache, what it depends on, what a
 * statement invalidates. Each case is a real PostgreSQL text, quoting included.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "pgsql.h"

static pgsql_info an(const char *sql)
{
    pgsql_info in;
    assert_int_equal(pgsql_analyze(sql, strlen(sql), &in), 0);
    return in;
}

static int has(const pgsql_names *ns, const char *name)
{
    for (size_t i = 0; i < ns->n; i++)
        if (strcmp(ns->v[i], name) == 0)
            return 1;
    return 0;
}

static void cacheable_reads(void **state)
{
    (void)state;
    pgsql_info in = an("SELECT abalance FROM pgbench_accounts WHERE aid = 42;");
    assert_true(in.cacheable);
    assert_true(has(&in.reads, "pgbench_accounts"));
    assert_false(in.writes_all);
    /* every table, however it is reached; quoted names keep their case */
    in = an("WITH x AS (SELECT * FROM public.Orders o) SELECT * FROM x JOIN \"Items\" i "
            "ON i.id = x.id, LATERAL (SELECT 1 FROM lines) l WHERE EXISTS (SELECT 1 FROM "
            "audit)");
    assert_true(in.cacheable);
    assert_true(has(&in.reads, "orders"));
    assert_true(has(&in.reads, "Items"));
    assert_true(has(&in.reads, "lines"));
    assert_true(has(&in.reads, "audit"));
    assert_false(has(&in.reads, "select")); /* reserved words are not names */
    assert_false(has(&in.reads, "exists")); /* nor function names */
    in = an("TABLE t1");
    assert_true(in.cacheable);
    assert_true(has(&in.reads, "t1"));
    in = an("(SELECT a FROM t1) UNION (SELECT a FROM t2)");
    assert_true(in.cacheable);
    assert_true(has(&in.reads, "t2"));
}

static void not_cacheable(void **state)
{
    (void)state;
    const char *no[] = {
        "SELECT now()",
        "select RANDOM() from t",
        "SELECT nextval('s')",
        "SELECT CURRENT_TIMESTAMP",
        "SELECT pg_backend_pid()",
        "SELECT * FROM pg_stat_activity",
        "SELECT * FROM information_schema.tables",
        "SELECT * FROM t FOR UPDATE",
        "SELECT * FROM t FOR NO KEY UPDATE",
        "SELECT * INTO copy FROM t",
        "SELECT 1; SELECT 2",
        "UPDATE t SET a = 1",
        "",
        "  -- only a comment\n",
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "SELECT * FROM t TABLESAMPLE SYSTEM (10)",
        "SELECT clock_timestamp()",
        "SELECT $1",
        "BEGIN",
        "SELECT 'now'::timestamp",
        "SELECT date ' Today '",
        "SELECT E'tomorrow'::date",
        "SELECT age(timestamp '2000-01-01')",
    };
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
        pgsql_info in = an(no[i]);
        if (in.cacheable)
            fail_msg("cacheable: %s", no[i]);
        assert_non_null(in.why);
    }
    pgsql_info in = an("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d");
    assert_true(has(&in.writes, "t"));
}

static void quoting_hides_words(void **state)
{
    (void)state;
    /* words in strings, dollar quotes, comments and quoted names are not statements */
    pgsql_info in = an("SELECT 'now(); DELETE FROM t', $$UPDATE t$$, $x$ ; drop $x$, "
                       "E'\\'; delete from t' /* nested /* DELETE */ comment */ FROM t -- ;x\n");
    assert_true(in.cacheable);
    assert_int_equal(in.statements, 1);
    assert_int_equal(in.writes.n, 0);
    in = an("SELECT 'now is the time', 'Today''s' FROM t"); /* only the exact inputs */
    assert_true(in.cacheable);
    in = an("SELECT \"now\"() FROM t"); /* a quoted function name is the function */
    assert_false(in.cacheable);
}

static void writes(void **state)
{
    (void)state;
    pgsql_info in = an("INSERT INTO s.a (x) SELECT x FROM b");
    assert_true(has(&in.writes, "a"));
    assert_false(in.writes_all);
    in = an("update ONLY Acc set x = 1 from other where acc.id = other.id");
    assert_true(has(&in.writes, "acc"));
    in = an("DELETE FROM \"Mixed\" WHERE true");
    assert_true(has(&in.writes, "Mixed"));
    in = an("TRUNCATE TABLE a, ONLY b");
    assert_true(has(&in.writes, "a"));
    assert_true(has(&in.writes, "b"));
    assert_false(in.writes_all);
    in = an("TRUNCATE a CASCADE");
    assert_true(in.writes_all);
    in = an("DROP TABLE IF EXISTS x, y");
    assert_true(has(&in.writes, "x"));
    assert_true(has(&in.writes, "y"));
    in = an("ALTER TABLE IF EXISTS ONLY q ADD COLUMN z int");
    assert_true(has(&in.writes, "q"));
    in = an("COPY t (a, b) FROM STDIN");
    assert_true(has(&in.writes, "t"));
    in = an("COPY t TO STDOUT");
    assert_int_equal(in.writes.n, 0);
    assert_false(in.writes_all);
    in = an("MERGE INTO tgt USING src ON tgt.id = src.id WHEN MATCHED THEN DELETE");
    assert_true(has(&in.writes, "tgt"));
    /* in a multi-statement query */
    in = an("SELECT 1; UPDATE u1 SET a = 2; SELECT 3");
    assert_true(has(&in.writes, "u1"));
    assert_false(in.cacheable);
    /* unbounded */
    const char *all[] = {"CREATE VIEW v AS SELECT 1",
                         "CALL p()",
                         "DO $$BEGIN END$$",
                         "GRANT SELECT ON t TO u",
                         "EXECUTE s",
                         "REFRESH MATERIALIZED VIEW m",
                         "DROP VIEW v",
                         "EXPLAIN ANALYZE DELETE FROM t",
                         "frobnicate"};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        if (!an(all[i]).writes_all)
            fail_msg("not writes_all: %s", all[i]);
    /* harmless */
    const char *none[] = {"BEGIN", "COMMIT", "SHOW work_mem", "LISTEN x", "VACUUM t"};
    for (size_t i = 0; i < sizeof(none) / sizeof(none[0]); i++) {
        pgsql_info h = an(none[i]);
        if (h.writes_all || h.writes.n > 0)
            fail_msg("writes: %s", none[i]);
    }
}

static void session_changes(void **state)
{
    (void)state;
    assert_true(an("SET search_path = other").session_change);
    assert_true(an("RESET ALL").session_change);
    assert_true(an("DISCARD ALL").session_change);
    assert_true(an("CREATE TEMP TABLE t (a int)").session_change);
    assert_false(an("SELECT 1 FROM t").session_change);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(cacheable_reads),     cmocka_unit_test(not_cacheable),
        cmocka_unit_test(quoting_hides_words), cmocka_unit_test(writes),
        cmocka_unit_test(session_changes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
