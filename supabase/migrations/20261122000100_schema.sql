-- The Brain's tables: batches, their items, one state row per (batch, item, step), the step registry
-- and one results table per built-in step. Names and statuses follow the seed
-- (architecture_definition.md, section 3).

create type public.batch_status as enum ('PENDING', 'IN_PROGRESS', 'COMPLETED', 'FAILED');
create type public.workflow_status as enum ('PENDING', 'QUEUED', 'IN_PROGRESS', 'COMPLETED', 'FAILED');
create type public.step_type as enum ('SYNC', 'ASYNC');

-- The client a signed-in Supabase user belongs to. Read from the JWT: a top-level `client_id` claim
-- (set by a custom access token hook) or `app_metadata.client_id` (writable only by the service role).
-- Never from user_metadata, which the user can change.
create function public.request_client_id() returns uuid
language sql stable
set search_path = public, pg_temp
as $$
  select nullif(coalesce(auth.jwt() ->> 'client_id', auth.jwt() -> 'app_metadata' ->> 'client_id'), '')::uuid
$$;

create table public.enrichment_registry (
  step_name text primary key
    constraint enrichment_registry_step_name_format check (step_name ~ '^[a-z][a-z0-9_]{0,62}$'),
  type public.step_type not null default 'SYNC',
  -- The Modal function that runs the step; locally, the name of the step handler.
  modal_function_name text not null
    constraint enrichment_registry_function_format check (modal_function_name ~ '^[A-Za-z_][A-Za-z0-9_-]{0,127}$'),
  -- Where completed results are upserted, keyed by (batch_id, item_id); null keeps no result rows.
  results_table text unique
    constraint enrichment_registry_results_table_format check (results_table ~ '^[a-z][a-z0-9_]{0,62}$'),
  -- timeout_seconds, max_attempts, backoff_seconds, backoff_multiplier, backoff_max_seconds,
  -- backoff_jitter, plus anything the step itself reads. Checked by a trigger (state_machine migration).
  config jsonb not null default '{}'::jsonb
    constraint enrichment_registry_config_object check (jsonb_typeof(config) = 'object'),
  description text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

create table public.batches (
  id uuid primary key default gen_random_uuid(),
  client_id uuid not null
    default coalesce(public.request_client_id(), '00000000-0000-0000-0000-000000000000'::uuid),
  name text,
  status public.batch_status not null default 'PENDING',
  -- A JSON array of step names, run in order for every item; validated against the registry.
  blueprint jsonb not null,
  item_count integer not null default 0,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  started_at timestamptz,
  finished_at timestamptz,
  cancelled_at timestamptz,
  meta jsonb not null default '{}'::jsonb
    constraint batches_meta_object check (jsonb_typeof(meta) = 'object')
);
create index batches_client_created on public.batches (client_id, created_at desc);
create index batches_unfinished on public.batches (id) where status in ('PENDING', 'IN_PROGRESS');

create table public.batch_items (
  id uuid primary key default gen_random_uuid(),
  batch_id uuid not null references public.batches (id) on delete cascade,
  -- Insertion order, so exports come out in the order the CSV went in.
  seq bigint generated always as identity,
  raw_data jsonb not null
    constraint batch_items_raw_data_object check (jsonb_typeof(raw_data) = 'object'),
  created_at timestamptz not null default now(),
  -- The target of the composite foreign keys below: deleting items cascades through indexes that
  -- start with batch_id, and a state or result row can never name an item of another batch.
  constraint batch_items_batch_id_id_key unique (batch_id, id)
);
create index batch_items_batch_seq on public.batch_items (batch_id, seq);

create table public.workflow_states (
  id bigint generated always as identity primary key,
  batch_id uuid not null,
  item_id uuid not null,
  step_name text not null references public.enrichment_registry (step_name),
  step_index integer not null constraint workflow_states_step_index check (step_index >= 0),
  status public.workflow_status not null default 'PENDING',
  -- Incremented at claim. Every later call names it, and a call for another attempt is refused.
  attempt integer not null default 0 constraint workflow_states_attempt check (attempt >= 0),
  -- Attempts up to this one no longer count against max_attempts (set by retry_failed), so a
  -- retried row gets a fresh budget while attempt numbers stay unique for fencing.
  retry_from integer not null default 0,
  run_after timestamptz not null default now(),
  lease_expires_at timestamptz,
  started_at timestamptz,
  finished_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  meta jsonb not null default '{}'::jsonb
    constraint workflow_states_meta_object check (jsonb_typeof(meta) = 'object'),
  constraint workflow_states_batch_item_step_key unique (batch_id, item_id, step_name),
  constraint workflow_states_item_fkey foreign key (batch_id, item_id)
    references public.batch_items (batch_id, id) on delete cascade
) with (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);

-- The claim query: ready rows, later blueprint steps first, then oldest first (see claim_steps).
create index workflow_states_ready on public.workflow_states (step_index desc, run_after, id)
  where status = 'PENDING';
-- The lease sweep.
create index workflow_states_leased on public.workflow_states (lease_expires_at)
  where status in ('QUEUED', 'IN_PROGRESS');
-- "Is anything of this batch still running?" for the roll-up.
create index workflow_states_active_batch on public.workflow_states (batch_id)
  where status in ('PENDING', 'QUEUED', 'IN_PROGRESS');
-- retry_failed and the roll-up's "did anything fail?".
create index workflow_states_failed_batch on public.workflow_states (batch_id, step_name)
  where status = 'FAILED';

-- Results: one table per built-in step, keyed by (batch_id, item_id) so a retried write is an upsert.
-- Workers write the result object to `result`; the typed columns are derived from it, which keeps
-- complete_steps generic (it only needs the table name) while the tables stay queryable in Studio.

create table public.step_a_results (
  batch_id uuid not null,
  item_id uuid not null,
  attempt integer not null,
  result jsonb not null,
  slept_ms integer generated always as (
    case when result ->> 'slept_ms' ~ '^\d{1,9}$' then (result ->> 'slept_ms')::integer end
  ) stored,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (batch_id, item_id),
  foreign key (batch_id, item_id) references public.batch_items (batch_id, id) on delete cascade
);

create table public.step_b_results (like public.step_a_results including all);
alter table public.step_b_results
  add foreign key (batch_id, item_id) references public.batch_items (batch_id, id) on delete cascade;

create table public.normalize_domain_results (
  batch_id uuid not null,
  item_id uuid not null,
  attempt integer not null,
  result jsonb not null,
  domain text generated always as (result ->> 'domain') stored,
  domain_unicode text generated always as (result ->> 'domain_unicode') stored,
  host text generated always as (result ->> 'host') stored,
  source_field text generated always as (result ->> 'source_field') stored,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (batch_id, item_id),
  foreign key (batch_id, item_id) references public.batch_items (batch_id, id) on delete cascade
);
create index normalize_domain_results_domain on public.normalize_domain_results (domain);

create table public.clean_company_name_results (
  batch_id uuid not null,
  item_id uuid not null,
  attempt integer not null,
  result jsonb not null,
  name text generated always as (result ->> 'name') stored,
  original_name text generated always as (result ->> 'original_name') stored,
  source_field text generated always as (result ->> 'source_field') stored,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (batch_id, item_id),
  foreign key (batch_id, item_id) references public.batch_items (batch_id, id) on delete cascade
);
