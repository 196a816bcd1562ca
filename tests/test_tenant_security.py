"""Tenant security (migration 20261201000300): row level security that costs a tenant its own rows,
the tenant id from ``app_metadata`` only, privileges that stay closed on Supabase's default
privileges, and no UPDATE or DELETE that pg-safeupdate would refuse.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from shared.db.migrate import migrate

from .contract import Conn, fetch, fetch_one
from .test_rls import CLIENT_A, CLIENT_B, app_metadata_claims, as_role

OTHERS = 1_000_000
BATCH_A = uuid.UUID("aaaaaaaa-0000-4000-8000-00000000000a")
BATCH_B = uuid.UUID("bbbbbbbb-0000-4000-8000-00000000000b")

# The tables a tenant reads by batch_id, with the columns and values of a bulk row. workflow_states
# rows are COMPLETED so the partial indexes of live rows stay out of the load.
BY_BATCH: dict[str, tuple[str, str, str]] = {
    "batch_items": ("id", "raw_data", "'{}'"),
    "workflow_states": ("item_id", "step_name, step_index, status", "'step_a', 0, 'COMPLETED'"),
    "normalize_domain_results": ("item_id", "attempt, result", "1, '{}'"),
}


async def load(conn: Conn, table: str, batch_id: uuid.UUID, first: int, count: int) -> None:
    """``count`` rows of ``batch_id`` in one statement. Triggers and foreign keys are off for the
    load (session_replication_role): rows of each table stand on their own, and a million of them
    take seconds. Item ids are ascending, so the primary key grows at its right edge."""
    item, columns, values = BY_BATCH[table]
    await conn.execute(
        f"insert into {table} (batch_id, {item}, {columns})"
        f" select %s, ('00000000-0000-4000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, {values}"
        f" from generate_series(%s::bigint, %s::bigint) g".encode(),
        (batch_id, first, first + count - 1),
    )


def scans(plan: Any) -> list[tuple[str, str]]:
    """(node type, relation) of every node of an EXPLAIN (FORMAT JSON) plan."""
    found = [(plan.get("Node Type", ""), plan.get("Relation Name", ""))]
    for child in plan.get("Plans", []):
        found += scans(child)
    return found


# 3. Row level security that scales ---------------------------------------------------------------


async def test_a_tenant_reads_its_3_rows_among_a_million_others_through_an_index(
    conn: Conn,
) -> None:
    async with conn.transaction():
        await conn.execute("set local session_replication_role = replica")
        await conn.execute(
            "insert into batches (id, client_id, blueprint) values (%s, %s, '[\"step_a\"]'),"
            " (%s, %s, '[\"step_a\"]')",
            (BATCH_A, CLIENT_A, BATCH_B, CLIENT_B),
        )
        for table in BY_BATCH:
            await load(conn, table, BATCH_B, 1, OTHERS)
            await load(conn, table, BATCH_A, OTHERS + 1, 3)
    await conn.execute("analyze batches, batch_items, workflow_states, normalize_domain_results")

    for table in BY_BATCH:
        query = sql.SQL("select * from {}").format(sql.Identifier(table)).as_string(conn)
        async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
            # The plan first: the per-row policy this replaces takes minutes here, not 50 ms.
            explained = await fetch_one(conn, f"explain (format json) {query}")
            nodes = scans(explained["QUERY PLAN"][0]["Plan"])
            assert ("Seq Scan", table) not in nodes, (table, nodes)
            assert any(rel == table and "Index" in node for node, rel in nodes), (table, nodes)
            started = time.perf_counter()
            rows = await fetch(conn, query)
            elapsed = time.perf_counter() - started
        assert {r["batch_id"] for r in rows} == {BATCH_A} and len(rows) == 3, table
        assert elapsed < 0.05, f"{table}: {elapsed * 1000:.1f} ms for 3 own rows"


async def test_no_policy_looks_up_the_batch_per_row(conn: Conn) -> None:
    """Every tenant-facing policy, results tables added by later migrations included."""
    rows = await fetch(
        conn,
        "select tablename, policyname, qual from pg_policies"
        " where schemaname = 'public' and 'authenticated' = any(roles)",
    )
    per_row = [(r["tablename"], r["policyname"]) for r in rows if "owns_batch" in (r["qual"] or "")]
    assert per_row == []
    tables = {r["tablename"] for r in rows}
    for results in ("clay_enrich_results", "exa_verify_results", "provider_costs", "result_cache"):
        assert results in tables


async def test_a_results_table_secured_by_the_helper_gets_the_scalable_policy(
    conn: Conn,
) -> None:
    await conn.execute(
        "create table public.new_step_results (like public.step_a_results including all)"
    )
    await conn.execute("select public.secure_results_table('public.new_step_results')")
    policy = await fetch_one(
        conn, "select qual from pg_policies where tablename = 'new_step_results'"
    )
    assert "owns_batch" not in policy["qual"] and "request_client_id" in policy["qual"]
    await conn.execute(
        "insert into enrichment_registry (step_name, modal_function_name, results_table)"
        " values ('new_step', 'new_step', 'new_step_results')"
    )


# 4. Tenant id from the JWT -----------------------------------------------------------------------


async def test_the_oauth_apps_client_id_claim_is_not_a_tenant(conn: Conn) -> None:
    """Supabase's OAuth 2.1 server sets the top-level ``client_id`` claim to the OAuth app's id
    (supabase.com/docs/guides/auth/oauth-server/token-security): two tenants' users signing in
    through one app carry the same value. Only app_metadata.client_id names the tenant."""
    app_id = uuid.uuid4()
    for client in (CLIENT_A, CLIENT_B):
        await conn.execute(
            "insert into batches (client_id, blueprint) values (%s, '[\"step_a\"]')", (client,)
        )
    oauth_user_of_a = {**app_metadata_claims(CLIENT_A), "client_id": str(app_id)}
    async with as_role(conn, "authenticated", oauth_user_of_a):
        seen = await fetch_one(conn, "select request_client_id() as c")
        assert seen["c"] == CLIENT_A
    only_the_app = {"role": "authenticated", "sub": str(uuid.uuid4()), "client_id": str(CLIENT_B)}
    async with as_role(conn, "authenticated", only_the_app):
        seen = await fetch_one(conn, "select request_client_id() as c")
        assert seen["c"] is None
        assert await fetch(conn, "select id from batches") == []


# 5. Default privileges, as on Supabase -----------------------------------------------------------

# What Supabase's image does before any project migration: supabase/postgres,
# migrations/db/init-scripts/00000000000000-initial-schema.sql, run as `postgres` (the role that
# later runs `supabase db push`) by migrations/db/migrate.sh. Default privileges are per database,
# so this stays in the test's own database; the roles exist cluster-wide already.
SUPABASE_DEFAULTS = """
do $$ begin
  if not exists (select 1 from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
end $$;
grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables
  to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions
  to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences
  to anon, authenticated, service_role;
"""

# Every privilege anon, authenticated or PUBLIC holds on an object of schema public.
API_PRIVILEGES = """
select c.relname::text as object, coalesce(r.rolname, 'PUBLIC') as grantee, a.privilege_type
from pg_class c
join pg_namespace n on n.oid = c.relnamespace and n.nspname = 'public'
cross join lateral aclexplode(coalesce(c.relacl, acldefault(
  case when c.relkind = 'S' then 's' else 'r' end::"char", c.relowner))) a
left join pg_roles r on r.oid = a.grantee
where c.relkind in ('r', 'p', 'v', 'm', 'S')
  and (a.grantee = 0 or r.rolname in ('anon', 'authenticated'))
union all
select c.relname || '.' || t.attname, coalesce(r.rolname, 'PUBLIC'), a.privilege_type
from pg_attribute t
join pg_class c on c.oid = t.attrelid
join pg_namespace n on n.oid = c.relnamespace and n.nspname = 'public'
cross join lateral aclexplode(t.attacl) a
left join pg_roles r on r.oid = a.grantee
where a.grantee = 0 or r.rolname in ('anon', 'authenticated')
union all
select p.oid::regprocedure::text, coalesce(r.rolname, 'PUBLIC'), a.privilege_type
from pg_proc p
join pg_namespace n on n.oid = p.pronamespace and n.nspname = 'public'
cross join lateral aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
left join pg_roles r on r.oid = a.grantee
where a.grantee = 0 or r.rolname in ('anon', 'authenticated')
"""

LATER_OBJECTS = """
create function public.added_later() returns int language sql as 'select 1';
create table public.added_later_t (id bigint generated always as identity, x int);
create sequence public.added_later_s;
"""


async def api_privileges(conn: Conn) -> set[tuple[str, str, str]]:
    rows = await fetch(conn, API_PRIVILEGES)
    return {(r["object"], r["grantee"], r["privilege_type"]) for r in rows}


# (what, role, privilege check): a later object's privileges that must be false, or true.
LATER_CLOSED = [
    ("function", "anon", "has_function_privilege('anon', 'public.added_later()', 'execute')"),
    (
        "function",
        "authenticated",
        "has_function_privilege('authenticated', 'public.added_later()', 'execute')",
    ),
    ("table", "anon", "has_table_privilege('anon', 'public.added_later_t', 'select')"),
    (
        "table",
        "authenticated",
        "has_table_privilege('authenticated', 'public.added_later_t', 'insert')",
    ),
    ("sequence", "anon", "has_sequence_privilege('anon', 'public.added_later_s', 'usage')"),
    (
        "sequence",
        "authenticated",
        "has_sequence_privilege('authenticated', 'public.added_later_s', 'usage')",
    ),
]
LATER_OPEN = [
    (
        "function",
        "service_role",
        "has_function_privilege('service_role', 'public.added_later()', 'execute')",
    ),
    (
        "table",
        "service_role",
        "has_table_privilege('service_role', 'public.added_later_t', 'select')",
    ),
]


async def later_object_privileges(conn: Conn) -> list[str]:
    """Creates a function, a table and a sequence as a later migration would; what is wrong."""
    await conn.execute(LATER_OBJECTS)
    wrong = []
    for checks, expected in ((LATER_CLOSED, False), (LATER_OPEN, True)):
        for what, role, check in checks:
            row = await fetch_one(conn, f"select {check} as granted")
            if row["granted"] is not expected:
                wrong.append(f"{role} {'has' if row['granted'] else 'lacks'} the new {what}")
    return wrong


async def test_functions_added_later_are_not_callable_by_anon(conn: Conn) -> None:
    assert await later_object_privileges(conn) == []
    nobody = {p for p in await api_privileges(conn) if p[1] in ("anon", "PUBLIC")}
    assert nobody == set()


async def test_on_supabase_defaults_the_api_roles_get_only_what_migrations_grant(
    conn: Conn, empty_dsn: str
) -> None:
    """The same migrations on a database with Supabase's default privileges give anon and
    authenticated exactly what they give on plain PostgreSQL, and nothing on objects added later."""
    async with await psycopg.AsyncConnection.connect(empty_dsn, autocommit=True) as supabase:
        await supabase.execute(SUPABASE_DEFAULTS)
        await migrate(empty_dsn)
        on_supabase = await api_privileges(supabase)
        assert {p for p in on_supabase if p[1] in ("anon", "PUBLIC")} == set()
        assert on_supabase == await api_privileges(conn)
        assert await later_object_privileges(supabase) == []


async def test_the_service_role_keeps_the_state_api(conn: Conn) -> None:
    for function in (
        "start_steps(jsonb)",
        "submit_steps(jsonb)",
        "claim_steps(integer,text[],uuid[],text)",
    ):
        row = await fetch_one(
            conn,
            "select has_function_privilege('service_role', %s, 'execute') as s,"
            " has_function_privilege('authenticated', %s, 'execute') as a",
            (f"public.{function}", f"public.{function}"),
        )
        assert (row["s"], row["a"]) == (True, False), function


@pytest.mark.parametrize(
    ("setup", "refusal"),
    [
        ("", "row level security disabled"),
        (
            "alter table public.open_results enable row level security;"
            " grant select on public.open_results to anon;",
            "granted to anon",
        ),
        (
            "alter table public.open_results enable row level security;"
            " grant select (result) on public.open_results to public;",
            "granted to PUBLIC",
        ),
    ],
)
async def test_the_registry_refuses_an_unprotected_results_table(
    conn: Conn, setup: str, refusal: str
) -> None:
    await conn.execute(
        "create table public.open_results (like public.step_a_results including all);"
        f" revoke all on public.open_results from anon, authenticated; {setup}".encode()
    )
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=refusal):
        await conn.execute(
            "insert into enrichment_registry (step_name, modal_function_name, results_table)"
            " values ('open_step', 'open_step', 'open_results')"
        )


# 12. pg-safeupdate -------------------------------------------------------------------------------

# pg-safeupdate (github.com/eradman/pg-safeupdate, safeupdate.c) refuses, in a post-parse-analyze
# hook, any UPDATE or DELETE query without a WHERE ("DELETE requires a WHERE clause"), including a
# data-modifying CTE, and so inside functions too (their statements are parsed the same way).
# Supabase loads it for every Data API session. This finds the same statements in SQL text.
_TOKEN = re.compile(
    r"(?P<skip>--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\""
    r"|\$(?P<tag>[A-Za-z_]*)\$.*?\$(?P=tag)\$)"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_$]*)|(?P<punct>[();])",
    re.S,
)
# `update` that starts no statement: FOR [NO KEY] UPDATE, ON CONFLICT DO UPDATE, trigger events.
_NOT_A_STATEMENT = {"for", "do", "or", "before", "after", "key", "of"}


def unguarded_dml(text: str) -> list[str]:
    """The UPDATE / DELETE statements of ``text`` (a function body) without a WHERE of their own."""
    toks = [
        m["word"].lower() if m["word"] else m["punct"]
        for m in _TOKEN.finditer(text)
        if m["word"] or m["punct"]
    ]
    found = []
    for i, tok in enumerate(toks):
        if tok == "update" and i and toks[i - 1] in _NOT_A_STATEMENT:
            continue
        if tok not in ("update", "delete") or (tok == "delete" and toks[i + 1 : i + 2] != ["from"]):
            continue
        depth = 0
        for t in toks[i + 1 :]:
            depth += {"(": 1, ")": -1}.get(t, 0)
            if depth < 0 or (depth == 0 and t in (";", "where")):
                break
        if t != "where":
            found.append(" ".join(toks[i : i + 5]))
    return found


def test_the_checker_finds_what_safeupdate_refuses() -> None:
    assert unguarded_dml("with t as (delete from q p returning p.id) select 1") == [
        "delete from q p returning"
    ]
    assert unguarded_dml("update t set a = 1; delete from t where x") == ["update t set a ;"]
    assert unguarded_dml("delete from q where true; update t set a = (select 1) where b") == []
    assert (
        unguarded_dml(
            "select 1 from t for update skip locked; insert into t values (1)"
            " on conflict (a) do update set a = 2; select 'delete from x'"
        )
        == []
    )


async def test_no_function_updates_or_deletes_without_a_where(conn: Conn) -> None:
    rows = await fetch(
        conn,
        "select p.oid::regprocedure::text as name, p.prosrc from pg_proc p"
        " join pg_namespace n on n.oid = p.pronamespace and n.nspname = 'public'"
        " join pg_language l on l.oid = p.prolang and l.lanname in ('sql', 'plpgsql')",
    )
    unguarded = {r["name"]: found for r in rows if (found := unguarded_dml(r["prosrc"]))}
    assert unguarded == {}


async def test_webhook_send_with_safeupdate_loaded(conn: Conn) -> None:
    try:
        await conn.execute("load 'safeupdate'")
    except psycopg.errors.UndefinedFile:
        pytest.skip("pg-safeupdate is not installed on this server (checked statically above)")
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    await conn.execute(
        "insert into enrichment_webhook_pending (change) values (%s)",
        (json.dumps({"batch_ids": [str(uuid.uuid4())]}),),
    )
    # The send swallows its errors into a warning (and keeps the change pending): read those.
    await conn.execute("select state_webhook_send('http://127.0.0.1:9/none', interval '0', null)")
    assert not [n for n in notices if "requires a WHERE clause" in n]
    await conn.execute("select flush_state_webhook()")  # no URL: purges every pending change
    assert await fetch(conn, "select id from enrichment_webhook_pending") == []
