"""Live progress of a running batch: counts per step and status, rate and ETA.

On a terminal it is a table redrawn in place; elsewhere (CI, a pipe, a log file) one plain line
every few seconds, so long runs still show they are moving.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from shared.state_api import STATUSES, BatchProgress

STATUS_STYLE = {
    "PENDING": "dim",
    "QUEUED": "yellow",
    "IN_PROGRESS": "cyan",
    "AWAITING": "magenta",
    "COMPLETED": "green",
    "SKIPPED": "green dim",
    "CACHED": "green dim",
    "FAILED": "red",
}
AWAITING = "AWAITING"
# Parts of COMPLETED: rows a condition skipped, rows the result cache served.
SKIPPED = "SKIPPED"
CACHED = "CACHED"


def columns(progress: BatchProgress) -> list[str]:
    """The status columns to show: AWAITING (ASYNC rows waiting for their provider's callback,
    apart from the IN_PROGRESS rows a worker runs) only when some row awaits one; SKIPPED and
    CACHED (of the COMPLETED rows) only when some row was skipped or served from the cache."""
    shown = list(STATUSES)
    if any(progress.awaiting.values()):
        shown.insert(shown.index("IN_PROGRESS") + 1, AWAITING)
    parts = [
        c for c, n in ((SKIPPED, progress.skipped), (CACHED, progress.cached)) if any(n.values())
    ]
    at = shown.index("COMPLETED") + 1
    return [*shown[:at], *parts, *shown[at:]]


def cell(progress: BatchProgress, step: str, column: str) -> int:
    """The count of one table cell: IN_PROGRESS counts running rows only, when AWAITING is shown."""
    if column == AWAITING:
        return progress.awaiting.get(step, 0)
    if column == SKIPPED:
        return progress.skipped.get(step, 0)
    if column == CACHED:
        return progress.cached.get(step, 0)
    if column == "IN_PROGRESS":
        return progress.running(step)
    return progress.steps[step].get(column, 0)


@dataclass
class RateMeter:
    """Rates over a sliding window of samples (the last ``window`` seconds)."""

    window: float = 10.0
    samples: deque[tuple[float, BatchProgress]] = field(default_factory=deque)

    def add(self, progress: BatchProgress, now: float | None = None) -> None:
        at = time.monotonic() if now is None else now
        self.samples.append((at, progress))
        while len(self.samples) > 2 and at - self.samples[0][0] > self.window:
            self.samples.popleft()

    def _span(self) -> tuple[float, BatchProgress, BatchProgress] | None:
        if len(self.samples) < 2:
            return None
        (t0, first), (t1, last) = self.samples[0], self.samples[-1]
        return (t1 - t0, first, last) if t1 > t0 else None

    def step_rate(self, step: str) -> float:
        """Rows of ``step`` finished (COMPLETED or FAILED) per second."""
        span = self._span()
        if span is None:
            return 0.0
        seconds, first, last = span
        done = _finished(last, step) - _finished(first, step)
        return max(done, 0) / seconds

    def item_rate(self) -> float:
        """Items that finished the blueprint (completed or failed) per second."""
        span = self._span()
        if span is None:
            return 0.0
        seconds, first, last = span
        done = _items_done(last) - _items_done(first)
        return max(done, 0) / seconds

    def eta_seconds(self, progress: BatchProgress) -> float | None:
        rate = self.item_rate()
        remaining = progress.items - _items_done(progress)
        if remaining <= 0:
            return 0.0
        return remaining / rate if rate > 0 else None


def _finished(progress: BatchProgress, step: str) -> int:
    counts = progress.steps.get(step, {})
    return counts.get("COMPLETED", 0) + counts.get("FAILED", 0)


def _items_done(progress: BatchProgress) -> int:
    return progress.items_completed + progress.items_failed


def usd_text(amount: float) -> str:
    """``$1,234.50``, ``$0.007``: cents always, fractions of a cent when there are some."""
    text = f"{amount:,.4f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


def projection_text(amount: float) -> str:
    """A projection in whole cents (``$1.01``, not ``$1.0074``): its precision is an average's;
    below a cent it keeps the fraction so a tiny remainder does not read as free."""
    return usd_text(amount) if amount < 0.01 else f"${amount:,.2f}"


def cost_line(progress: BatchProgress) -> Text | None:
    """What the batch's paid steps cost so far, its budget, a projection for the rest and why it
    is paused; None for a batch without paid steps, budget or spend."""
    cost = progress.cost
    if not cost.paid_steps and not cost.spent_usd and cost.budget_usd is None:
        return None
    budget = "" if cost.budget_usd is None else f" of {usd_text(cost.budget_usd)} budget"
    parts: list[str | tuple[str, str]] = [
        ("cost ", "bold"),
        f"{usd_text(cost.spent_usd)} spent{budget}",
    ]
    if cost.paid_rows_left:
        projected = projection_text(cost.projected_rest_usd)
        parts.append(f", ~{projected} more for the {cost.paid_rows_left:,} paid rows left")
    if cost.paused_reason:
        parts += ["  ", ("paused: ", "bold yellow"), (cost.paused_reason, "yellow")]
    return Text.assemble(*parts)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (
        f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    )


def render(progress: BatchProgress, meter: RateMeter, elapsed: float) -> RenderableType:
    header = Text.assemble(
        ("batch ", "bold"),
        (str(progress.batch_id), "bold"),
        f"  {progress.status}",
        f"  items {progress.items:,}: ",
        (f"{progress.items_completed:,} completed", "green"),
        ", ",
        (f"{progress.items_failed:,} failed", "red" if progress.items_failed else ""),
        f"  elapsed {format_duration(elapsed)}  ETA {format_duration(meter.eta_seconds(progress))}",
    )
    table = Table(header_style="bold", box=None, pad_edge=False)
    table.add_column("step")
    shown = columns(progress)
    for status in shown:
        table.add_column(status, justify="right", style=STATUS_STYLE[status])
    table.add_column("rows/s", justify="right")
    for step in progress.steps:
        table.add_row(
            step,
            *(f"{cell(progress, step, s):,}" for s in shown),
            f"{meter.step_rate(step):,.0f}",
        )
    spend = cost_line(progress)
    return Group(header, table) if spend is None else Group(header, spend, table)


def plain_line(progress: BatchProgress, meter: RateMeter, elapsed: float) -> str:
    steps = "  ".join(
        f"{step}: {counts['COMPLETED']:,} done/{counts['FAILED']:,} failed/"
        f"{counts['PENDING'] + counts['QUEUED'] + progress.running(step):,} active"
        + (f"/{progress.awaiting[step]:,} awaiting callback" if progress.awaiting.get(step) else "")
        + (f" ({progress.skipped[step]:,} skipped)" if progress.skipped.get(step) else "")
        + (f" ({progress.cached[step]:,} cached)" if progress.cached.get(step) else "")
        for step, counts in progress.steps.items()
    )
    spend = cost_line(progress)
    return (
        f"[{format_duration(elapsed)}] {progress.items_completed:,}/{progress.items:,} items "
        f"completed, {progress.items_failed:,} failed, {meter.item_rate():,.0f} items/s, "
        f"ETA {format_duration(meter.eta_seconds(progress))} | {steps}"
        + ("" if spend is None else f" | {spend.plain}")
    )


def print_plain(
    console: Console, progress: BatchProgress, meter: RateMeter, elapsed: float
) -> None:
    line = plain_line(progress, meter, elapsed)
    console.print(line, markup=False, highlight=False, soft_wrap=True)  # "[12s] ...": not markup
