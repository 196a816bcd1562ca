"""deploy.sh and prefect.yaml: the production plan, without touching Supabase, Modal, Prefect Cloud.

deploy.sh runs with stub ``supabase``, ``modal`` and ``prefect`` commands first on PATH. The stubs
record their arguments (and the SQL they receive on stdin) and answer ``prefect cloud webhook ls``
with the JSON that the real Prefect CLI prints, produced here by running that CLI against a
respx-mocked Prefect Cloud API.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
import yaml  # type: ignore[import-untyped]
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL, temporary_settings
from prefect.utilities.templating import apply_values

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy.sh"
TEMPLATE = (ROOT / "deploy" / "prefect_webhook_template.json.j2").read_text()
API_URL = (
    "https://api.prefect.cloud/api/accounts/11111111-1111-1111-1111-111111111111"
    "/workspaces/22222222-2222-2222-2222-222222222222"
)
WEBHOOK_ID = "33333333-3333-3333-3333-333333333333"
WEBHOOK_SLUG = "AERylZ_uewzpDx-8fcweHQ"
SECRETS = {
    "SUPABASE_ACCESS_TOKEN": "sbp_0123456789abcdef-access",
    "SUPABASE_DB_PASSWORD": "db-password-with space",
    "SUPABASE_SERVICE_ROLE_KEY": "eyJhbGciOiJIUzI1NiJ9.service-role.signature",
    "PREFECT_API_KEY": "pnu_prefectapikey0123",
    "MODAL_TOKEN_SECRET": "as-modaltokensecret",
    "ENRICH_CALLBACK_SECRET": "callback-secret-0123456789-abcdefghij",
}
ENV = {
    **SECRETS,
    "SUPABASE_PROJECT_REF": "abcdefghijklmnopqrst",
    "SUPABASE_URL": "https://abcdefghijklmnopqrst.supabase.co",
    "PREFECT_API_URL": API_URL,
    "MODAL_TOKEN_ID": "ak-modaltokenid",
    "ENRICH_GIT_REPOSITORY": "https://github.com/acme/enrich-orchestrator",
    "ENRICH_RELEASE": "0123456789ab",
}
# prefect-python stands in for the Python the prefect CLI runs on (deploy.sh saves a Secret block).
STUBBED = ("supabase", "modal", "prefect", "prefect-python")

STUB = r"""#!/usr/bin/env bash
# Records the call; answers what deploy.sh reads back.
name="$(basename "$0")"
if [[ "$name $*" == "supabase --version" ]]; then  # read-only: not recorded as a call
  echo "${STUB_SUPABASE_VERSION:-2.79.0}"; exit 0
fi
mkdir -p "$STUB_DIR/calls"
n=$(find "$STUB_DIR/calls" -type f | wc -l)
printf '%s\0' "$name" "$@" >"$STUB_DIR/calls/$(printf '%04d' "$n")"
case "$name $*" in
  "supabase db query"*)
    cat >>"$STUB_DIR/sql.log"; printf '\n-- end\n' >>"$STUB_DIR/sql.log" ;;
  "modal secret create"*)
    while (($#)); do
      if [[ $1 == --from-dotenv ]]; then
        cp "$2" "$STUB_DIR/modal-secret.env"; stat -c %a "$2" >"$STUB_DIR/modal-secret.mode"
        printf '%s' "$2" >"$STUB_DIR/modal-secret.path"
      fi
      shift
    done ;;
  "modal deploy"*)  # the next step: is the temporary .env still on disk?
    if [[ -e "$(cat "$STUB_DIR/modal-secret.path")" ]]; then echo present; else echo gone; fi \
      >"$STUB_DIR/dotenv-at-deploy" ;;
  "prefect-python -c"*)  # saving a Secret block: -c <script> <block> <variable holding the value>
    if [[ ${4:-} =~ ^[A-Z_][A-Z0-9_]*$ ]]; then printf '%s' "${!4:-}" >"$STUB_DIR/block.$3"; fi ;;
  "prefect --no-prompt deploy"*)
    env >"$STUB_DIR/deploy.env" ;;
  "prefect cloud webhook ls"*)
    n=$(cat "$STUB_DIR/ls.count" 2>/dev/null || echo 0); echo $((n + 1)) >"$STUB_DIR/ls.count"
    if ((n == 0)); then cat "$STUB_DIR/webhooks-before.json"
    else cat "$STUB_DIR/webhooks-after.json"; fi ;;
esac
"""


# The real Prefect CLI against a mocked Prefect Cloud ----------------------------------------------


def _webhook(template: str = TEMPLATE) -> dict[str, Any]:
    return {
        "id": WEBHOOK_ID,
        "name": "enrichment-state-changed",
        "description": "d",
        "template": template,
        "slug": WEBHOOK_SLUG,
        "enabled": True,
        "created": "2026-11-22T00:00:00Z",
        "updated": "2026-11-22T00:00:00Z",
        "account": "11111111-1111-1111-1111-111111111111",
        "workspace": "22222222-2222-2222-2222-222222222222",
    }


def run_prefect_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``prefect <argv>`` in this process; return what it printed."""
    from prefect.cli import app

    saved = sys.argv
    sys.argv = ["prefect", *argv]
    try:
        with temporary_settings({PREFECT_API_URL: API_URL, PREFECT_API_KEY: "pnu_fake"}):
            app()
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr()
    finally:
        sys.argv = saved
    return capsys.readouterr().out


@pytest.fixture
def cloud() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=API_URL, assert_all_called=False) as router:
        router.post("/webhooks/filter").mock(return_value=httpx.Response(200, json=[_webhook()]))
        router.post("/webhooks/").mock(return_value=httpx.Response(201, json=_webhook()))
        router.get(f"/webhooks/{WEBHOOK_ID}").mock(
            return_value=httpx.Response(200, json=_webhook("{}"))
        )
        router.put(f"/webhooks/{WEBHOOK_ID}").mock(return_value=httpx.Response(204))
        yield router


def _body(router: respx.MockRouter, method: str, path: str) -> dict[str, Any]:
    [call] = [
        c for c in router.calls if c.request.method == method and c.request.url.path.endswith(path)
    ]
    body: dict[str, Any] = json.loads(call.request.content)
    return body


def test_webhook_commands_send_the_template_to_prefect_cloud(
    cloud: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    """The exact CLI calls deploy.sh makes, against a mocked Prefect Cloud API."""
    run_prefect_cli(
        ["cloud", "webhook", "create", "enrichment-state-changed", "--description", "d",
         "--template", TEMPLATE],
        capsys,
    )  # fmt: skip
    assert _body(cloud, "POST", "/webhooks/") == {
        "name": "enrichment-state-changed",
        "description": "d",
        "template": TEMPLATE,
    }
    run_prefect_cli(
        ["cloud", "webhook", "update", WEBHOOK_ID, "--description", "d", "--template", TEMPLATE],
        capsys,
    )
    assert _body(cloud, "PUT", f"/webhooks/{WEBHOOK_ID}")["template"] == TEMPLATE

    listed = json.loads(run_prefect_cli(["cloud", "webhook", "ls", "--output", "json"], capsys))
    assert [(w["name"], w["slug"], w["template"]) for w in listed] == [
        ("enrichment-state-changed", WEBHOOK_SLUG, TEMPLATE)
    ]


# Running deploy.sh --------------------------------------------------------------------------------


class Deploy:
    def __init__(self, tmp: Path, webhooks_after: str) -> None:
        self.stub_dir = tmp / "stubs"
        self.stub_dir.mkdir()
        for name in STUBBED:
            path = self.stub_dir / name
            path.write_text(STUB)
            path.chmod(0o755)
        (self.stub_dir / "webhooks-before.json").write_text("[]\n")
        (self.stub_dir / "webhooks-after.json").write_text(webhooks_after)

    def run(
        self, *args: str, env: dict[str, str] | None = None, hide: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        path_dirs = [str(self.stub_dir), "/usr/bin", "/bin"]
        stub_path = ":".join(path_dirs)
        full_env = {
            "PATH": stub_path,
            "HOME": str(self.stub_dir),
            "STUB_DIR": str(self.stub_dir),
            "ENRICH_PREFECT_PYTHON": "prefect-python",
            **(ENV if env is None else env),
        }
        for name in hide:
            (self.stub_dir / name).unlink()
        return subprocess.run(
            ["/bin/bash", str(SCRIPT), *args],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def calls(self) -> list[list[str]]:
        calls = self.stub_dir / "calls"
        if not calls.exists():
            return []
        return [p.read_text().split("\0")[:-1] for p in sorted(calls.iterdir())]

    def file(self, name: str) -> str:
        return (self.stub_dir / name).read_text()


@pytest.fixture
def deploy(tmp_path: Path, cloud: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> Deploy:
    """Stubs whose ``webhook ls`` answers with what the real CLI prints after the create."""
    listed = run_prefect_cli(["cloud", "webhook", "ls", "--output", "json"], capsys)
    return Deploy(tmp_path, listed)


def _commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def _assert_in_order(commands: list[str], prefixes: list[str]) -> None:
    position = 0
    for prefix in prefixes:
        for index in range(position, len(commands)):
            if commands[index].startswith(prefix):
                position = index + 1
                break
        else:
            pytest.fail(f"{prefix!r} missing or out of order in:\n" + "\n".join(commands))


SUPABASE_FIRST = [
    "supabase link --project-ref abcdefghijklmnopqrst",
    "supabase db push --linked --include-seed --yes",
    "modal secret create enrichment-supabase --from-dotenv",
    "modal deploy modal_app/app.py",
    "prefect-python -c",  # the callback receiver's health check, by its Modal URL
    "prefect --no-prompt work-pool create enrichment-modal --type modal:push"
    " --provision-infrastructure --overwrite",
    "prefect-python -c",
    "prefect-python -c",
    "prefect --no-prompt deploy --all --prefect-file prefect.yaml",
]


def test_dry_run_prints_the_whole_plan_in_order_and_runs_nothing(deploy: Deploy) -> None:
    result = deploy.run()
    assert result.returncode == 0, result.stderr
    assert "dry run" in result.stdout
    _assert_in_order(
        _commands(result.stdout),
        [
            *SUPABASE_FIRST,
            "prefect cloud webhook ls --output json",
            "prefect cloud webhook update '<its id>'",
            "prefect cloud webhook create enrichment-state-changed",
            "prefect cloud webhook ls --output json",
            "supabase db query --linked",
            "supabase db query --linked",
            "supabase db query --linked",
        ],
    )
    assert '--template "$(cat deploy/prefect_webhook_template.json.j2)"' in result.stdout
    assert "select public.enable_state_webhooks();" in result.stdout
    assert "('webhook_debounce_seconds', '2')" in result.stdout
    # The receiver is deployed with the workers, and checked; without a Clay URL, clay_enrich is
    # marked unavailable (new batches naming it are refused with the reason).
    assert "deploy the workers and the callback receiver" in result.stdout
    assert (
        'modal.Function.from_name(sys.argv[1], "callbacks", environment_name=sys.argv[2])'
        in result.stdout
    )
    assert "'unavailable'" in result.stdout and "set CLAY_WEBHOOK_URL" in result.stdout
    assert "set EXA_API_KEY" in result.stdout
    assert deploy.calls() == []  # nothing ran


def test_dry_run_masks_every_secret(deploy: Deploy) -> None:
    hook = "https://api.prefect.cloud/hooks/given-hook-slug"
    env = {
        **ENV,
        "PREFECT_WEBHOOK_URL": hook,
        "PREFECT_WEBHOOK_TOKEN": "pnu_webhooktoken",
        "SENTRY_DSN": "https://public@o1.ingest.sentry.io/2",
        "ENRICH_GIT_TOKEN": "ghp_gittoken",
    }
    result = deploy.run(env=env)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for name in (*SECRETS, "PREFECT_WEBHOOK_URL", "PREFECT_WEBHOOK_TOKEN", "SENTRY_DSN"):
        assert env[name] not in output, name
    # The given URL is used as it is: no webhook is created, and the SQL stores it (masked).
    assert "cloud webhook create" not in output
    assert "select vault.create_secret('***', 'prefect_webhook_url'" in output
    assert "select vault.create_secret('***', 'prefect_webhook_token'" in output
    _assert_in_order(
        _commands(result.stdout),
        [*SUPABASE_FIRST, "supabase db query --linked", "supabase db query --linked"],
    )


def test_missing_environment_is_listed_all_at_once(deploy: Deploy) -> None:
    env = {k: v for k, v in ENV.items() if k not in ("SUPABASE_URL", "PREFECT_API_KEY")}
    del env["MODAL_TOKEN_ID"]
    result = deploy.run(env=env)
    assert result.returncode != 0
    for name in ("SUPABASE_URL", "PREFECT_API_KEY", "MODAL_TOKEN_ID"):
        assert f"missing environment variable {name}" in result.stderr
    assert "SUPABASE_PROJECT_REF" not in result.stderr
    assert result.stdout == ""
    assert deploy.calls() == []


def test_nothing_set_lists_every_required_variable(deploy: Deploy) -> None:
    result = deploy.run("--apply", env={})
    assert result.returncode != 0
    required = [k for k in ENV if k != "ENRICH_RELEASE"]
    for name in required:
        assert f"missing environment variable {name}" in result.stderr
    assert deploy.calls() == []


def test_missing_cli_is_reported(deploy: Deploy) -> None:
    result = deploy.run(hide=("supabase", "modal"))
    assert result.returncode != 0
    assert "missing command supabase" in result.stderr
    assert "missing command modal: this needs the cloud extra: " in result.stderr
    assert "pip install 'enrich-orchestrator[cloud]'" in result.stderr
    assert "missing command prefect" not in result.stderr


def test_invalid_values_are_reported(deploy: Deploy) -> None:
    env = {**ENV, "PREFECT_API_URL": "http://127.0.0.1:4200/api", "SUPABASE_URL": "x"}
    result = deploy.run(env=env)
    assert result.returncode != 0
    assert "PREFECT_API_URL must be a Prefect Cloud workspace URL" in result.stderr
    assert "SUPABASE_URL must start with https://" in result.stderr


def test_apply_runs_every_step_and_keeps_secrets_off_command_lines(deploy: Deploy) -> None:
    result = deploy.run("--apply")
    assert result.returncode == 0, result.stderr + result.stdout
    calls = deploy.calls()
    argv_text = "\n".join(" ".join(c) for c in calls)
    for name, value in SECRETS.items():
        assert value not in argv_text, name
        assert value not in result.stdout + result.stderr, name

    _assert_in_order(
        [" ".join(c) for c in calls],
        [
            *SUPABASE_FIRST,
            "prefect cloud webhook ls --output json",
            "prefect cloud webhook create enrichment-state-changed",
            "prefect cloud webhook ls --output json",
            "supabase db query --linked",
            "supabase db query --linked",
        ],
    )
    [create] = [c for c in calls if c[:4] == ["prefect", "cloud", "webhook", "create"]]
    assert create[create.index("--template") + 1] == TEMPLATE.rstrip("\n")

    # The Modal secret came from a private file.
    assert deploy.file("modal-secret.env") == (
        f"SUPABASE_URL='{ENV['SUPABASE_URL']}'\n"
        f"SUPABASE_SERVICE_ROLE_KEY='{SECRETS['SUPABASE_SERVICE_ROLE_KEY']}'\n"
        f"ENRICH_CALLBACK_SECRET='{SECRETS['ENRICH_CALLBACK_SECRET']}'\n"
    )
    assert deploy.file("modal-secret.mode").strip() == "600"

    # The service-role key went to a Prefect Secret block through the environment (the deployment
    # names the block, never the key: tests/test_conductor_secret.py); so did the git token.
    [check, save_key, save_token] = [c for c in calls if c[0] == "prefect-python"]
    assert check[-2:] == ["enrichment-workers", "main"]  # the Modal app and its environment
    assert save_key[-2:] == ["enrichment-supabase-service-role-key", "SUPABASE_SERVICE_ROLE_KEY"]
    assert save_token[-2:] == ["enrichment-git-token", "ENRICH_GIT_TOKEN"]
    assert (
        deploy.file("block.enrichment-supabase-service-role-key")
        == (SECRETS["SUPABASE_SERVICE_ROLE_KEY"])
    )
    assert deploy.file("block.enrichment-git-token") == ""  # a public repository

    # The URL read back from Prefect Cloud went to Vault, on stdin.
    sql = deploy.file("sql.log")
    hook = f"https://api.prefect.cloud/hooks/{WEBHOOK_SLUG}"
    assert f"select vault.create_secret('{hook}', 'prefect_webhook_url'" in sql
    assert f"select vault.update_secret(id, '{hook}')" in sql
    assert "('webhook_source', 'abcdefghijklmnopqrst')" in sql
    assert sql.count("select public.enable_state_webhooks();") == 1
    assert "select public.state_webhook_status();" in sql
    assert hook not in result.stdout  # printed masked


def test_apply_with_a_clay_url_puts_it_in_the_modal_secret_and_makes_clay_available(
    deploy: Deploy,
) -> None:
    clay = {
        "CLAY_WEBHOOK_URL": "https://api.clay.com/v3/sources/webhook/pull-in-data-from-a-webhook-x",
        "CLAY_WEBHOOK_TOKEN": "clay-token-value",
        "ENRICH_CALLBACK_SECRET_PREVIOUS": "previous-callback-secret-0123456789",
    }
    result = deploy.run("--apply", env={**ENV, **clay})
    assert result.returncode == 0, result.stderr + result.stdout
    for name, value in clay.items():
        assert value not in result.stdout + result.stderr, name  # masked
        assert f"{name}='{value}'" in deploy.file("modal-secret.env"), name
    sql = deploy.file("sql.log")
    assert "set config = config - 'unavailable'\n  where step_name = 'clay_enrich'" in sql
    # No Exa key given: exa_verify alone is marked unavailable, naming the variable.
    assert sql.count("jsonb_build_object('unavailable'") == 1
    assert "set EXA_API_KEY" in sql and "where step_name = 'exa_verify'" in sql


def test_a_short_callback_secret_is_refused(deploy: Deploy) -> None:
    result = deploy.run(env={**ENV, "ENRICH_CALLBACK_SECRET": "short"})
    assert result.returncode == 2
    assert "ENRICH_CALLBACK_SECRET must be at least 32 bytes long" in result.stderr
    assert "short" not in result.stdout + result.stderr.replace("must be", "")
    assert deploy.calls() == []


@pytest.mark.parametrize("version", ["2.78.1", "1.226.4", "garbled"])
def test_an_old_supabase_cli_is_refused_before_anything_changes(
    deploy: Deploy, version: str
) -> None:
    """`supabase db query` (steps 10-12) first shipped in Supabase CLI v2.79.0: an older CLI
    would link and push the migrations, then fail with the project half deployed."""
    result = deploy.run("--apply", env={**ENV, "STUB_SUPABASE_VERSION": version})
    assert result.returncode == 2
    assert deploy.calls() == []
    assert result.stdout == ""
    if version == "garbled":
        assert "could not read the Supabase CLI's version" in result.stderr
    else:
        assert f"Supabase CLI {version} found, deploy.sh needs >= 2.79.0" in result.stderr
        assert "supabase db query --linked" in result.stderr


@pytest.mark.parametrize("version", ["2.79.0", "2.104.0-beta.6", "3.0.0"])
def test_a_recent_supabase_cli_is_accepted(deploy: Deploy, version: str) -> None:
    result = deploy.run(env={**ENV, "STUB_SUPABASE_VERSION": version})
    assert result.returncode == 0, result.stderr


def test_secrets_with_quotes_are_masked_in_the_dry_run(deploy: Deploy) -> None:
    """The SQL shows a value quoted as a SQL literal (its quotes doubled): masking the raw value
    alone missed it."""
    env = {
        **ENV,
        "PREFECT_WEBHOOK_URL": "https://api.prefect.cloud/hooks/given-hook-slug",
        "PREFECT_WEBHOOK_TOKEN": "pnu_it's-a-webhook-token",
        "ENRICH_GIT_TOKEN": "ghp_it's-a-git-token",
    }
    result = deploy.run(env=env)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for piece in ("a-webhook-token", "a-git-token", "given-hook-slug"):
        assert piece not in output, piece
    assert "select vault.create_secret('***', 'prefect_webhook_token'" in output


def test_the_temporary_env_file_is_deleted_right_after_modal_secret_create(
    deploy: Deploy,
) -> None:
    result = deploy.run("--apply")
    assert result.returncode == 0, result.stderr
    assert deploy.file("modal-secret.mode").strip() == "600"
    assert deploy.file("dotenv-at-deploy").strip() == "gone"  # before `modal deploy`, next step
    assert not Path(deploy.file("modal-secret.path")).parent.exists()


def test_the_git_token_goes_to_a_secret_block_not_to_the_deployment(deploy: Deploy) -> None:
    """prefect.yaml's `{{ $ENRICH_GIT_TOKEN }}` was resolved by `prefect deploy` and stored in
    plain text in the deployment's pull steps; a Secret block reference is resolved at run time."""
    token = "ghp_private-repo-token-0123"
    result = deploy.run("--apply", env={**ENV, "ENRICH_GIT_TOKEN": token})
    assert result.returncode == 0, result.stderr
    assert deploy.file("block.enrichment-git-token") == token
    assert token not in deploy.file("deploy.env")  # `prefect deploy` never sees it
    assert token not in result.stdout + result.stderr
    pull = json.dumps(yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"])
    assert "ENRICH_GIT_TOKEN" not in pull
    assert "{{ prefect.blocks.secret.enrichment-git-token }}" in pull


def test_the_modal_environment_is_named_explicitly(deploy: Deploy) -> None:
    result = deploy.run("--apply", env={**ENV, "MODAL_ENVIRONMENT": "staging"})
    assert result.returncode == 0, result.stderr
    calls = [" ".join(c) for c in deploy.calls()]
    assert any(
        c.startswith("modal secret create enrichment-supabase") and c.endswith("--env staging")
        for c in calls
    )
    assert "modal deploy modal_app/app.py --env staging" in calls
    assert "MODAL_ENVIRONMENT=staging" in deploy.file("deploy.env").splitlines()


def test_apply_updates_an_existing_webhook(deploy: Deploy) -> None:
    (deploy.stub_dir / "webhooks-before.json").write_text(deploy.file("webhooks-after.json"))
    result = deploy.run("--apply")
    assert result.returncode == 0, result.stderr
    commands = [c[:5] for c in deploy.calls() if c[:3] == ["prefect", "cloud", "webhook"]]
    assert ["prefect", "cloud", "webhook", "update", WEBHOOK_ID] in commands
    assert not any(c[3] == "create" for c in commands)


def test_apply_exports_every_placeholder_of_prefect_yaml(deploy: Deploy) -> None:
    """prefect.yaml's `{{ $NAME }}` placeholders are all set when `prefect deploy` runs (an unset
    one would be deployed as literal text)."""
    result = deploy.run("--apply")
    assert result.returncode == 0, result.stderr
    exported = dict(
        line.split("=", 1) for line in deploy.file("deploy.env").splitlines() if "=" in line
    )
    config = json.dumps(yaml.safe_load((ROOT / "prefect.yaml").read_text()))  # without comments
    names = set(re.findall(r"\{\{\s*\$(\w+)\s*\}\}", config))
    assert names, "prefect.yaml has no environment placeholders?"
    assert names <= set(exported), names - set(exported)
    assert exported["ENRICH_WORK_POOL"] == "enrichment-modal"
    assert exported["MODAL_ENVIRONMENT"] == "main"  # the conductor's lookups name it


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (apt-get install shellcheck; .ci/run installs it)",
)
def test_shellcheck_is_clean() -> None:
    result = subprocess.run(
        ["shellcheck", "--severity=style", str(SCRIPT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_script_is_executable_and_strict() -> None:
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text


# prefect.yaml -------------------------------------------------------------------------------------


@pytest.fixture
def prefect_yaml() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return loaded


def test_prefect_yaml_deploys_the_conductor_to_the_modal_pool(
    prefect_yaml: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = PrefectYamlModel.model_validate(prefect_yaml)
    [deployment] = model.deployments
    assert deployment.name == "conductor"
    assert deployment.entrypoint == "flows/conductor.py:conductor"
    assert deployment.parameters == {"dispatcher": "modal"}

    # The pool name is the environment's, with deploy.sh's default.
    monkeypatch.setenv("ENRICH_WORK_POOL", "enrichment-modal")
    resolved = apply_values(prefect_yaml, dict(os.environ), remove_notset=False)
    assert isinstance(resolved, dict)
    assert resolved["deployments"][0]["work_pool"]["name"] == "enrichment-modal"

    # The entrypoint loads the flow Prefect will run.
    monkeypatch.chdir(ROOT)
    flow: Flow[..., Any] = load_flow_from_entrypoint(deployment.entrypoint)
    assert flow.name == "enrichment-conductor"


def test_prefect_yaml_schedule_concurrency_and_trigger(prefect_yaml: dict[str, Any]) -> None:
    deployment = prefect_yaml["deployments"][0]
    assert deployment["schedules"] == [{"interval": 60, "slug": "safety-sweep", "active": True}]
    assert deployment["concurrency_limit"] == {"limit": 2, "collision_strategy": "CANCEL_NEW"}

    [trigger] = [DeploymentEventTrigger.model_validate(t) for t in deployment["triggers"]]
    assert trigger.expect == {"enrichment.state.changed"}
    assert trigger.posture == "Reactive" and trigger.threshold == 1
    assert trigger.enabled
    assert trigger.parameters == {"dispatcher": "modal"}


def test_prefect_yaml_pull_steps_install_only_what_the_conductor_imports(
    prefect_yaml: dict[str, Any],
) -> None:
    clone, _python_check, install = prefect_yaml["pull"]
    assert clone["prefect.deployments.steps.git_clone"]["repository"] == (
        "{{ $ENRICH_GIT_REPOSITORY }}"
    )
    script = install["prefect.deployments.steps.run_shell_script"]["script"]
    packages = {re.split(r"[\[<>=~]", p.strip('"'))[0] for p in shlex.split(script)[6:]}
    assert packages == {"psycopg", "pydantic-settings", "supabase", "modal", "sentry-sdk"}
    assert "prefect" not in packages  # the push pool's image has it


DEPLOY_FOR_REAL = r"""
import asyncio, json, sys
from prefect.cli import app
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.testing.utilities import prefect_test_harness

async def pool() -> None:
    async with get_client() as client:
        # modal:push is a Prefect Cloud pool type; the deployment only names the pool.
        await client.create_work_pool(WorkPoolCreate(name="enrichment-modal", type="process"))

async def resolve_token(pull_steps: list) -> str:
    # What a run does with its pull steps (prefect/deployments/steps/core.py run_step), after
    # deploy.sh saved the block.
    from prefect.blocks.system import Secret
    from prefect.utilities.templating import resolve_block_document_references
    await Secret(value="ghp_saved-in-the-block").save("enrichment-git-token", overwrite=True)
    step = pull_steps[0]["prefect.deployments.steps.git_clone"]
    return (await resolve_block_document_references(step))["access_token"]

async def read() -> dict:
    async with get_client() as client:
        d = await client.read_deployment_by_name("enrichment-conductor/conductor")
        automations = await client.read_automations()
        return {
            "pool": d.work_pool_name, "entrypoint": d.entrypoint, "parameters": d.parameters,
            "version": d.version, "job_variables": d.job_variables, "pull_steps": d.pull_steps,
            "schedules": [[s.schedule.interval.total_seconds(), s.active, s.slug]
                          for s in d.schedules],
            "collision": str(d.concurrency_options.collision_strategy.value),
            "automations": [[a.name, sorted(a.trigger.expect),
                             a.trigger.match.model_dump(mode="json"),
                             [x.type for x in a.actions]] for a in automations],
            "token": await resolve_token(d.pull_steps),
        }

with prefect_test_harness(server_startup_timeout=120):
    asyncio.run(pool())
    sys.argv = ["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "prefect.yaml"]
    try:
        app()
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
    print("RESULT " + json.dumps(asyncio.run(read())))
"""


@pytest.mark.slow
def test_prefect_deploy_of_prefect_yaml_against_a_local_server() -> None:
    """`prefect deploy` itself, with the environment deploy.sh exports, on a temporary server."""
    env = {
        **os.environ,
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "ENRICH_WORK_POOL": "enrichment-modal",
        "ENRICH_GIT_REPOSITORY": ENV["ENRICH_GIT_REPOSITORY"],
        "ENRICH_GIT_BRANCH": "main",
        # A token in the environment of `prefect deploy` (deploy.sh no longer exports it there)
        # must still not be stored: prefect.yaml does not name it.
        "ENRICH_GIT_TOKEN": "ghp_never-stored",
        "ENRICH_MODAL_APP": "enrichment-workers",
        "MODAL_ENVIRONMENT": "main",
        "SUPABASE_URL": ENV["SUPABASE_URL"],
        "SUPABASE_SERVICE_ROLE_KEY": "service-role-key",
        "SENTRY_DSN": "",
        "ENRICH_ENVIRONMENT": "production",
        "ENRICH_RELEASE": "0123456789ab",
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_API_KEY", None)
    result = subprocess.run(
        [sys.executable, "-c", DEPLOY_FOR_REAL],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    deployed = json.loads(lines[-1].removeprefix("RESULT "))
    assert deployed["pool"] == "enrichment-modal"
    assert deployed["entrypoint"] == "flows/conductor.py:conductor"
    assert deployed["parameters"] == {"dispatcher": "modal"}
    assert deployed["version"] == "0123456789ab"
    assert deployed["job_variables"]["env"]["SUPABASE_URL"] == ENV["SUPABASE_URL"]
    assert "{{" not in json.dumps(deployed["job_variables"])  # every placeholder resolved
    clone = deployed["pull_steps"][0]["prefect.deployments.steps.git_clone"]
    assert clone["repository"] == ENV["ENRICH_GIT_REPOSITORY"] and clone["branch"] == "main"
    # The token is a block reference, stored unresolved, resolved by each run.
    assert clone["access_token"] == "{{ prefect.blocks.secret.enrichment-git-token }}"
    assert "ghp_never-stored" not in json.dumps(deployed)
    assert deployed["token"] == "ghp_saved-in-the-block"
    assert deployed["job_variables"]["env"]["MODAL_ENVIRONMENT"] == "main"
    assert deployed["schedules"] == [[60.0, True, "safety-sweep"]]
    assert deployed["collision"] == "CANCEL_NEW"
    assert deployed["automations"] == [
        [
            "enrichment-state-changed",
            ["enrichment.state.changed"],
            {"prefect.resource.id": "enrichment.database.*"},
            ["run-deployment"],
        ]
    ]
