"""``StateAPI`` over Supabase's REST endpoint (PostgREST), through supabase-py's async client.

The Modal workers use this: they hold the service-role key (Modal secret ``enrichment-supabase``),
not a database password. Every method is one ``rpc()`` to the same SQL function
``shared.pg_state.PgStateAPI`` calls, with the same arguments by name (PostgREST matches a function
by its argument names), so both implementations pass the same contract tests.

Errors are mapped like ``shared.pg_state.translate_db_error``, by the SQLSTATE PostgREST forwards
in ``code``: the HTTP status alone would mislead (PostgREST answers ``P0002``, our "batch not
found", with a 500). Only answers without a SQLSTATE are judged by their status: the gateway's or
PostgREST's own 5xx, 429 and connection errors are ``DatabaseUnavailable`` (retryable), a refused
key is a ``ConfigurationError``.

The key is a ``SecretStr`` and never reaches a log, a repr or an exception message: HTTP/2 is off
because ``hpack`` logs every header it encodes at DEBUG level (``apikey`` included), and every
message built here is redacted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import httpx
import psycopg
from postgrest import APIError
from pydantic import SecretStr, TypeAdapter
from supabase import AsyncClient, AsyncClientOptions, AsyncSupabaseException, acreate_client

from shared.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    EnrichError,
    InvalidInput,
    NotFound,
)
from shared.pg_state import (
    ROLLBACK_RERUNS,
    ROLLBACK_SQLSTATES,
    budget_from_json,
    deferral_json,
    progress_from_json,
    rollback_pause,
)
from shared.settings import require_https
from shared.state_api import (
    BatchProgress,
    BudgetState,
    ClaimedTask,
    FailOutcome,
    Outcome,
    StartedTask,
    StepDeferral,
    StepFailure,
    StepResult,
    StepSubmission,
    SweptRow,
    TaskCost,
    TaskOutcome,
    TaskRef,
)

T = TypeVar("T")
Row = Mapping[str, Any]

DEFAULT_TIMEOUT = 60.0
# PostgREST's own "the database is unreachable" answers (503/504).
_UNAVAILABLE_CODES = frozenset({"PGRST000", "PGRST001", "PGRST002", "PGRST003"})
_DATETIME: TypeAdapter[datetime] = TypeAdapter(datetime)

# The HTTP status of the last response seen in this task. postgrest-py's APIError does not carry
# it, and an answer without a SQLSTATE (a gateway error page, Kong's JSON) needs it to be judged.
# httpx awaits response hooks in the caller's context, and every asyncio task has its own copy.
_last_status: ContextVar[int | None] = ContextVar("enrich_supabase_last_status", default=None)


async def _record_status(response: httpx.Response) -> None:
    _last_status.set(response.status_code)


async def _refuse_redirect(response: httpx.Response) -> None:
    """A 30x is an error, never followed: httpx drops ``Authorization`` on a redirect to another
    origin but forwards every other header, so ``apikey`` (the service-role key itself) would
    reach whatever host the ``Location`` names (httpx ``_redirect_headers``). PostgREST and the
    Supabase gateway answer RPCs directly; a redirect means a wrong SUPABASE_URL or a proxy."""
    if response.is_redirect:
        target = httpx.URL(response.headers.get("location", ""))
        where = f" to {target.scheme}://{target.host}" if target.host else ""
        raise ConfigurationError(
            f"Supabase answered HTTP {response.status_code} redirecting{where}: redirects are "
            "not followed, the service-role key would travel with them (is SUPABASE_URL the "
            "project's own https://<ref>.supabase.co URL?)"
        )


def _is_sqlstate(code: str) -> bool:
    return len(code) == 5 and all(c.isdigit() or "A" <= c <= "Z" for c in code)


def error_for_sqlstate(sqlstate: str, message: str) -> EnrichError:
    """The error ``translate_db_error`` gives for ``sqlstate`` (psycopg's SQLSTATE classes)."""
    try:
        kind: type[psycopg.Error] | None = psycopg.errors.lookup(sqlstate)
    except KeyError:
        kind = None
    if sqlstate == "22023" or (kind is not None and issubclass(kind, psycopg.DataError)):
        return InvalidInput(message)
    if sqlstate == "P0002":
        return NotFound(message)
    if sqlstate == "42501":
        # Over REST: a key of another role, or a table or function without the service role's grant.
        return ConfigurationError(
            f"{message} (is SUPABASE_SERVICE_ROLE_KEY the service-role key, and does service_role"
            " hold the grant?)"
        )
    if kind is not None and issubclass(kind, psycopg.OperationalError):
        return DatabaseUnavailable(message)
    return EnrichError(message)


def translate_api_error(exc: APIError, status: int | None = None) -> EnrichError:
    """Map a PostgREST error (``code``, ``message``, ``hint``) and its HTTP status to our errors."""
    code = exc.code or ""
    message = exc.message or (f"HTTP {status}" if status else "no message")
    if exc.hint:
        message = f"{message} ({exc.hint})"
    if code in _UNAVAILABLE_CODES:
        return DatabaseUnavailable(message)
    if code.startswith("PGRST3"):  # the JWT was refused
        return ConfigurationError(f"Supabase refused the service-role key: {message}")
    if code == "PGRST202":
        return EnrichError(
            f"{message} [{code}]: are supabase/migrations applied to this project, and PostgREST's"
            " schema cache reloaded?"
        )
    if code.startswith("PGRST"):
        return EnrichError(f"{message} [{code}]")
    if _is_sqlstate(code):
        return error_for_sqlstate(code, message)
    if status is None and code.isdigit():
        # postgrest-py puts the HTTP status in `code` when the body is not PostgREST's JSON.
        status = int(code)
    if status is not None and (status >= 500 or status in (408, 429)):
        return DatabaseUnavailable(f"Supabase answered HTTP {status}: {message}")
    if status in (401, 403):
        return ConfigurationError(f"Supabase refused the service-role key: {message}")
    return EnrichError(message)


def _task(row: Row) -> TaskRef:
    return TaskRef(
        UUID(str(row["batch_id"])),
        UUID(str(row["item_id"])),
        str(row["step_name"]),
        int(row["attempt"]),
    )


def _uuid_list(values: Sequence[UUID] | None) -> list[str] | None:
    return None if values is None else [str(v) for v in values]


class SupabaseStateAPI:
    """The State API over Supabase's REST endpoint: ``await SupabaseStateAPI.open(url, key)``."""

    def __init__(self, client: AsyncClient, http: httpx.AsyncClient, url: str, key: SecretStr):
        self._client = client
        self._http = http
        self._url = url
        self._key = key

    @classmethod
    async def open(
        cls,
        url: str,
        key: SecretStr,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = 8,
    ) -> SupabaseStateAPI:
        """A client of the project at ``url`` (``https://<ref>.supabase.co``; plain http only to
        this machine, the local Supabase stack), service-role ``key``. A redirect is refused.

        Nothing is sent yet: a wrong URL or key shows on the first call. supabase-py's own retries
        stay off (they only ever retry GETs, and every call here is a POST): retrying is the
        caller's decision, on ``RetryableError``.
        """
        require_https(url, "SUPABASE_URL")
        # Our own httpx client (supabase-py then ignores postgrest_client_timeout): it carries the
        # timeout, the status hook, HTTP/1.1, and no redirects (see _refuse_redirect).
        http = httpx.AsyncClient(
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
            follow_redirects=False,
            http2=False,
            event_hooks={"response": [_refuse_redirect, _record_status]},
        )
        options = AsyncClientOptions(
            httpx_client=http,
            postgrest_client_retry=False,
            auto_refresh_token=False,
            persist_session=False,
        )
        try:
            client = await acreate_client(url, key.get_secret_value(), options)
        except AsyncSupabaseException as exc:
            await http.aclose()
            raise ConfigurationError(f"cannot use Supabase at {url!r}: {exc.message}") from None
        return cls(client, http, url, key)

    def __repr__(self) -> str:
        return f"SupabaseStateAPI(url={self._url!r})"

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> SupabaseStateAPI:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _redact(self, text: str) -> str:
        secret = self._key.get_secret_value()
        return text.replace(secret, "***") if secret else text

    async def _call(self, function: str, params: Mapping[str, Any]) -> Any:
        """POST /rest/v1/rpc/<function> with ``params``; returns PostgREST's JSON answer."""
        try:
            # Values json cannot encode (UUIDs, datetimes in step results) become text, as in
            # PgStateAPI; NaN and infinities are refused, as PostgreSQL's json parser does.
            body: dict[str, Any] = json.loads(json.dumps(params, default=str, allow_nan=False))
        except ValueError as exc:
            raise InvalidInput(f"{function}: arguments are not valid JSON: {exc}") from None
        for rerun in range(ROLLBACK_RERUNS + 1):
            try:
                return await self._post(function, body)
            except APIError as exc:  # rolled back (a deadlock): it changed nothing, run it again
                if rerun == ROLLBACK_RERUNS:
                    error = translate_api_error(exc)
                    raise type(error)(self._redact(str(error))) from exc
                await rollback_pause(rerun)
        raise AssertionError("unreachable")

    async def _post(self, function: str, body: dict[str, Any]) -> Any:
        """One RPC call; raises APIError only for a rolled-back transaction."""
        token = _last_status.set(None)
        try:
            response = await self._client.rpc(function, body).execute()
        except APIError as exc:
            if exc.code in ROLLBACK_SQLSTATES:
                raise
            error = translate_api_error(exc, _last_status.get())
            raise type(error)(self._redact(str(error))) from exc
        except httpx.RequestError as exc:
            detail = self._redact(str(exc)) or type(exc).__name__
            raise DatabaseUnavailable(
                f"Supabase did not answer {function} ({type(exc).__name__}): {detail}"
            ) from exc
        finally:
            _last_status.reset(token)
        data: Any = response.data
        return data

    async def _rows(self, function: str, params: Mapping[str, Any]) -> list[Row]:
        data = await self._call(function, params)
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise EnrichError(
                f"{function}: expected a JSON array of rows, got {type(data).__name__}"
            )
        return data

    async def _each(
        self, function: str, params: Mapping[str, Any], build: Callable[[Row], T]
    ) -> list[T]:
        return [build(row) for row in await self._rows(function, params)]

    async def _integer(self, function: str, params: Mapping[str, Any]) -> int:
        data = await self._call(function, params)
        if not isinstance(data, int) or isinstance(data, bool):
            raise EnrichError(f"{function}: expected an integer, got {type(data).__name__}")
        return data

    async def create_batch(
        self,
        blueprint: Sequence[str],
        items: Sequence[Mapping[str, Any]],
        *,
        client_id: UUID | None = None,
        name: str | None = None,
        budget_usd: float | None = None,
        use_cache: bool = True,
    ) -> UUID:
        batch_id = await self._call(
            "create_batch",
            {
                "p_blueprint": list(blueprint),
                "p_items": list(items),
                "p_client_id": None if client_id is None else str(client_id),
                "p_name": name,
                "p_budget_usd": budget_usd,
                "p_use_cache": use_cache,
            },
        )
        return UUID(str(batch_id))

    async def claim(
        self,
        limit: int,
        *,
        step_names: Sequence[str] | None = None,
        batch_ids: Sequence[UUID] | None = None,
        owner: str | None = None,
    ) -> list[ClaimedTask]:
        params = {
            "p_limit": limit,
            "p_step_names": None if step_names is None else list(step_names),
            "p_batch_ids": _uuid_list(batch_ids),
            "p_owner": owner,
        }
        return await self._each(
            "claim_steps",
            params,
            lambda r: ClaimedTask(
                _task(r),
                str(r["modal_function_name"]),
                str(r["step_type"]),
                _DATETIME.validate_python(r["lease_expires_at"]),
            ),
        )

    async def start(self, tasks: Sequence[TaskRef]) -> list[StartedTask]:
        return await self._each(
            "start_steps",
            {"p_tasks": [t.to_json() for t in tasks]},
            lambda r: StartedTask(
                _task(r), Outcome(r["outcome"]), r["raw_data"], r["config"], r.get("inputs")
            ),
        )

    async def complete(self, results: Sequence[StepResult]) -> list[TaskOutcome]:
        payload = [{**r.task.to_json(), "result": dict(r.result)} for r in results]
        return await self._each(
            "complete_steps",
            {"p_results": payload},
            lambda r: TaskOutcome(_task(r), Outcome(r["outcome"])),
        )

    async def fail(self, failures: Sequence[StepFailure]) -> list[FailOutcome]:
        payload = [
            {**f.task.to_json(), "error": f.error, "retryable": f.retryable} for f in failures
        ]
        return await self._each(
            "fail_steps",
            {"p_failures": payload},
            lambda r: FailOutcome(_task(r), Outcome(r["outcome"]), r["status"]),
        )

    async def defer(self, deferrals: Sequence[StepDeferral]) -> list[FailOutcome]:
        return await self._each(
            "defer_steps",
            {"p_deferrals": [deferral_json(d) for d in deferrals]},
            lambda r: FailOutcome(_task(r), Outcome(r["outcome"]), r["status"]),
        )

    async def record_costs(self, costs: Sequence[TaskCost]) -> int:
        if not costs:
            return 0
        rows = await self._rows("record_costs", {"p_costs": [c.to_json() for c in costs]})
        return sum(1 for r in rows if r.get("outcome") == "ok")

    async def set_budget(self, batch_id: UUID, budget_usd: float | None) -> BudgetState:
        data = await self._call(
            "set_batch_budget", {"p_batch_id": str(batch_id), "p_budget_usd": budget_usd}
        )
        if not isinstance(data, dict):
            raise EnrichError(
                f"set_batch_budget: expected a JSON object, got {type(data).__name__}"
            )
        return budget_from_json(data)

    async def submit(self, submissions: Sequence[StepSubmission]) -> list[TaskOutcome]:
        payload = [{**s.task.to_json(), "request_id": s.request_id} for s in submissions]
        return await self._each(
            "submit_steps",
            {"p_submissions": payload},
            lambda r: TaskOutcome(_task(r), Outcome(r["outcome"])),
        )

    async def heartbeat(self, tasks: Sequence[TaskRef]) -> list[TaskOutcome]:
        return await self._each(
            "heartbeat_steps",
            {"p_tasks": [t.to_json() for t in tasks]},
            lambda r: TaskOutcome(_task(r), Outcome(r["outcome"])),
        )

    async def release(
        self, tasks: Sequence[TaskRef], reason: str, *, delay_seconds: float = 0.0
    ) -> list[TaskOutcome]:
        payload = [{**t.to_json(), "reason": reason, "delay_seconds": delay_seconds} for t in tasks]
        return await self._each(
            "release_steps",
            {"p_tasks": payload},
            lambda r: TaskOutcome(_task(r), Outcome(r["outcome"])),
        )

    async def mark_dispatched(self, dispatches: Sequence[tuple[TaskRef, str]]) -> int:
        payload = [{**task.to_json(), "call_id": call_id} for task, call_id in dispatches]
        return await self._integer("mark_dispatched", {"p_dispatches": payload})

    async def sweep_expired_leases(self, limit: int = 10_000) -> list[SweptRow]:
        return await self._each(
            "sweep_expired_leases",
            {"p_limit": limit},
            lambda r: SweptRow(_task(r), str(r["status"])),
        )

    async def lease_owners(self, prefix: str, batch_ids: Sequence[UUID] | None = None) -> list[str]:
        rows = await self._rows(
            "lease_owners", {"p_prefix": prefix, "p_batch_ids": _uuid_list(batch_ids)}
        )
        return [str(r["lease_owner"]) for r in rows]

    async def reclaim_orphaned(
        self, owners: Sequence[str], *, batch_ids: Sequence[UUID] | None = None
    ) -> list[SweptRow]:
        return await self._each(
            "reclaim_orphaned_steps",
            {"p_owners": list(owners), "p_batch_ids": _uuid_list(batch_ids)},
            lambda r: SweptRow(_task(r), str(r["status"])),
        )

    async def retry_failed(self, batch_id: UUID, step_name: str | None = None) -> int:
        return await self._integer(
            "retry_failed", {"p_batch_id": str(batch_id), "p_step_name": step_name}
        )

    async def cancel_batch(self, batch_id: UUID) -> int:
        return await self._integer("cancel_batch", {"p_batch_id": str(batch_id)})

    async def batch_progress(self, batch_id: UUID) -> BatchProgress:
        data = await self._call("batch_progress", {"p_batch_id": str(batch_id)})
        if not isinstance(data, dict):
            raise EnrichError(f"batch_progress: expected a JSON object, got {type(data).__name__}")
        return progress_from_json(data)
