"""Serve the conductor deployment here: ``python -m flows.dev_serve`` (run by ``enrich dev up``).

The production deployment, served by a local process instead of a Modal work pool: a run whenever
the event ``enrichment.state.changed`` arrives from the database (here from ``flows.relay``; in
production from the Prefect Cloud webhook fed by pg_net), and on a one-minute schedule, the sweep
that covers lost events. Runs dispatch to the local stand-in for Modal (``dispatcher="local"``).

Needs ``PREFECT_API_URL``: without it Prefect would start a temporary server of its own, and the
deployment would live and die with this process.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import timedelta

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.types.entrypoint import EntrypointType

from flows.conductor import conductor

DEPLOYMENT_NAME = "dev"
EVENT_NAME = "enrichment.state.changed"
RESOURCE_PREFIX = "enrichment.database."
DEFAULT_INTERVAL_S = 60.0
DEFAULT_POLL_S = 1.0
DEFAULT_LIMIT = 4


def state_changed_trigger() -> DeploymentEventTrigger:
    """One run per ``enrichment.state.changed`` event from any enrichment database. The relay
    (or the webhook's SQL debounce) already coalesces bursts, so every event counts."""
    return DeploymentEventTrigger(
        name="enrichment-state-changed",
        description="Run the conductor when the database reports rows ready or finished.",
        expect={EVENT_NAME},
        match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
        threshold=1,
        within=timedelta(0),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.dev_serve", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="The deployment's name.")
    parser.add_argument("--dispatcher", default="local", choices=["local", "modal"])
    parser.add_argument(
        "--interval", type=float, default=DEFAULT_INTERVAL_S, help="Seconds between sweep runs."
    )
    parser.add_argument(
        "--poll", type=float, default=DEFAULT_POLL_S, help="Seconds between polls for runs."
    )
    parser.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help="Conductor runs at once, at most."
    )
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        sys.exit("flows.dev_serve: set PREFECT_API_URL to the Prefect server to serve on")
    deployment = conductor.to_deployment(
        name=args.name,
        interval=timedelta(seconds=args.interval),
        triggers=[state_changed_trigger()],
        parameters={"dispatcher": args.dispatcher},
        paused=False,
        description="The enrichment conductor: event-triggered, with a sweep on a schedule.",
        tags=["enrichment", "dev"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    assert isinstance(deployment, RunnerDeployment)  # to_deployment is sync outside an event loop
    # Runs are started in subprocesses of this one; serve() returns on SIGINT / SIGTERM.
    serve(deployment, query_seconds=args.poll, limit=args.limit, pause_on_shutdown=False)


if __name__ == "__main__":
    main()
