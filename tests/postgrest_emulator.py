"""A small stand-in for Supabase's REST endpoint, for tests: PostgREST's RPC on a real database.

Mounted with respx, every ``POST {url}/rest/v1/rpc/<function>`` runs the SQL function in the test
database the way PostgREST does (``src/PostgREST/Query/QueryBuilder.hs``, ``Error.hs``):

- the gateway wants an ``apikey`` header naming a known key (401 otherwise, Kong's JSON);
- the bearer JWT's claims (decoded, not verified) become ``request.jwt.claims`` and its ``role``
  the transaction's role, as PostgREST's ``set_config('role', ...)`` does;
- the function is found by name and by the JSON body's keys, which must include every argument
  without a default and name nothing else (else 404 ``PGRST202``), from ``pg_proc``;
- the arguments go through ``json_to_recordset`` with the function's argument types, so JSON is
  converted to SQL values by PostgreSQL exactly as under PostgREST;
- the answer is a JSON array of row objects for set-returning and table functions, the JSON value
  for scalar ones, 204 for void; SQL errors come back as ``{"code", "message", "details",
  "hint"}`` with PostgREST's HTTP status for the SQLSTATE (``mapSQLtoHTTP``).

Not emulated: GET calls, ``Prefer`` headers, bulk (array) bodies, single unnamed json parameters,
``RAISE SQLSTATE 'PGRST'`` responses, JWT signature checks, the schema cache's staleness.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import respx
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

SUPABASE_URL = "https://abcdefghijklmnopqrst.supabase.co"
JWT_SECRET = "test-jwt-secret-with-at-least-32-characters"
EXPOSED_SCHEMA = "public"
ANON_ROLE = "anon"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: Mapping[str, Any], secret: str = JWT_SECRET) -> str:
    """An HS256 JWT, like Supabase's anon and service-role keys."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


# Far-future expiry, as Supabase's own keys have (ten years).
SERVICE_ROLE_KEY = make_jwt({"iss": "supabase", "role": "service_role", "exp": 2_000_000_000})
ANON_KEY = make_jwt({"iss": "supabase", "role": "anon", "exp": 2_000_000_000})


class _JwtError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_jwt(token: str) -> dict[str, Any]:
    """The claims of a JWT, without verifying its signature (PGRST301/303 errors as PostgREST)."""
    if not token:
        raise _JwtError("PGRST301", "Empty JWT is sent in Authorization header")
    parts = token.split(".")
    if len(parts) != 3:
        raise _JwtError("PGRST301", f"Expected 3 parts in JWT; got {len(parts)}")
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        raise _JwtError("PGRST301", "JWT couldn't be decoded") from None
    if not isinstance(claims, dict):
        raise _JwtError("PGRST303", "Parsing claims failed")
    exp = claims.get("exp")
    if exp is not None:
        if not isinstance(exp, (int, float)):
            raise _JwtError("PGRST303", "The JWT 'exp' claim must be a number")
        if exp < time.time():
            raise _JwtError("PGRST303", "JWT expired")
    return claims


def pg_error_status(sqlstate: str, message: str, *, authed: bool) -> int:
    """PostgREST's HTTP status for a PostgreSQL error (``mapSQLtoHTTP`` in ``Error.hs``)."""
    exact = {
        "23503": 409,
        "23505": 409,
        "25006": 405,
        "53400": 500,
        "57P01": 503,
        "P0001": 400,
        "42P01": 404,
        "42P17": 500,
    }
    if sqlstate in exact:
        return exact[sqlstate]
    if sqlstate == "21000":
        return 400 if message.endswith("requires a WHERE clause") else 500
    if sqlstate == "22023":
        return 401 if message.startswith("role") and message.endswith("does not exist") else 400
    if sqlstate == "42883":
        return 406 if message.startswith("function xmlagg(") else 404
    if sqlstate == "42501":
        return 403 if authed else 401
    if sqlstate.startswith("PT") and sqlstate[2:].isdigit():
        return int(sqlstate[2:])
    by_class = {
        "08": 503,
        "09": 500,
        "0L": 403,
        "0P": 403,
        "25": 500,
        "28": 403,
        "2D": 500,
        "38": 500,
        "39": 500,
        "3B": 500,
        "40": 500,
        "53": 503,
        "54": 500,
        "55": 500,
        "57": 500,
        "58": 500,
        "F0": 500,
        "HV": 500,
        "P0": 500,
        "XX": 500,
    }
    return by_class.get(sqlstate[:2], 400)


@dataclass(frozen=True)
class Routine:
    """A function of the exposed schema, as PostgREST's schema cache describes it."""

    name: str
    params: tuple[tuple[str, str], ...]  # input (name, type) in order
    required: frozenset[str]  # input names without a default
    returns_set: bool
    returns: str  # "composite" | "scalar" | "void"

    def matches(self, keys: frozenset[str]) -> bool:
        return self.required <= keys <= {name for name, _ in self.params}


_ROUTINES = """
select p.proname, p.proretset, p.pronargs, p.pronargdefaults,
       coalesce(p.proargnames, '{}') as names,
       coalesce(p.proargmodes::text[], '{}') as modes,
       array(select format_type(t, null) from unnest(p.proargtypes) t) as in_types,
       case when p.prorettype = 'void'::regtype then 'void'
            when t.typtype = 'c' or p.prorettype = 'record'::regtype then 'composite'
            else 'scalar' end as returns
from pg_proc p
join pg_namespace n on n.oid = p.pronamespace
join pg_type t on t.oid = p.prorettype
where n.nspname = %s and p.prokind = 'f' and (%s::text is null or p.proname = %s)
"""


def _routine(row: Mapping[str, Any]) -> Routine:
    names: list[str] = list(row["names"])
    modes: list[str] = list(row["modes"])
    if modes:  # OUT and TABLE arguments are named too: keep the input ones
        input_names = [n for n, m in zip(names, modes, strict=True) if m in ("i", "b", "v")]
    else:
        input_names = names[: row["pronargs"]] + [""] * (row["pronargs"] - len(names))
    params = tuple(zip(input_names, row["in_types"], strict=True))
    without_default = len(params) - row["pronargdefaults"]
    return Routine(
        name=row["proname"],
        params=params,
        required=frozenset(name for name, _ in params[:without_default]),
        returns_set=row["proretset"],
        returns=row["returns"],
    )


def _call_query(schema: str, routine: Routine, keys: frozenset[str]) -> sql.Composed:
    """PostgREST's call: the body through json_to_recordset, each argument by name."""
    params = [(name, type_) for name, type_ in routine.params if name in keys]
    function = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(routine.name))
    args = sql.SQL(", ").join(
        sql.SQL("{} := (select {} from pgrst_args limit 1)").format(
            sql.Identifier(name), sql.Identifier(name)
        )
        for name, _ in params
    )
    cte: sql.Composable = sql.SQL("")
    if params:
        columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(type_)) for name, type_ in params
        )
        cte = sql.SQL(
            "with pgrst_payload as (select %(body)s::json as json_data),"
            " pgrst_body as (select case when json_typeof(json_data) = 'array' then json_data"
            " else json_build_array(json_data) end as val from pgrst_payload),"
            " pgrst_args as (select * from json_to_recordset((select val from pgrst_body))"
            " as _({columns})) "
        ).format(columns=columns)
    call = sql.SQL("{}({})").format(function, args)
    source: sql.Composable
    body: sql.Composable
    if routine.returns == "composite":
        source = sql.SQL("select pgrst_call.* from {} pgrst_call").format(call)
        body = sql.SQL("coalesce(json_agg(_postgrest_t), '[]')")
    else:
        source = sql.SQL("select {} as pgrst_scalar").format(call)
        body = sql.SQL("coalesce(json_agg(_postgrest_t.pgrst_scalar), '[]')")
    if not routine.returns_set:
        body = sql.SQL("({}) -> 0").format(body)
    return sql.SQL("{}select ({})::text as body from ({}) _postgrest_t").format(cte, body, source)


def _json_response(
    status: int, payload: Any, headers: Mapping[str, str] | None = None
) -> httpx.Response:
    return httpx.Response(
        status,
        content=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json; charset=utf-8", **(headers or {})},
    )


def _pgrst_error(
    status: int,
    code: str,
    message: str,
    details: str | None = None,
    hint: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    payload = {"code": code, "details": details, "hint": hint, "message": message}
    extra = {"Proxy-Status": f"PostgREST; error={code}", **(headers or {})}
    return _json_response(status, payload, extra)


class PostgrestEmulator:
    """Answers Supabase RPC requests from the database at ``dsn`` (a superuser DSN, as PostgREST's
    authenticator: it switches to the JWT's role for each request)."""

    def __init__(self, dsn: str, *, api_keys: Iterable[str] = (SERVICE_ROLE_KEY, ANON_KEY)):
        self._pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
        )
        self._api_keys = frozenset(api_keys)

    async def open(self) -> None:
        await self._pool.open(wait=True, timeout=30)

    async def close(self) -> None:
        await self._pool.close()

    def mount(self, router: respx.MockRouter, base_url: str = SUPABASE_URL) -> respx.Route:
        pattern = rf"^{re.escape(base_url.rstrip('/'))}/rest/v1/rpc/(?P<function>[^/?]+)(\?.*)?$"
        route: respx.Route = router.post(url__regex=pattern).mock(side_effect=self.handle)
        return route

    async def handle(self, request: httpx.Request, function: str) -> httpx.Response:
        apikey = request.headers.get("apikey")
        if apikey is None:
            return _json_response(
                401,
                {
                    "message": "No API key found in request",
                    "hint": "No `apikey` request header or url param was found.",
                },
            )
        if apikey not in self._api_keys:
            return _json_response(
                401,
                {
                    "message": "Invalid API key",
                    "hint": "Double check your Supabase `anon` or `service_role` API key.",
                },
            )
        authorization = request.headers.get("authorization")
        claims: dict[str, Any] = {"role": ANON_ROLE}
        if authorization is not None:
            token = authorization.removeprefix("Bearer ").removeprefix("bearer ").strip()
            try:
                claims = decode_jwt(token)
            except _JwtError as exc:
                description = json.dumps(exc.message)
                return _pgrst_error(
                    401,
                    exc.code,
                    exc.message,
                    headers={
                        "WWW-Authenticate": f'Bearer error="invalid_token", '
                        f"error_description={description}"
                    },
                )
        role = str(claims.get("role", ANON_ROLE))
        authed = role != ANON_ROLE

        schema = request.headers.get("content-profile", EXPOSED_SCHEMA)
        if schema != EXPOSED_SCHEMA:
            return _pgrst_error(
                406,
                "PGRST106",
                f"Invalid schema: {schema}",
                hint=f"Only the following schemas are exposed: {EXPOSED_SCHEMA}",
            )
        try:
            body = json.loads(request.content or b"{}")
        except ValueError as exc:
            return _pgrst_error(400, "PGRST102", f"Empty or invalid json: {exc}")
        if not isinstance(body, dict):
            return _pgrst_error(400, "PGRST102", "The emulator takes a JSON object body only")
        keys = frozenset(body)

        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            await cur.execute(_ROUTINES, (EXPOSED_SCHEMA, None, None))
            every = [_routine(row) for row in await cur.fetchall()]
            named = [r for r in every if r.name == function]
            matching = [r for r in named if r.matches(keys)]
            if not matching:
                return self._no_function(function, keys, every, named)
            if len(matching) > 1:
                return self._ambiguous(matching)
            query = _call_query(EXPOSED_SCHEMA, matching[0], keys)
            try:
                async with conn.transaction():
                    await conn.execute(
                        "select set_config('search_path', 'public, extensions', true),"
                        " set_config('role', %s, true),"
                        " set_config('request.jwt.claims', %s, true),"
                        " set_config('request.method', 'POST', true),"
                        " set_config('request.path', %s, true)",
                        (role, json.dumps(claims), f"/rpc/{function}"),
                    )
                    row = await (await conn.execute(query, {"body": json.dumps(body)})).fetchone()
            except psycopg.Error as exc:
                return self._sql_error(exc, authed=authed)
        assert row is not None
        if matching[0].returns == "void" and not matching[0].returns_set:
            return httpx.Response(204)
        return httpx.Response(
            200,
            content=(row[0] or "null").encode(),
            headers={"Content-Type": "application/json; charset=utf-8"},
        )

    @staticmethod
    def _no_function(
        function: str, keys: frozenset[str], every: list[Routine], named: list[Routine]
    ) -> httpx.Response:
        qualified = f"{EXPOSED_SCHEMA}.{function}"
        listed = ", ".join(sorted(keys))
        if keys:
            message = f"Could not find the function {qualified}({listed}) in the schema cache"
            searched = f" with parameter{'s' if len(keys) > 1 else ''} {listed}"
        else:
            message = (
                f"Could not find the function {qualified} without parameters in the schema cache"
            )
            searched = " without parameters"
        details = (
            f"Searched for the function {qualified}{searched} or with a single unnamed json/jsonb"
            " parameter, but no matches were found in the schema cache."
        )
        # PostgREST's hint is a fuzzy match (Data.FuzzySet); difflib stands in for it.
        hint: str | None = None
        if named:
            signatures = [f"({', '.join(sorted(n for n, _ in r.params))})" for r in named]
            wanted = f"({listed})"
            best = difflib.get_close_matches(wanted, signatures, n=1, cutoff=0.0)[0]
            hint = f"Perhaps you meant to call the function {qualified}{best}"
        else:
            close = difflib.get_close_matches(function, [r.name for r in every], n=1, cutoff=0.75)
            if close:
                hint = f"Perhaps you meant to call the function {EXPOSED_SCHEMA}.{close[0]}"
        return _pgrst_error(404, "PGRST202", message, details, hint)

    @staticmethod
    def _ambiguous(matching: list[Routine]) -> httpx.Response:
        candidates = ", ".join(
            f"{EXPOSED_SCHEMA}.{r.name}({', '.join(f'{n} => {t}' for n, t in r.params)})"
            for r in matching
        )
        return _pgrst_error(
            300,
            "PGRST203",
            f"Could not choose the best candidate function between: {candidates}",
            hint="Try renaming the parameters or the function itself in the database so function"
            " overloading can be resolved",
        )

    @staticmethod
    def _sql_error(exc: psycopg.Error, *, authed: bool) -> httpx.Response:
        if exc.sqlstate is None:  # the connection broke
            return _pgrst_error(503, "PGRST001", "Database client error. Retrying the connection.")
        message = exc.diag.message_primary or str(exc)
        status = pg_error_status(exc.sqlstate, message, authed=authed)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return _pgrst_error(
            status, exc.sqlstate, message, exc.diag.message_detail, exc.diag.message_hint, headers
        )


@asynccontextmanager
async def emulate_supabase(
    dsn: str, base_url: str = SUPABASE_URL
) -> AsyncIterator[tuple[PostgrestEmulator, respx.MockRouter]]:
    """Route ``{base_url}/rest/v1/rpc/*`` into the database at ``dsn`` for the duration.

    Any other request through httpx fails (respx's ``assert_all_mocked``): nothing leaves the
    machine. Add routes to the yielded router to script other answers (errors, outages).
    """
    emulator = PostgrestEmulator(dsn)
    await emulator.open()
    try:
        async with respx.mock(assert_all_called=False) as router:
            emulator.mount(router, base_url)
            yield emulator, router
    finally:
        await emulator.close()
