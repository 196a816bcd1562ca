"""The fault matrix of issue 11: the real ``enrich`` CLI under crashes, signals and bad handlers.

    .venv/bin/python bench/fault_matrix.py                      # the whole matrix, ~10-15 min
    .venv/bin/python bench/fault_matrix.py --trials 3 --repeat 1          # a quick look, ~4 min
    .venv/bin/python bench/fault_matrix.py --only crash,cancel --trials 5

Every scenario runs ``enrich`` (the console script next to this Python) as subprocesses against a
private embedded cluster in a temporary ``ENRICH_HOME`` (``DATABASE_URL`` unset), with the step
module ``bench.fault_steps`` loaded through ``ENRICH_STEP_MODULES``; the ``shared`` package under
test is the one of the repository holding this script (it goes first on ``PYTHONPATH``). Each
trial is a new batch of ``--items`` items (``--big-items`` for ``serve2`` and ``cancel``, which need
a batch that lasts) through two ``fault_step`` steps registered for the scenario: ``--sleep-ms``
per call, a 5 s lease (``timeout_seconds``), 3 attempts, ~0.5 s backoff. Scenarios (``--only``
takes a comma-separated subset):

``kill9`` / ``sigint`` / ``sigterm``
    The signal hits ``enrich run`` once ``--fault-at`` of the item-steps completed; then
    ``enrich run --batch ID`` resumes. ``--repeat`` trials.
``crash`` / ``restart``
    Mid-run, ``pg_ctl stop -m immediate`` + ``pg_ctl start`` (``--downtime`` s apart), or
    ``pg_ctl restart -m fast``. The run should reconnect and finish; if it exits (its exit code is
    the first one reported) or hangs (killed, reported as a hang), ``enrich run --batch`` resumes
    it. ``--trials`` trials.
``hung``
    1% of the first attempts of each step never return; the step's timeout is 3 s, so a correct
    runner cuts them off and retries them.
``slow``
    Every call takes 2.5 s of a 5 s timeout, with ``--slow-concurrency`` rows in flight so that
    claimed chunks queue up behind running ones (``--slow-items`` items).
``serve2``
    Two ``enrich serve`` and one ``enrich run --batch`` on one batch created by ``enrich batch
    create``; the serves get SIGTERM once the run is over.
``cancel``
    ``enrich cancel BATCH`` once ``--fault-at`` completed, while completions flow; after the run
    exits, a second ``enrich run --batch`` shows whether anything of the cancelled batch still runs.

Every wait has a deadline: a process still alive after ``--deadline`` s, or whose batch made no
progress for ``--stall`` s, is killed with SIGKILL and counted as a hang (then resumed once).
Leftover rows are cancelled after each trial so they never leak into the next one, and the
cluster is stopped and deleted at the end (``--keep`` keeps it and the logs).

The metrics, per trial, summed per scenario (``n/m`` = trials with a non-zero figure):

items lost
    Items of the batch that, at the end (after any resume), have not COMPLETED every step. For
    ``cancel``: items neither fully COMPLETED nor holding a row FAILED with error 'cancelled'.
run twice
    (item, step) pairs whose handler finished (returned a result) more than once, from the
    ``finish`` events of ``FAULT_LOG`` (see bench/fault_steps.py).
acks lost
    Completions that ``PgStateAPI.complete`` answered ``ok`` (``FAULT_ACK_LOG``) whose row is not,
    at the end, COMPLETED with that same attempt.
stuck
    Rows of the batch still PENDING, QUEUED or IN_PROGRESS at the end of the trial.
failed
    Rows FAILED with another error than 'cancelled' (no step here ever fails by itself).
hangs
    Processes killed because they outlived their deadline or stalled.
exits
    Exit codes per role: ``run`` (the first ``enrich run``), ``resume`` (``enrich run --batch``),
    ``rerun`` (the run after a cancel), ``serve``, ``cancel``, ``create``; -9 = killed by us.
hint
    Runs that exited non-zero by themselves (not SIGKILLed, not hung) and printed their resume
    command ``enrich run --batch <id>``, out of all such runs.
tb
    Python tracebacks printed on stderr by any process of the scenario.
notes
    Scenario extras: ``hangs_injected``/``cut_off`` (hung), ``escaped`` (rows active after the
    cancelled run exited), ``acked_after_cancel`` (completions whose call began after ``enrich
    cancel`` returned and were still answered ok), ``completed_after_cancel`` (rows COMPLETED by a
    transaction that began after the cancel's: ``finished_at > batches.cancelled_at``);
    ``too_fast`` when a run finished before the fault hit.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.db.embedded import EmbeddedPostgres  # noqa: E402

ENRICH = Path(sys.executable).parent / "enrich"
ACTIVE = ("PENDING", "QUEUED", "IN_PROGRESS")
SIGNALS = {"kill9": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}
COMMAND_TIMEOUT = 60.0  # enrich db up / batch create / cancel, pg_ctl
STOP_TIMEOUT = 45.0  # from SIGINT / SIGTERM to exit
POLL = 0.1
TRACEBACK = "Traceback (most recent call last)"


# Processes ---------------------------------------------------------------------------------------


@dataclass
class Proc:
    """One ``enrich`` subprocess: its role in the trial, output files and how it ended."""

    role: str
    popen: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    started: float
    ended: float | None = None
    hung: str | None = None  # why we killed it: 'deadline' or 'stalled'

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def output(self) -> str:
        text = ""
        for path in (self.err_path, self.out_path):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return text

    def last_line(self) -> str:
        """The last line on stderr: what a failed command said."""
        text = ""
        with contextlib.suppress(OSError):
            text = self.err_path.read_text(errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1][:200] if lines else ""

    def exit_label(self) -> str:
        if self.hung:
            return "hang"
        return "?" if self.returncode is None else str(self.returncode)

    def kill(self, hang: str | None = None) -> None:
        """SIGKILL and reap; ``hang`` says why, when that makes it a hang."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
            self.hung = hang
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self.ended = self.ended or time.monotonic()


def wait(proc: Proc, timeout: float) -> Proc:
    """Wait for ``proc`` at most ``timeout`` seconds; past that it is killed as a hang."""
    try:
        proc.popen.wait(timeout=timeout)
        proc.ended = time.monotonic()
    except subprocess.TimeoutExpired:
        proc.kill("deadline")
    return proc


# The cluster -------------------------------------------------------------------------------------


class Cluster:
    """The private cluster of a temporary ENRICH_HOME, and the faults we inflict on it."""

    def __init__(self, home: Path) -> None:
        self.embedded = EmbeddedPostgres(home)
        self.data_dir = self.embedded.data_dir
        self.dsn = self.embedded.dsn

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``pg_ctl ARGS -D data`` as the cluster's owner (``postgres`` when we are root)."""
        cmd = [str(self.embedded.bin_dir / "pg_ctl"), *args, "-D", str(self.data_dir)]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        try:
            return subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
                cwd=self.embedded.cluster_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(cmd, -9, "", f"timed out: {exc}")

    def start(self) -> subprocess.CompletedProcess[str]:
        log = str(self.embedded.log_file)
        return self.pg_ctl("start", "-w", "-t", str(int(COMMAND_TIMEOUT)), "-l", log)

    def running(self) -> bool:
        return self.pg_ctl("status").returncode == 0

    def crash(self, downtime: float) -> list[str]:
        """Immediate shutdown (a crash: no checkpoint, unflushed WAL is lost), then start."""
        problems = self._checked("stop -m immediate", self.pg_ctl("stop", "-m", "immediate", "-w"))
        time.sleep(downtime)
        return problems + self._checked("start", self.start())

    def restart(self) -> list[str]:
        """``pg_ctl restart -m fast``: what a managed database's maintenance restart looks like."""
        log = str(self.embedded.log_file)
        return self._checked(
            "restart -m fast", self.pg_ctl("restart", "-m", "fast", "-w", "-l", log)
        )

    def ensure_running(self) -> list[str]:
        return [] if self.running() else self._checked("start", self.start())

    @staticmethod
    def _checked(what: str, result: subprocess.CompletedProcess[str]) -> list[str]:
        if result.returncode == 0:
            return []
        return [f"pg_ctl {what} exited {result.returncode}: {result.stderr.strip()[:200]}"]


# The lab: one temporary ENRICH_HOME, its cluster, and helpers ------------------------------------


@dataclass
class Options:
    trials: int
    repeat: int
    items: int
    big_items: int
    slow_items: int
    sleep_ms: int
    concurrency: int
    slow_concurrency: int
    fault_at: float
    downtime: float
    deadline: float
    stall: float
    only: list[str]
    keep: bool


class Lab:
    def __init__(self, opts: Options, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.home = workdir / "home"
        self.home.mkdir(parents=True)
        for d in (workdir, self.home):  # the postgres OS user must traverse them when we are root
            d.chmod(0o755)
        self.cluster = Cluster(self.home)
        self.children: list[Proc] = []

    # environment and processes

    def env(self, trial_dir: Path) -> dict[str, str]:
        drop = ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "ENRICH_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        python_path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env.update(
            ENRICH_HOME=str(self.home),
            ENRICH_STEP_MODULES="bench.fault_steps",
            PYTHONPATH=os.pathsep.join(python_path),
            FAULT_LOG=str(trial_dir / "events.log"),
            FAULT_ACK_LOG=str(trial_dir / "acks.log"),
            COLUMNS="250",
            TERM="dumb",
        )
        return env

    def spawn(self, trial_dir: Path, role: str, *args: str) -> Proc:
        n = sum(1 for p in trial_dir.glob(f"{role}*.err"))
        stem = trial_dir / f"{role}{n or ''}"
        out_path, err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with out_path.open("wb") as out, err_path.open("wb") as err:
            popen = subprocess.Popen(
                [str(ENRICH), *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=trial_dir,
                env=self.env(trial_dir),
                start_new_session=True,  # our signals only, never the terminal's
            )
        proc = Proc(role, popen, out_path, err_path, time.monotonic())
        self.children.append(proc)
        return proc

    def command(self, trial_dir: Path, role: str, *args: str) -> Proc:
        return wait(self.spawn(trial_dir, role, *args), COMMAND_TIMEOUT)

    def kill_children(self) -> None:
        for proc in self.children:
            proc.kill()
        self.children.clear()

    # database

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(
            self.cluster.dsn,
            autocommit=True,
            connect_timeout=5,
            options="-c statement_timeout=20000",
        ) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def try_query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]] | None:
        """``query`` that answers None while the database is down."""
        try:
            return self.query(sql, params)
        except psycopg.Error:
            return None

    def register(self, scenario: str, overrides: dict[str, Any]) -> list[str]:
        """Two ``fault_step`` steps for the scenario; returns the blueprint."""
        config = {"sleep_ms": self.opts.sleep_ms, **BASE_CONFIG, **overrides}
        steps = [f"fm_{scenario}_a", f"fm_{scenario}_b"]
        for step in steps:
            self.query(
                """insert into public.enrichment_registry
                     (step_name, type, modal_function_name, results_table, config, description)
                   values (%s, 'SYNC', 'fault_step', null, %s, 'bench/fault_matrix.py')
                   on conflict (step_name) do update set config = excluded.config""",
                (step, Jsonb(config)),
            )
        return steps

    def csv_file(self, items: int) -> Path:
        path = self.workdir / f"items_{items}.csv"
        if not path.exists():
            with path.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["name", "website"])
                writer.writerows([f"Company {i}", f"company{i}.example"] for i in range(items))
        return path

    def batch_by_name(self, name: str) -> str | None:
        rows = self.try_query("select id::text from public.batches where name = %s", (name,))
        return rows[0][0] if rows else None

    def progress(self, batch_id: str) -> tuple[int, int] | None:
        """(COMPLETED rows, FAILED rows) of the batch, None while the database is down."""
        rows = self.try_query(
            """select count(*) filter (where status = 'COMPLETED'),
                      count(*) filter (where status = 'FAILED')
               from public.workflow_states where batch_id = %s""",
            (batch_id,),
        )
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    def cancel_leftovers(self) -> None:
        """Cancel every batch with unfinished rows, so a later ``enrich serve`` never runs them."""
        self.try_query(
            """select public.cancel_batch(b.id) from public.batches b
               where exists (select 1 from public.workflow_states ws
                             where ws.batch_id = b.id and ws.status::text = any(%s))""",
            (list(ACTIVE),),
        )


# Waiting on runs ---------------------------------------------------------------------------------


def wait_run(lab: Lab, proc: Proc, batch_id: str | None, deadline: float | None = None) -> Proc:
    """Wait for an ``enrich run``/``serve`` to exit; kill it as a hang past the deadline or when
    its batch made no progress for ``--stall`` seconds."""
    limit = deadline or lab.opts.deadline
    start = last_change = time.monotonic()
    last: tuple[int, int] | None = None
    next_check = start
    while proc.popen.poll() is None:
        now = time.monotonic()
        if batch_id is not None and now >= next_check:
            counts = lab.progress(batch_id)
            if counts is not None and counts != last:
                last, last_change = counts, now
            next_check = now + 1.0
        if now - start > limit:
            proc.kill("deadline")
            return proc
        if batch_id is not None and now - last_change > lab.opts.stall:
            proc.kill("stalled")
            return proc
        time.sleep(POLL)
    proc.ended = time.monotonic()
    return proc


def wait_for_batch(lab: Lab, proc: Proc, name: str) -> str | None:
    """The id of the batch ``proc`` is importing, once it exists (None if it never does)."""
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while time.monotonic() < deadline:
        batch_id = lab.batch_by_name(name)
        if batch_id is not None or proc.popen.poll() is not None:
            return batch_id or lab.batch_by_name(name)
        time.sleep(POLL)
    return None


def wait_progress(lab: Lab, proc: Proc, batch_id: str, total: int) -> str | None:
    """Until ``--fault-at`` of the batch's item-steps completed; None then, else why not."""
    target = max(1, int(total * lab.opts.fault_at))
    deadline = time.monotonic() + lab.opts.deadline
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            return f"the run exited {proc.popen.returncode} before the fault"
        counts = lab.progress(batch_id)
        if counts is not None and counts[0] >= target:
            return "too_fast" if counts[0] >= total else None
        time.sleep(POLL / 2)
    return "no progress before the fault"


# Measuring ---------------------------------------------------------------------------------------


@dataclass
class Metrics:
    items_lost: int = 0
    run_twice: int = 0
    acks_lost: int = 0
    stuck: int = 0
    failed: int = 0


def read_log(path: Path) -> list[list[str]]:
    try:
        return [line.split("\t") for line in path.read_text().splitlines() if line]
    except OSError:
        return []


def load_rows(lab: Lab, batch_id: str) -> dict[tuple[str, str], tuple[str, int, str | None]]:
    """(item, step) -> (status, attempt, meta.error) for every row of the batch."""
    rows = lab.query(
        """select item_id::text, step_name, status::text, attempt, meta ->> 'error'
           from public.workflow_states where batch_id = %s""",
        (batch_id,),
    )
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


def items_lost(lab: Lab, batch_id: str, rows: dict[Any, Any], cancelled: bool) -> int:
    items = [
        r[0]
        for r in lab.query(
            "select id::text from public.batch_items where batch_id = %s", (batch_id,)
        )
    ]
    blueprint = lab.query("select blueprint from public.batches where id = %s", (batch_id,))[0][0]
    lost = 0
    for item in items:
        states = [rows.get((item, step)) for step in blueprint]
        done = all(s is not None and s[0] == "COMPLETED" for s in states)
        was_cancelled = any(
            s is not None and s[0] == "FAILED" and s[2] == "cancelled" for s in states
        )
        lost += not (done or (cancelled and was_cancelled))
    return lost


def measure(lab: Lab, batch_id: str, trial_dir: Path, *, cancelled: bool = False) -> Metrics:
    rows = load_rows(lab, batch_id)
    finishes = Counter(
        (e[1], e[2])
        for e in read_log(trial_dir / "events.log")
        if e[0] == "finish" and (e[1], e[2]) in rows
    )
    acks = {
        (a[1], a[2], int(a[3])) for a in read_log(trial_dir / "acks.log") if (a[1], a[2]) in rows
    }
    return Metrics(
        items_lost=items_lost(lab, batch_id, rows, cancelled),
        run_twice=sum(1 for n in finishes.values() if n > 1),
        acks_lost=sum(
            1 for item, step, attempt in acks if rows[(item, step)][:2] != ("COMPLETED", attempt)
        ),
        stuck=sum(1 for status, _, _ in rows.values() if status in ACTIVE),
        failed=sum(
            1 for status, _, error in rows.values() if status == "FAILED" and error != "cancelled"
        ),
    )


def code_under_test(trial_dir: Path) -> set[str]:
    """The ``shared`` package directories the step module reported from inside ``enrich``."""
    return {e[6] for e in read_log(trial_dir / "events.log") if e[0] == "load" and len(e) > 6}


# Trials ------------------------------------------------------------------------------------------


@dataclass
class Trial:
    scenario: str
    index: int
    dir: Path
    items: int
    concurrency: int
    batch_id: str | None = None
    procs: list[Proc] = field(default_factory=list)
    metrics: Metrics | None = None
    notes: list[str] = field(default_factory=list)
    extra: Counter[str] = field(default_factory=Counter)  # scenario-specific counts
    seconds: float = 0.0

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def exits(self) -> list[tuple[str, str]]:
        return [(p.role, p.exit_label()) for p in self.procs]

    def hangs(self) -> int:
        return sum(1 for p in self.procs if p.hung)

    def hints(self) -> tuple[int, int]:
        """(runs that printed their resume command, runs that had to): see the module doc."""
        needed = printed = 0
        for p in self.procs:
            code = p.returncode
            if p.role in ("run", "resume", "rerun") and not p.hung and code not in (0, -9, None):
                needed += 1
                pattern = rf"enrich run\s+--batch\s+{re.escape(self.batch_id or '?')}"
                printed += re.search(pattern, p.output()) is not None
        return printed, needed

    def tracebacks(self) -> int:
        return sum(p.output().count(TRACEBACK) for p in self.procs)

    def errors(self) -> Counter[str]:
        """The exception lines of the tracebacks (what went wrong, in one line each)."""
        found: Counter[str] = Counter()
        for p in self.procs:
            found.update(f"{p.role}: {line[:160]}" for line in exception_lines(p.output()))
        return found


def exception_lines(text: str) -> Iterator[str]:
    """The ``SomeError: message`` line ending each traceback in ``text``."""
    in_traceback = False
    for line in text.splitlines():
        if line.startswith(TRACEBACK):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            in_traceback = False
            yield line


def needs_resume(proc: Proc) -> bool:
    return bool(proc.hung) or proc.returncode not in (0, 3)


def resume(lab: Lab, trial: Trial) -> None:
    assert trial.batch_id is not None
    proc = trial.add(lab.spawn(trial.dir, "resume", "run", "--batch", trial.batch_id))
    wait_run(lab, proc, trial.batch_id)


def start_run(lab: Lab, trial: Trial, steps: list[str]) -> Proc:
    """``enrich run FILE.csv --steps ...`` on a new batch named after the trial."""
    name = f"{trial.scenario}-{trial.index}"
    csv_path = str(lab.csv_file(trial.items))
    proc = trial.add(
        lab.spawn(
            trial.dir, "run", "run", csv_path, "--steps", ",".join(steps), "--name", name,
            "--concurrency", str(trial.concurrency),
        )
    )  # fmt: skip
    trial.batch_id = wait_for_batch(lab, proc, name)
    if trial.batch_id is None:
        trial.notes.append("the batch was never created")
    return proc


def run_to_fault(lab: Lab, trial: Trial, steps: list[str]) -> Proc | None:
    """Start ``enrich run``; return it once ``--fault-at`` completed (None: no fault possible)."""
    proc = start_run(lab, trial, steps)
    if trial.batch_id is None:
        return None
    missed = wait_progress(lab, proc, trial.batch_id, trial.items * len(steps))
    if missed is not None:
        trial.notes.append(missed)
        wait_run(lab, proc, trial.batch_id)
        return None
    return proc


def signal_trial(lab: Lab, trial: Trial, steps: list[str]) -> None:
    proc = run_to_fault(lab, trial, steps)
    if proc is None:
        return
    os.kill(proc.popen.pid, SIGNALS[trial.scenario])
    wait(proc, STOP_TIMEOUT)
    resume(lab, trial)


def database_trial(lab: Lab, trial: Trial, steps: list[str]) -> None:
    proc = run_to_fault(lab, trial, steps)
    if proc is None:
        return
    if trial.scenario == "crash":
        trial.notes += lab.cluster.crash(lab.opts.downtime)
    else:
        trial.notes += lab.cluster.restart()
    trial.notes += lab.cluster.ensure_running()
    wait_run(lab, proc, trial.batch_id)
    if needs_resume(proc):
        resume(lab, trial)


def run_through(lab: Lab, trial: Trial, steps: list[str]) -> None:
    """One ``enrich run`` with no outside fault (the handlers are the fault); resume if needed."""
    proc = start_run(lab, trial, steps)
    wait_run(lab, proc, trial.batch_id)
    if needs_resume(proc) and trial.batch_id is not None:
        resume(lab, trial)


def hung_trial(lab: Lab, trial: Trial, steps: list[str]) -> None:
    run_through(lab, trial, steps)
    events = read_log(trial.dir / "events.log")
    hung = {(e[1], e[2], e[3]) for e in events if e[0] == "hang"}
    trial.extra.update(
        hangs_injected=len(hung),
        cut_off=sum(1 for e in events if e[0] == "cancel" and (e[1], e[2], e[3]) in hung),
    )


def serve_trial(lab: Lab, trial: Trial, steps: list[str]) -> None:
    name = f"{trial.scenario}-{trial.index}"
    csv_path = str(lab.csv_file(trial.items))
    create = trial.add(
        lab.command(trial.dir, "create", "batch", "create", csv_path, "--steps", ",".join(steps),
                    "--name", name)
    )  # fmt: skip
    trial.batch_id = lab.batch_by_name(name)
    if trial.batch_id is None or create.returncode != 0:
        trial.notes.append(
            f"enrich batch create exited {create.exit_label()}: {create.last_line()}"
        )
        return
    concurrency = str(trial.concurrency)
    serves = [
        trial.add(lab.spawn(trial.dir, "serve", "serve", "--concurrency", concurrency))
        for _ in range(2)
    ]
    run = trial.add(
        lab.spawn(trial.dir, "run", "run", "--batch", trial.batch_id, "--concurrency", concurrency)
    )
    wait_run(lab, run, trial.batch_id)
    if needs_resume(run):
        resume(lab, trial)
    for serve in serves:
        if serve.popen.poll() is None:
            os.kill(serve.popen.pid, signal.SIGTERM)
    for serve in serves:
        wait(serve, STOP_TIMEOUT)


def count_rows(lab: Lab, batch_id: str, condition: str, params: Sequence[Any] = ()) -> int:
    """Rows of the batch matching ``condition`` (-1 when the database cannot be reached)."""
    rows = lab.try_query(
        f"select count(*) from public.workflow_states where batch_id = %s and ({condition})",
        (batch_id, *params),
    )
    return int(rows[0][0]) if rows else -1


def cancel_trial(lab: Lab, trial: Trial, steps: list[str]) -> None:
    proc = run_to_fault(lab, trial, steps)
    if proc is None:
        return
    batch_id = trial.batch_id
    assert batch_id is not None
    cancel = trial.add(lab.command(trial.dir, "cancel", "cancel", batch_id))
    cancel_done = time.time()
    if cancel.returncode != 0:
        trial.notes.append(f"enrich cancel exited {cancel.exit_label()}: {cancel.last_line()}")
    wait_run(lab, proc, batch_id)
    trial.extra["escaped"] = count_rows(lab, batch_id, "status::text = any(%s)", [list(ACTIVE)])
    rerun = trial.add(lab.spawn(trial.dir, "rerun", "run", "--batch", batch_id))
    wait_run(lab, rerun, batch_id)
    if cancel.returncode != 0:
        return  # nothing was cancelled: the after-cancel counts would mean nothing
    acks = read_log(trial.dir / "acks.log")
    trial.extra["acked_after_cancel"] = sum(1 for a in acks if float(a[5]) > cancel_done)
    # finished_at is the start of the completing transaction, cancelled_at that of the cancel's.
    trial.extra["completed_after_cancel"] = count_rows(
        lab,
        batch_id,
        """status = 'COMPLETED' and finished_at > (select cancelled_at from public.batches
                                                   where id = %s)""",
        [batch_id],
    )


Count = Callable[[Options], int]


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Lab, Trial, list[str]], None]
    trials: Count
    items: Count = lambda o: o.items
    concurrency: Count = lambda o: o.concurrency
    config: dict[str, Any] = field(default_factory=dict)  # over BASE_CONFIG


# Every step: --sleep-ms per call, a 5 s lease, 3 attempts, retried after ~0.5 s.
BASE_CONFIG = {"timeout_seconds": 5, "max_attempts": 3, "backoff_seconds": 0.5}


def _repeat(o: Options) -> int:
    return o.repeat


def _once(o: Options) -> int:
    return 1


SCENARIOS = [
    Scenario("kill9", signal_trial, _repeat),
    Scenario("sigint", signal_trial, _repeat),
    Scenario("sigterm", signal_trial, _repeat),
    Scenario("crash", database_trial, lambda o: o.trials),
    Scenario("restart", database_trial, lambda o: o.trials),
    Scenario("hung", hung_trial, _once,
             config={"timeout_seconds": 3, "hang_ratio": 0.01}),
    Scenario("slow", run_through, _once, items=lambda o: o.slow_items,
             concurrency=lambda o: o.slow_concurrency,
             config={"sleep_ms": 2500, "timeout_seconds": 5}),
    Scenario("serve2", serve_trial, _once, items=lambda o: o.big_items),
    Scenario("cancel", cancel_trial, _repeat, items=lambda o: o.big_items),
]  # fmt: skip


def run_trial(lab: Lab, scenario: Scenario, steps: list[str], index: int) -> Trial:
    trial = Trial(
        scenario.name,
        index,
        lab.workdir / f"{scenario.name}-{index}",
        items=scenario.items(lab.opts),
        concurrency=scenario.concurrency(lab.opts),
    )
    trial.dir.mkdir()
    started = time.monotonic()
    try:
        scenario.run(lab, trial, steps)
    finally:
        lab.kill_children()
    trial.notes += lab.cluster.ensure_running()
    if trial.batch_id is not None:
        trial.metrics = measure(lab, trial.batch_id, trial.dir, cancelled=scenario.name == "cancel")
        completed = lab.progress(trial.batch_id)
        if completed and completed[0] and not read_log(trial.dir / "acks.log"):
            trial.notes.append("FAULT_ACK_LOG is empty: the probe missed PgStateAPI.complete")
    lab.cancel_leftovers()
    trial.seconds = time.monotonic() - started
    return trial


# Reporting ---------------------------------------------------------------------------------------


def trial_line(t: Trial) -> str:
    m = t.metrics or Metrics()
    printed, needed = t.hints()
    exits = " ".join(
        f"{role}={code}({p.seconds:.0f}s)"
        for (role, code), p in zip(t.exits(), t.procs, strict=True)
    )
    extra = " ".join(f"{k}={v}" for k, v in t.extra.items())
    line = (
        f"{t.scenario:8} #{t.index:<2} lost={m.items_lost} twice={m.run_twice} "
        f"acks_lost={m.acks_lost} stuck={m.stuck} failed={m.failed} hangs={t.hangs()} "
        f"hint={printed}/{needed} tb={t.tracebacks()} {t.seconds:.0f}s | {exits}"
    )
    for part in (extra, "; ".join(t.notes)):
        if part:
            line += f" | {part}"
    for error, n in t.errors().most_common(3):
        line += f"\n{'':12}{n}x {error}"
    return line


def total(trials: Sequence[Trial], value: Callable[[Trial], int]) -> str:
    values = [value(t) for t in trials]
    hit = sum(1 for v in values if v)
    return f"{sum(values)} ({hit}/{len(values)})" if hit else "0"


def exits_summary(trials: Sequence[Trial]) -> str:
    per_role: dict[str, Counter[str]] = {}
    for t in trials:
        for role, code in t.exits():
            per_role.setdefault(role, Counter())[code] += 1
    return "; ".join(
        f"{role} " + ",".join(f"{code}x{n}" for code, n in counts.most_common())
        for role, counts in per_role.items()
    )


def summary_row(name: str, trials: Sequence[Trial]) -> list[str]:
    def metric(attr: str) -> Callable[[Trial], int]:
        return lambda t: getattr(t.metrics, attr) if t.metrics else 0

    printed = sum(t.hints()[0] for t in trials)
    needed = sum(t.hints()[1] for t in trials)
    extras: Counter[str] = Counter()
    for t in trials:
        extras.update(t.extra)
    notes = Counter(n for t in trials for n in t.notes)
    return [
        name,
        str(len(trials)),
        total(trials, metric("items_lost")),
        total(trials, metric("run_twice")),
        total(trials, metric("acks_lost")),
        total(trials, metric("stuck")),
        total(trials, metric("failed")),
        total(trials, Trial.hangs),
        exits_summary(trials),
        f"{printed}/{needed}",
        total(trials, Trial.tracebacks),
        f"{sum(t.seconds for t in trials):.0f}s",
        " ".join(
            [*(f"{k}={v}" for k, v in extras.items()), *(f"{n[:60]}x{c}" for n, c in notes.items())]
        ),
    ]


HEADER = [
    "scenario",
    "trials",
    "items lost",
    "run twice",
    "acks lost",
    "stuck",
    "failed",
    "hangs",
    "exits",
    "hint",
    "tb",
    "time",
    "notes",
]


def print_table(rows: Sequence[Sequence[str]]) -> None:
    table = [HEADER, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


# Main --------------------------------------------------------------------------------------------


def parse_options(argv: Sequence[str] | None = None) -> Options:
    names = [s.name for s in SCENARIOS]
    p = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios: " + ", ".join(names) + ". See the module docstring for the metrics.",
    )
    p.add_argument("--trials", type=int, default=10, help="trials of crash and restart")
    p.add_argument("--repeat", type=int, default=3, help="trials of kill9, sigint, sigterm, cancel")
    p.add_argument("--items", type=int, default=5000, help="items per batch (2 steps each)")
    p.add_argument(
        "--big-items", type=int, default=20000, help="items per batch of serve2 and cancel"
    )
    p.add_argument("--slow-items", type=int, default=1000, help="items per batch of slow")
    p.add_argument("--sleep-ms", type=int, default=30, help="duration of a normal step call")
    p.add_argument("--concurrency", type=int, default=200, help="enrich run/serve --concurrency")
    p.add_argument(
        "--slow-concurrency",
        type=int,
        default=1000,
        help="--concurrency of the slow scenario (enough for chunks to queue up)",
    )
    p.add_argument(
        "--fault-at",
        type=float,
        default=0.3,
        help="share of the item-steps completed when the fault hits",
    )
    p.add_argument("--downtime", type=float, default=1.0, help="seconds the crashed server is down")
    p.add_argument("--deadline", type=float, default=90.0, help="longest any one run may take")
    p.add_argument(
        "--stall",
        type=float,
        default=20.0,
        help="a run whose batch made no progress this long is a hang",
    )
    p.add_argument("--only", default="", help="comma-separated scenarios, default all")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, cluster)")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(names)}")
    return Options(
        trials=args.trials,
        repeat=args.repeat,
        items=args.items,
        big_items=args.big_items,
        slow_items=args.slow_items,
        sleep_ms=args.sleep_ms,
        concurrency=args.concurrency,
        slow_concurrency=args.slow_concurrency,
        fault_at=args.fault_at,
        downtime=args.downtime,
        deadline=args.deadline,
        stall=args.stall,
        only=only,
        keep=args.keep,
    )


def describe_code() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return f"{REPO} at {rev.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        return f"{REPO} (not a git checkout)"


@contextlib.contextmanager
def lab_session(opts: Options) -> Iterator[Lab]:
    """A temporary ENRICH_HOME with a migrated cluster; stopped and deleted afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="fm-", dir="/tmp"))
    lab = Lab(opts, workdir)
    try:
        boot = workdir / "boot"
        boot.mkdir()
        up = lab.command(boot, "db-up", "db", "up")
        if up.returncode != 0:
            raise SystemExit(f"enrich db up failed ({up.exit_label()}):\n{up.output()}")
        yield lab
    finally:
        lab.kill_children()
        down = lab.command(workdir, "db-down", "db", "down")
        if lab.cluster.running():
            print(f"enrich db down exited {down.exit_label()}: stopping with pg_ctl")
            lab.cluster.pg_ctl("stop", "-m", "immediate", "-w")
        if opts.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_options(argv)
    chosen = [s for s in SCENARIOS if not opts.only or s.name in opts.only]
    print(f"fault matrix: {describe_code()}; {os.cpu_count()} cores; {opts}", flush=True)
    started = time.monotonic()
    rows: list[list[str]] = []
    seen_code: set[str] = set()
    with lab_session(opts) as lab:
        for scenario in chosen:
            steps = lab.register(scenario.name, scenario.config)
            trials = []
            for index in range(1, scenario.trials(opts) + 1):
                trial = run_trial(lab, scenario, steps, index)
                seen_code |= code_under_test(trial.dir)
                trials.append(trial)
                print(trial_line(trial), flush=True)
            rows.append(summary_row(scenario.name, trials))
    print(f"\nshared package inside enrich: {', '.join(sorted(seen_code)) or '?'}")
    print(f"total {time.monotonic() - started:.0f}s\n")
    print_table(rows)


if __name__ == "__main__":
    main()
