"""The Modal app: ``modal deploy modal_app/app.py``.

One function per registry step, named as the registry's ``modal_function_name`` says. Each receives
a chunk of ``{batch_id, item_id, step_name, attempt}`` objects from the conductor and runs them
through ``shared.worker.run_chunk``, the same code the local pool runs. The workers reach the
database through the Supabase client, with the service-role key from the Modal secret
``enrichment-supabase``.

``callbacks`` is the callback receiver of ASYNC steps, a web endpoint (``@modal.asgi_app``:
https://modal.com/docs/guide/webhooks): ``POST https://<workspace>--<app>-callbacks.modal.run/
callbacks/<token>``. ASYNC step functions hand their providers URLs under it, found in-container
with ``callbacks.get_web_url()`` (https://modal.com/docs/guide/webhook-urls; the container's app
objects are hydrated at start, modal/app.py ``_init_container``). Workers sign and the receiver
verifies with ``ENRICH_CALLBACK_SECRET`` from the same Modal secret.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import modal

from modal_app.entry import run_function_chunk
from modal_app.specs import FUNCTION_SPECS
from shared.callbacks.service import create_callback_service

APP_NAME = os.environ.get("ENRICH_MODAL_APP", "enrichment-workers")
SECRET_NAME = os.environ.get("ENRICH_MODAL_SECRET", "enrichment-supabase")

app = modal.App(APP_NAME)

# Python and pins are pyproject.toml's (requires-python >= 3.11: supabase>=2.34 needs it), as in
# prefect.yaml's pull step; tests/test_pins.py keeps the three in step. Modal adds its own client.
image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(
        "psycopg[binary,pool]>=3.2",
        "pydantic>=2.7",
        "pydantic-settings>=2.3",
        "publicsuffixlist>=1.0",
        "supabase>=2.34",
        "httpx>=0.27",
        "sentry-sdk>=2.0",
        "starlette>=1.0.1,<2",  # the callback receiver (an ASGI app; Modal serves it)
    )
    # shared/ carries SQL and data files too (the default ignore keeps only .py files).
    .add_local_python_source(
        "shared", "modal_app", ignore=lambda path: "__pycache__" in Path(path).parts
    )
)

SUPABASE_KEYS = ["SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"]
secrets = [modal.Secret.from_name(SECRET_NAME, required_keys=SUPABASE_KEYS)]
# ASYNC steps and the receiver also need the callback key: Modal refuses to deploy them without it.
callback_secrets = [
    modal.Secret.from_name(SECRET_NAME, required_keys=[*SUPABASE_KEYS, "ENRICH_CALLBACK_SECRET"])
]


def _options(function_name: str) -> dict[str, Any]:
    spec = FUNCTION_SPECS[function_name]
    return {
        "image": image,
        "timeout": spec.timeout_seconds,
        "retries": modal.Retries(max_retries=spec.modal_retries, initial_delay=1.0)
        if spec.modal_retries
        else 0,
        "max_containers": spec.max_containers,
        "secrets": callback_secrets if spec.answered_by_callback else secrets,
    }


async def run_async_step(function_name: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """An ASYNC step's chunk: its providers answer on the receiver below."""
    return await run_function_chunk(
        function_name,
        tasks,
        callback_base_url=await callbacks.get_web_url.aio(),
        key_from_environment=True,
    )


# Bursts of callbacks are coalesced into one State API call per container, so one container takes
# many at once (async: they are asyncio tasks on one thread, modal.concurrent).
@app.function(image=image, secrets=callback_secrets, timeout=60, max_containers=20)
@modal.concurrent(max_inputs=1000, target_inputs=200)
@modal.asgi_app()
def callbacks() -> Any:
    return create_callback_service()


@app.function(**_options("step_a"))
async def step_a(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return await run_function_chunk("step_a", tasks)


@app.function(**_options("step_b"))
async def step_b(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return await run_function_chunk("step_b", tasks)


@app.function(**_options("normalize_domain"))
async def normalize_domain(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return await run_function_chunk("normalize_domain", tasks)


@app.function(**_options("clean_company_name"))
async def clean_company_name(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return await run_function_chunk("clean_company_name", tasks)


@app.function(**_options("step_async"))
async def step_async(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return await run_async_step("step_async", tasks)


# The Clay webhook URL (and token) come from the same secret, when deploy.sh had them: without the
# URL the registry marks clay_enrich unavailable, so no batch reaches this function.
@app.function(**_options("clay_enrich"))
async def clay_enrich(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return await run_async_step("clay_enrich", tasks)


# EXA_API_KEY (and EXA_BASE_URL) come from the same secret, when deploy.sh had them: without the
# key the registry marks exa_verify unavailable. Its rate limit is shared in the database
# (providers), so any number of containers together stay under it.
@app.function(**_options("exa_verify"))
async def exa_verify(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return await run_function_chunk("exa_verify", tasks)
