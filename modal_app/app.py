"""The Modal app: ``modal deploy modal_app/app.py``.

One function per registry step, named as the registry's ``modal_function_name`` says. Each receives
a chunk of ``{batch_id, item_id, step_name, attempt}`` objects from the conductor and runs them
through ``shared.worker.run_chunk``, the same code the local pool runs. The workers reach the
database through the Supabase client, with the service-role key from the Modal secret
``enrichment-supabase``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import modal

from modal_app.entry import run_function_chunk
from modal_app.specs import FUNCTION_SPECS

APP_NAME = os.environ.get("ENRICH_MODAL_APP", "enrichment-workers")
SECRET_NAME = os.environ.get("ENRICH_MODAL_SECRET", "enrichment-supabase")

app = modal.App(APP_NAME)

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
    )
    # shared/ carries SQL and data files too (the default ignore keeps only .py files).
    .add_local_python_source(
        "shared", "modal_app", ignore=lambda path: "__pycache__" in Path(path).parts
    )
)

secrets = [
    modal.Secret.from_name(SECRET_NAME, required_keys=["SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"])
]


def _options(function_name: str) -> dict[str, Any]:
    spec = FUNCTION_SPECS[function_name]
    return {
        "image": image,
        "secrets": secrets,
        "timeout": spec.timeout_seconds,
        "retries": modal.Retries(max_retries=spec.modal_retries, initial_delay=1.0)
        if spec.modal_retries
        else 0,
        "max_containers": spec.max_containers,
    }


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
    return await run_function_chunk("step_async", tasks)
