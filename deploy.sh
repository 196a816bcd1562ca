#!/usr/bin/env bash
# Production deployment: Supabase (database, Vault, Database Webhook), Modal (workers and the ASYNC
# steps' callback receiver, a web endpoint), Prefect Cloud (work pool, conductor deployment with its
# trigger automation, webhook). No server of our own.
#
# Dry run by default: checks the CLIs and the environment, then prints every command it would run,
# secrets masked as ***. `--apply` runs them. Every step creates or updates, so running it again is
# safe (and is how an update is deployed).
#
# Usage: ./deploy.sh [--apply]
#
# Run it from the project's virtualenv: `modal deploy` and `prefect deploy` import the project's code.
# Needs the CLIs supabase (>= 2.79.0, for `db query --linked`), modal, prefect and python3, and the
# environment that `./deploy.sh --help` lists.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

readonly TEMPLATE_FILE=deploy/prefect_webhook_template.json.j2

# name|description. Required.
readonly REQUIRED_VARS=(
    "SUPABASE_ACCESS_TOKEN|a Supabase personal access token (supabase link, supabase db query)"
    "SUPABASE_PROJECT_REF|the project's reference id (Dashboard > Project Settings > General)"
    "SUPABASE_DB_PASSWORD|the project's database password (supabase link, supabase db push)"
    "SUPABASE_URL|https://<project ref>.supabase.co, for the workers and the conductor"
    "SUPABASE_SERVICE_ROLE_KEY|the project's service-role key, for the workers and the conductor"
    "PREFECT_API_URL|https://api.prefect.cloud/api/accounts/<id>/workspaces/<id>"
    "PREFECT_API_KEY|a Prefect Cloud API key"
    "MODAL_TOKEN_ID|a Modal token id (modal token new)"
    "MODAL_TOKEN_SECRET|the Modal token's secret"
    "ENRICH_GIT_REPOSITORY|the https URL of this repository, cloned by each conductor run"
    "ENRICH_CALLBACK_SECRET|signs ASYNC steps' callback URLs, >= 32 bytes; keep it (make one: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
)
# Optional, with their defaults.
readonly OPTIONAL_VARS=(
    "PREFECT_WEBHOOK_URL|use this webhook URL instead of creating the webhook (default: create or update it and read its URL)"
    "PREFECT_WEBHOOK_TOKEN|a Prefect service-account API key the webhook requires (Pro/Enterprise), sent as Bearer"
    "ENRICH_GIT_BRANCH|branch the conductor runs from (main)"
    "ENRICH_GIT_TOKEN|token for a private repository, kept in the Prefect Secret block enrichment-git-token (empty: public)"
    "ENRICH_WORK_POOL|Prefect work pool, type modal:push (enrichment-modal)"
    "ENRICH_MODAL_APP|Modal app name (enrichment-workers)"
    "MODAL_ENVIRONMENT|Modal environment of the app, its secret and the conductor's lookups (main)"
    "ENRICH_MODAL_SECRET|Modal secret holding the Supabase credentials (enrichment-supabase)"
    "ENRICH_PREFECT_WEBHOOK_NAME|Prefect Cloud webhook name (enrichment-state-changed)"
    "ENRICH_WEBHOOK_DEBOUNCE_SECONDS|at most one webhook request per this many seconds (2)"
    "ENRICH_ENVIRONMENT|environment reported to Sentry (production)"
    "ENRICH_RELEASE|release reported to Sentry and the deployment version (git commit)"
    "SENTRY_DSN|Sentry DSN; empty: no error reporting"
    "ENRICH_CALLBACK_SECRET_PREVIOUS|the callback key being rotated out, still accepted (empty: none)"
    "CLAY_WEBHOOK_URL|the webhook URL of the Clay table clay_enrich sends rows to (empty: clay_enrich refuses new batches)"
    "CLAY_WEBHOOK_TOKEN|the auth token of that Clay webhook, when it has one"
    "EXA_API_KEY|the Exa API key exa_verify calls with (empty: exa_verify refuses new batches)"
    "EXA_BASE_URL|Exa's API base URL (default: Exa's own)"
)
readonly REQUIRED_CLIS=(supabase modal prefect python3)
# `supabase db query` (run below with --linked) first shipped in Supabase CLI v2.79.0: supabase/cli
# commit 111bf902 "feat(db): add `supabase db query` command for executing SQL" (#4955) is in tag
# v2.79.0 and not in v2.78.1.
readonly SUPABASE_CLI_MIN=2.79.0
# The Prefect Secret block the conductor's pull step clones with: prefect.yaml names it literally
# (`{{ prefect.blocks.secret.enrichment-git-token }}`), resolved at run time, never stored.
readonly GIT_TOKEN_BLOCK=enrichment-git-token
# Values never printed. WEBHOOK_URL is the URL in use (a Prefect webhook URL is a credential).
readonly SECRET_VARS=(SUPABASE_ACCESS_TOKEN SUPABASE_DB_PASSWORD SUPABASE_SERVICE_ROLE_KEY
    PREFECT_API_KEY MODAL_TOKEN_SECRET PREFECT_WEBHOOK_URL PREFECT_WEBHOOK_TOKEN ENRICH_GIT_TOKEN
    SENTRY_DSN WEBHOOK_URL ENRICH_CALLBACK_SECRET ENRICH_CALLBACK_SECRET_PREVIOUS CLAY_WEBHOOK_URL
    CLAY_WEBHOOK_TOKEN EXA_API_KEY)
# step|the variable its provider needs|what it is. Without the variable, deploy.sh marks the step
# unavailable in the registry (a batch naming it is refused at insert, with the reason).
readonly PROVIDER_STEPS=(
    "clay_enrich|CLAY_WEBHOOK_URL|Clay webhook URL"
    "exa_verify|EXA_API_KEY|Exa API key"
)

usage() {
    local entry
    # the header comment, however long it grows: every line up to the first that is not a comment
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
    echo
    echo "Required environment:"
    for entry in "${REQUIRED_VARS[@]}"; do printf '  %-32s %s\n' "${entry%%|*}" "${entry#*|}"; done
    echo "Optional environment:"
    for entry in "${OPTIONAL_VARS[@]}"; do printf '  %-32s %s\n' "${entry%%|*}" "${entry#*|}"; done
}

APPLY=0
for arg in "$@"; do
    case "$arg" in
        --apply) APPLY=1 ;;
        --dry-run) APPLY=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "deploy.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

# Defaults, exported: prefect.yaml reads them as {{ $NAME }} and modal_app/app.py reads the Modal
# names.
export ENRICH_GIT_BRANCH="${ENRICH_GIT_BRANCH:-main}"
export ENRICH_GIT_TOKEN="${ENRICH_GIT_TOKEN:-}"
export ENRICH_WORK_POOL="${ENRICH_WORK_POOL:-enrichment-modal}"
export ENRICH_MODAL_APP="${ENRICH_MODAL_APP:-enrichment-workers}"
# Modal's CLI and SDK read MODAL_ENVIRONMENT too; the commands below also name it explicitly.
export MODAL_ENVIRONMENT="${MODAL_ENVIRONMENT:-main}"
export ENRICH_MODAL_SECRET="${ENRICH_MODAL_SECRET:-enrichment-supabase}"
export ENRICH_SECRET_BLOCK="${ENRICH_SECRET_BLOCK:-enrichment-supabase-service-role-key}"
export ENRICH_PREFECT_WEBHOOK_NAME="${ENRICH_PREFECT_WEBHOOK_NAME:-enrichment-state-changed}"
export ENRICH_WEBHOOK_DEBOUNCE_SECONDS="${ENRICH_WEBHOOK_DEBOUNCE_SECONDS:-2}"
export ENRICH_ENVIRONMENT="${ENRICH_ENVIRONMENT:-production}"
if [[ -z "${ENRICH_RELEASE:-}" ]]; then
    ENRICH_RELEASE="$(git rev-parse --short=12 HEAD 2>/dev/null || echo dev)"
fi
export ENRICH_RELEASE
export SENTRY_DSN="${SENTRY_DSN:-}"
PREFECT_WEBHOOK_URL="${PREFECT_WEBHOOK_URL:-}"
PREFECT_WEBHOOK_TOKEN="${PREFECT_WEBHOOK_TOKEN:-}"
WEBHOOK_URL="$PREFECT_WEBHOOK_URL"

# Preflight ---------------------------------------------------------------------------------------

# The first x.y.z in `supabase --version` (it prints the bare version), empty when there is none.
supabase_cli_version() {
    supabase --version 2>/dev/null | grep -Eo '[0-9]+\.[0-9]+\.[0-9]+' | head -n1 || true
}

# Whether version $1 >= version $2.
version_at_least() {
    [[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" == "$2" ]]
}

preflight() {
    local entry name cli problems=()
    for entry in "${REQUIRED_VARS[@]}"; do
        name="${entry%%|*}"
        if [[ -z "${!name:-}" ]]; then
            problems+=("missing environment variable $name: ${entry#*|}")
        fi
    done
    for cli in "${REQUIRED_CLIS[@]}"; do
        if ! command -v "$cli" >/dev/null 2>&1; then
            case "$cli" in
                # Their CLIs come with the project's cloud extra (pyproject.toml), not its base.
                modal | prefect)
                    problems+=("missing command $cli: this needs the cloud extra: pip install 'enrich-orchestrator[cloud]' (and run from the project's virtualenv)") ;;
                *) problems+=("missing command $cli: install it (and run from the project's virtualenv)") ;;
            esac
        fi
    done
    # Checked before anything is changed: an older CLI would push the migrations, then fail at the
    # first `db query` with the project half deployed.
    if command -v supabase >/dev/null 2>&1; then
        local found
        found="$(supabase_cli_version)"
        if [[ -z "$found" ]]; then
            problems+=("could not read the Supabase CLI's version (supabase --version); deploy.sh needs >= $SUPABASE_CLI_MIN")
        elif ! version_at_least "$found" "$SUPABASE_CLI_MIN"; then
            problems+=("Supabase CLI $found found, deploy.sh needs >= $SUPABASE_CLI_MIN (\`supabase db query --linked\` first shipped in v$SUPABASE_CLI_MIN): upgrade the supabase CLI")
        fi
    fi
    if [[ ! "$MODAL_ENVIRONMENT" =~ ^[A-Za-z0-9._-]+$ ]]; then
        problems+=("MODAL_ENVIRONMENT must be a Modal environment name (letters, digits, . _ -)")
    fi
    if [[ -n "${SUPABASE_PROJECT_REF:-}" && ! "$SUPABASE_PROJECT_REF" =~ ^[a-z0-9]+$ ]]; then
        problems+=("SUPABASE_PROJECT_REF must be lowercase letters and digits")
    fi
    if [[ -n "${SUPABASE_URL:-}" && ! "$SUPABASE_URL" =~ ^https:// ]]; then
        problems+=("SUPABASE_URL must start with https://")
    fi
    if [[ -n "${PREFECT_API_URL:-}" && ! "$PREFECT_API_URL" =~ /api/accounts/[^/]+/workspaces/[^/]+ ]]; then
        problems+=("PREFECT_API_URL must be a Prefect Cloud workspace URL (webhooks are a Prefect Cloud feature)")
    fi
    if [[ -n "$PREFECT_WEBHOOK_URL" && ! "$PREFECT_WEBHOOK_URL" =~ ^https://[^[:space:]\']+$ ]]; then
        problems+=("PREFECT_WEBHOOK_URL must be an https URL")
    fi
    local key
    for key in ENRICH_CALLBACK_SECRET ENRICH_CALLBACK_SECRET_PREVIOUS; do
        # Bytes, as the workers count them (shared/callbacks/token.py, MIN_KEY_BYTES).
        if [[ -n "${!key:-}" ]] && (($(printf '%s' "${!key}" | wc -c) < 32)); then
            problems+=("$key must be at least 32 bytes long")
        fi
    done
    for key in CLAY_WEBHOOK_URL EXA_BASE_URL; do
        if [[ -n "${!key:-}" && ! "${!key}" =~ ^https://[^[:space:]]+$ ]]; then
            problems+=("$key must be an https URL")
        fi
    done
    if [[ ! "$ENRICH_WEBHOOK_DEBOUNCE_SECONDS" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
        problems+=("ENRICH_WEBHOOK_DEBOUNCE_SECONDS must be a number of seconds")
    fi
    if [[ ! -f "$TEMPLATE_FILE" ]]; then
        problems+=("missing file $TEMPLATE_FILE")
    fi
    if ((${#problems[@]} > 0)); then
        {
            echo "deploy.sh: cannot deploy, fix these first:"
            printf '  - %s\n' "${problems[@]}"
            echo "See ./deploy.sh --help."
        } >&2
        exit 2
    fi
}

# Printing and running ----------------------------------------------------------------------------

mask() {
    local text="$1" name value
    for name in "${SECRET_VARS[@]}"; do
        value="${!name:-}"
        if ((${#value} >= 4)); then
            # The forms a value is printed in: inside a SQL literal (quotes doubled, sql_literal),
            # quoted for the shell, and as it is.
            text="${text//"${value//\'/\'\'}"/***}"
            text="${text//"${value//\'/\'\\\'\'}"/***}"
            text="${text//"$value"/***}"
        fi
    done
    printf '%s' "$text"
}

# One word as the shell would need it, masked; the webhook template shown as the file it comes from.
display_word() {
    local word="$1"
    if [[ -n "${TEMPLATE_TEXT:-}" && "$word" == "$TEMPLATE_TEXT" ]]; then
        # shellcheck disable=SC2016 # printed for the reader, not expanded
        printf '"$(cat %s)"' "$TEMPLATE_FILE"
        return
    fi
    word="$(mask "$word")"
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$word"
    else
        printf "'%s'" "${word//\'/\'\\\'\'}"
    fi
}

show() {
    local line="+" word
    for word in "$@"; do
        line+=" $(display_word "$word")"
    done
    printf '%s\n' "$line"
}

run() {
    show "$@"
    if ((APPLY)); then
        "$@"
    fi
}

# SQL for the linked project, sent on stdin (never on a command line, where ps would show it).
run_sql() {
    show supabase db query --linked
    printf '  <<SQL\n%s\n  SQL\n' "$(mask "$1" | sed 's/^/    /')"
    if ((APPLY)); then
        printf '%s\n' "$1" | supabase db query --linked
    fi
}

# Saves a Prefect Secret block (argv[1]) from the environment variable named argv[2], so the value
# is never on a command line.
readonly SAVE_SECRET_BLOCK='import os, sys
from prefect.blocks.system import Secret
Secret(value=os.environ[sys.argv[2]]).save(sys.argv[1], overwrite=True)'

# Prints the deployed receiver's URL and fails unless its /health answers 200 (the first call may
# wait for a container to start).
readonly CHECK_RECEIVER='import sys, httpx, modal
url = modal.Function.from_name(sys.argv[1], "callbacks", environment_name=sys.argv[2]).get_web_url()
answer = httpx.get(f"{url}/health", timeout=120)
print(f"callback receiver: {url} (health: {answer.status_code})")
sys.exit(0 if answer.status_code == 200 else 1)'

# The interpreter the prefect CLI runs on (it has prefect installed), else python3.
prefect_python() {
    local shebang
    shebang="$(head -n1 "$(command -v prefect)" 2>/dev/null || true)"
    shebang="${shebang#\#!}"
    if [[ "$shebang" == /* && "$shebang" != *" "* && -x "$shebang" ]]; then
        printf '%s\n' "$shebang"
    else
        printf 'python3\n'
    fi
}

STEP=0
readonly STEPS=12
step() {
    STEP=$((STEP + 1))
    printf '\n== [%d/%d] %s\n' "$STEP" "$STEPS" "$1"
}

note() {
    printf '   # %s\n' "$(mask "$1")"
}

sql_literal() {
    printf "'%s'" "${1//\'/\'\'}"
}

# The value of FIELD of the webhook named NAME in `prefect cloud webhook ls --output json` (stdin).
webhook_field() {
    python3 -c '
import json, sys
text = sys.stdin.read()
start, end = text.find("["), text.rfind("]")
hooks = json.loads(text[start : end + 1]) if start >= 0 < end else []
name, field = sys.argv[1], sys.argv[2]
for hook in hooks:
    if isinstance(hook, dict) and hook.get("name") == name:
        print(hook.get(field) or "")
        break
' "$1" "$2"
}

# Steps -------------------------------------------------------------------------------------------

preflight

if ((APPLY)); then
    echo "deploy.sh: applying (project $SUPABASE_PROJECT_REF, pool $ENRICH_WORK_POOL, release $ENRICH_RELEASE)"
else
    echo "deploy.sh: dry run, nothing is changed (run with --apply to deploy)"
fi

TEMPLATE_TEXT="$(cat "$TEMPLATE_FILE")"
TMP_DIR=""
cleanup() {
    if [[ -n "$TMP_DIR" ]]; then
        rm -rf "$TMP_DIR"
    fi
}
trap cleanup EXIT

step "Supabase: link the project (the database password comes from SUPABASE_DB_PASSWORD)"
run supabase link --project-ref "$SUPABASE_PROJECT_REF"

step "Supabase: push the migrations and the seed (each applied once; the seed is idempotent)"
run supabase db push --linked --include-seed --yes

step "Modal: create or update the secret $ENRICH_MODAL_SECRET"
secret_keys=(SUPABASE_URL SUPABASE_SERVICE_ROLE_KEY ENRICH_CALLBACK_SECRET)
for key in ENRICH_CALLBACK_SECRET_PREVIOUS CLAY_WEBHOOK_URL CLAY_WEBHOOK_TOKEN EXA_API_KEY EXA_BASE_URL; do
    if [[ -n "${!key:-}" ]]; then
        secret_keys+=("$key")
    fi
done
if [[ -n "$SENTRY_DSN" ]]; then
    secret_keys+=(SENTRY_DSN SENTRY_ENVIRONMENT SENTRY_RELEASE)
fi
if ((APPLY)); then
    TMP_DIR="$(mktemp -d)"
    chmod 700 "$TMP_DIR"
    dotenv="$TMP_DIR/modal-secret.env"
    : >"$dotenv"
    chmod 600 "$dotenv"
    (
        for key in "${secret_keys[@]}"; do
            case "$key" in
                SENTRY_ENVIRONMENT) value="$ENRICH_ENVIRONMENT" ;;
                SENTRY_RELEASE) value="$ENRICH_RELEASE" ;;
                *) value="${!key}" ;;
            esac
            if [[ "$value" == *"'"* || "$value" == *$'\n'* ]]; then
                echo "deploy.sh: $key contains a quote or a newline" >&2
                exit 2
            fi
            printf "%s='%s'\n" "$key" "$value"
        done
    ) >>"$dotenv"
else
    dotenv="<temporary .env file: ${secret_keys[*]}>"
fi
note "values go through a private temporary file, not the command line, deleted right after"
run modal secret create "$ENRICH_MODAL_SECRET" --from-dotenv "$dotenv" --force --env "$MODAL_ENVIRONMENT"
if ((APPLY)); then
    # Modal holds the values now: no copy stays on disk while the remaining steps run.
    rm -rf "$TMP_DIR"
    TMP_DIR=""
fi

step "Modal: deploy the workers and the callback receiver (app $ENRICH_MODAL_APP)"
note "the receiver is the web endpoint callbacks: POST <its URL>/callbacks/<token>, see README"
run modal deploy modal_app/app.py --env "$MODAL_ENVIRONMENT"

step "Modal: check that the callback receiver answers"
note "reads the endpoint's URL from Modal and calls GET /health (the receiver reaches the database)"
run "${ENRICH_PREFECT_PYTHON:-$(prefect_python)}" -c "$CHECK_RECEIVER" "$ENRICH_MODAL_APP" "$MODAL_ENVIRONMENT"

step "Prefect: create or update the work pool $ENRICH_WORK_POOL (modal:push)"
note "--provision-infrastructure stores the Modal token as a block, or reuses the existing block"
run prefect --no-prompt work-pool create "$ENRICH_WORK_POOL" --type modal:push \
    --provision-infrastructure --overwrite

step "Prefect: store the service-role key and the git token as Secret blocks"
note "values are read from the environment, not the command line; the deployment names the blocks"
note "$ENRICH_SECRET_BLOCK: the service-role key, which the flow loads at run time"
export SUPABASE_SERVICE_ROLE_KEY
run "${ENRICH_PREFECT_PYTHON:-$(prefect_python)}" -c "$SAVE_SECRET_BLOCK" "$ENRICH_SECRET_BLOCK" \
    SUPABASE_SERVICE_ROLE_KEY
note "$GIT_TOKEN_BLOCK: ENRICH_GIT_TOKEN, which each run's git_clone resolves (empty: public repo)"
run "${ENRICH_PREFECT_PYTHON:-$(prefect_python)}" -c "$SAVE_SECRET_BLOCK" "$GIT_TOKEN_BLOCK" \
    ENRICH_GIT_TOKEN
# `prefect deploy` stores what it resolves: it gets no copy of the token to resolve.
export -n ENRICH_GIT_TOKEN

step "Prefect: deploy the conductor (schedule, concurrency limit, event trigger automation)"
run prefect --no-prompt deploy --all --prefect-file prefect.yaml

step "Prefect: create or update the webhook $ENRICH_PREFECT_WEBHOOK_NAME"
webhook_description="Supabase Database Webhook (pg_net) -> enrichment.state.changed. Managed by deploy.sh."
if [[ -n "$PREFECT_WEBHOOK_URL" ]]; then
    note "PREFECT_WEBHOOK_URL is set: using that webhook as it is, creating none"
else
    show prefect cloud webhook ls --output json
    webhook_id=""
    if ((APPLY)); then
        webhook_id="$(prefect cloud webhook ls --output json | webhook_field "$ENRICH_PREFECT_WEBHOOK_NAME" id)"
    fi
    if ((APPLY)) && [[ -n "$webhook_id" ]]; then
        run prefect cloud webhook update "$webhook_id" --description "$webhook_description" \
            --template "$TEMPLATE_TEXT"
    elif ((APPLY)); then
        run prefect cloud webhook create "$ENRICH_PREFECT_WEBHOOK_NAME" \
            --description "$webhook_description" --template "$TEMPLATE_TEXT"
    else
        note "when a webhook of that name exists:"
        run prefect cloud webhook update "<its id>" --description "$webhook_description" \
            --template "$TEMPLATE_TEXT"
        note "otherwise:"
        run prefect cloud webhook create "$ENRICH_PREFECT_WEBHOOK_NAME" \
            --description "$webhook_description" --template "$TEMPLATE_TEXT"
    fi
    show prefect cloud webhook ls --output json
    note "the URL is ${PREFECT_API_URL%%/api/*}/hooks/<its slug>"
    if ((APPLY)); then
        slug="$(prefect cloud webhook ls --output json | webhook_field "$ENRICH_PREFECT_WEBHOOK_NAME" slug)"
        if [[ -z "$slug" ]]; then
            echo "deploy.sh: webhook $ENRICH_PREFECT_WEBHOOK_NAME not found after creating it" >&2
            exit 1
        fi
        WEBHOOK_URL="${PREFECT_API_URL%%/api/*}/hooks/$slug"
    fi
fi

step "Supabase: store the webhook URL in Vault, the debounce setting, and wire the webhook"
if [[ -n "$WEBHOOK_URL" ]]; then
    url_literal="$(sql_literal "$WEBHOOK_URL")"
else
    url_literal="'<the webhook URL read in the previous step>'"
fi
vault_sql="-- Vault secrets: update when present, else create (vault.update_secret / vault.create_secret).
select vault.update_secret(id, $url_literal)
  from vault.secrets where name = 'prefect_webhook_url';
select vault.create_secret($url_literal, 'prefect_webhook_url', 'Prefect Cloud webhook for enrichment.state.changed (deploy.sh)')
  where not exists (select 1 from vault.secrets where name = 'prefect_webhook_url');"
if [[ -n "$PREFECT_WEBHOOK_TOKEN" ]]; then
    token_literal="$(sql_literal "$PREFECT_WEBHOOK_TOKEN")"
    vault_sql+="
select vault.update_secret(id, $token_literal)
  from vault.secrets where name = 'prefect_webhook_token';
select vault.create_secret($token_literal, 'prefect_webhook_token', 'Bearer token for the Prefect Cloud webhook (deploy.sh)')
  where not exists (select 1 from vault.secrets where name = 'prefect_webhook_token');"
fi
run_sql "$vault_sql
-- Settings read at run time; Vault holds the URL, so no plaintext copy is kept.
insert into public.enrichment_settings (key, value) values
  ('webhook_debounce_seconds', $(sql_literal "$ENRICH_WEBHOOK_DEBOUNCE_SECONDS")),
  ('webhook_source', $(sql_literal "$SUPABASE_PROJECT_REF"))
on conflict (key) do update set value = excluded.value, updated_at = now();
delete from public.enrichment_settings where key = 'prefect_webhook_url';
-- Webhook triggers (pg_net) and the pg_cron flush job; idempotent.
select public.enable_state_webhooks();"

step "Supabase: mark the steps whose provider is not deployed as unavailable"
availability_sql=""
for entry in "${PROVIDER_STEPS[@]}"; do
    IFS='|' read -r step_name variable what <<<"$entry"
    if [[ -n "${!variable:-}" ]]; then
        availability_sql+="update public.enrichment_registry set config = config - 'unavailable'
  where step_name = '$step_name';
"
    else
        note "$variable is not set: a batch naming $step_name is refused with this reason"
        availability_sql+="update public.enrichment_registry
  set config = config || jsonb_build_object('unavailable',
    'no $what was deployed to the workers: set $variable and run ./deploy.sh --apply')
  where step_name = '$step_name';
"
    fi
done
run_sql "$availability_sql"

step "Check: the database's webhook status (read only)"
run_sql "select public.state_webhook_status();"

echo
if ((APPLY)); then
    echo "deploy.sh: done. Insert a batch (Studio or enrich) and watch the conductor's runs in Prefect Cloud."
else
    echo "deploy.sh: dry run complete; run ./deploy.sh --apply to deploy."
fi
