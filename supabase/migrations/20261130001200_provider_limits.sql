-- Paid providers (issue 8, items 2 and 3): shared rate limits, the 429 path, the cost ledger and
-- budgets, all enforced where rows are claimed (DESIGN.md, "Real enrichment: decisions"): any
-- number of conductor runs and Modal containers share one provider account, so only the database
-- can count for all of them.
--
-- 1. providers: one row per paid API, with its limits (requests_per_second and burst: a token
--    bucket; max_concurrency; daily_cap) and the bucket's shared state. A step names its provider
--    in its registry config ("provider": "exa"), checked by a trigger.
-- 2. claim_steps takes tokens from the provider's bucket (its row locked, so concurrent claimers
--    never overdraw it) and claims at most what the bucket, max_concurrency and daily_cap allow,
--    and what each batch's budget still covers. Rows of steps without a provider take the claim's
--    old path and cost nothing extra while no paid row is ready (see claim_steps below).
-- 3. defer_steps: the 429 path. IN_PROGRESS -> PENDING after Retry-After, the attempt refunded
--    (retry_from + 1, as release_steps and refund_rows do), at most config.max_rate_limited times
--    per row (default 10; past that a 429 is an ordinary retryable failure, so a provider that
--    always answers 429 still ends FAILED). It also slows the provider's whole bucket: no tokens
--    until Retry-After has passed, then the refill rate halved per 429 burst, recovering by half
--    every recovery_seconds.
-- 4. provider_costs: the ledger, one row per (batch, item, step, attempt, provider). record_costs
--    writes it in bulk before the verdicts of the same flush ("every paid call lands in a ledger
--    before its result is trusted"), idempotently; a trigger keeps batches.spent_usd in step.
-- 5. Budgets: batches.budget_usd (null: none), spent_usd, paused_reason, and use_cache (read by the
--    result cache, 20261130001300). Once spent reaches the budget, no paid row of the batch is
--    claimed and paused_reason says why; raising the budget clears it and wakes the conductor.
--    batch_progress gains "cost" (batch_cost): a later redefinition of batch_progress keeps it.

-- Providers ---------------------------------------------------------------------------------------

create table public.providers (
  name text primary key
    constraint providers_name_format check (name ~ '^[a-z][a-z0-9_]{0,62}$'),
  -- The token bucket: calls per second on average, and how many may go at once after a pause.
  requests_per_second numeric not null
    constraint providers_requests_per_second check (requests_per_second > 0),
  burst integer not null constraint providers_burst check (burst >= 1),
  -- Calls in flight at once (QUEUED or IN_PROGRESS rows, not ASYNC rows awaiting their callback);
  -- null: unlimited.
  max_concurrency integer constraint providers_max_concurrency check (max_concurrency >= 1),
  -- Calls per UTC day; null: unlimited.
  daily_cap integer constraint providers_daily_cap check (daily_cap >= 0),
  -- What one call is expected to cost, for budgets (a step's config.cost_usd wins). The ledger
  -- records what calls actually cost.
  cost_usd numeric constraint providers_cost_usd check (cost_usd >= 0),
  -- After 429s the refill rate is divided by `slowdown`, which halves every recovery_seconds.
  recovery_seconds numeric not null default 10
    constraint providers_recovery_seconds check (recovery_seconds > 0),
  description text,
  -- The bucket's shared state, written by claim_steps and defer_steps with the row locked.
  -- tokens null: full (a new row).
  tokens numeric constraint providers_tokens check (tokens >= 0),
  refilled_at timestamptz not null default now(),
  blocked_until timestamptz,
  slowdown numeric not null default 1 constraint providers_slowdown check (slowdown >= 1),
  slowed_at timestamptz,
  rate_limited bigint not null default 0,  -- 429 answers seen
  calls_day date,
  calls_today integer not null default 0,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

comment on table public.providers is
  'Paid APIs shared by every worker: rate limits enforced by claim_steps, 429s by defer_steps.';

-- Exa's documented default: /search 10 QPS ("Rate Limits", https://exa.ai/docs/reference/rate-limits:
-- /search 10 QPS, /contents 100 QPS, /answer 10 QPS; higher limits on an Enterprise plan). Burst 10:
-- Exa documents no burst allowance, so at most one second's worth at once. $0.007 per search
-- (Search: $7 / 1k requests, up to 10 results: https://exa.ai/docs/reference/pricing).
insert into public.providers (name, requests_per_second, burst, cost_usd, description)
values ('exa', 10, 10, 0.007,
        'Exa search API: 10 QPS on /search by default (exa.ai/docs/reference/rate-limits); $7 per 1k searches')
on conflict (name) do nothing;

create function public.providers_touch() returns trigger
language plpgsql
as $$
begin
  if tg_op = 'DELETE' or new.name is distinct from old.name then
    if exists (select 1 from enrichment_registry r where r.config ->> 'provider' = old.name) then
      raise exception 'provider "%" is named by step(s) %', old.name,
        (select string_agg(r.step_name, ', ' order by r.step_name) from enrichment_registry r
         where r.config ->> 'provider' = old.name)
        using errcode = '22023', hint = 'change those steps'' config.provider first';
    end if;
  end if;
  if tg_op = 'DELETE' then
    return old;
  end if;
  -- Limits edited (Studio, SQL): the bucket keeps its state; only the edit time changes.
  if (new.requests_per_second, new.burst, new.max_concurrency, new.daily_cap, new.cost_usd,
      new.recovery_seconds, new.description)
     is distinct from
     (old.requests_per_second, old.burst, old.max_concurrency, old.daily_cap, old.cost_usd,
      old.recovery_seconds, old.description) then
    new.updated_at := now();
  end if;
  return new;
end
$$;

create trigger providers_touch
  before update or delete on public.providers
  for each row execute function public.providers_touch();

-- The bucket, computed (nothing written) ---------------------------------------------------------

-- The factor the refill rate is divided by at p_at: doubled by a burst of 429s, halving every
-- recovery_seconds once the provider's Retry-After has passed. 1: full speed.
create function public.provider_slowdown(p public.providers, p_at timestamptz) returns numeric
language sql stable
as $$
  select greatest(1::numeric, p.slowdown * power(0.5::numeric,
    greatest(0::numeric, extract(epoch from p_at - greatest(coalesce(p.slowed_at, p_at),
                                                            coalesce(p.blocked_until, p_at))))
    / p.recovery_seconds))
$$;

-- Whole and fractional tokens in the bucket at p_at: none while blocked by a Retry-After, else
-- what was left plus the refill since (at the slowed-down rate), capped at burst.
create function public.provider_tokens(p public.providers, p_at timestamptz) returns numeric
language sql stable
as $$
  select case
    when p.blocked_until is not null and p_at < p.blocked_until then 0::numeric
    else least(p.burst::numeric,
               coalesce(p.tokens, p.burst::numeric)
               + p.requests_per_second / public.provider_slowdown(p, p_at)
                 * greatest(0::numeric, extract(epoch from
                     p_at - greatest(p.refilled_at, coalesce(p.blocked_until, p.refilled_at)))))
  end
$$;

create function public.utc_day(p_at timestamptz) returns date
language sql immutable
as $$ select (p_at at time zone 'UTC')::date $$;

-- Calls claimed today (UTC), from the counter claim_steps keeps.
create function public.provider_calls_today(p public.providers, p_at timestamptz) returns integer
language sql stable
as $$ select case when p.calls_day = public.utc_day(p_at) then p.calls_today else 0 end $$;

-- Registry config: provider, cost_usd, max_rate_limited -------------------------------------------

create function public.step_provider(p_config jsonb) returns text
language sql immutable
as $$ select p_config ->> 'provider' $$;

-- 429s a row may answer with before they count as failed attempts.
create function public.step_max_rate_limited(p_config jsonb) returns integer
language sql immutable
as $$ select coalesce((p_config ->> 'max_rate_limited')::integer, 10) $$;

create function public.registry_check_provider() returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_provider jsonb := new.config -> 'provider';
  v_cost jsonb := new.config -> 'cost_usd';
  v_max jsonb := new.config -> 'max_rate_limited';
begin
  if v_provider is not null then
    if jsonb_typeof(v_provider) <> 'string'
       or not exists (select 1 from providers p where p.name = new.config ->> 'provider') then
      raise exception 'step "%": config.provider = % names no row of providers', new.step_name, v_provider
        using errcode = '22023',
              hint = format('known providers: %s', coalesce(
                (select string_agg(p.name, ', ' order by p.name) from providers p), '(none)'));
    end if;
  end if;
  if v_cost is not null and (jsonb_typeof(v_cost) <> 'number' or (v_cost)::numeric < 0) then
    raise exception 'step "%": config.cost_usd = % is not valid', new.step_name, v_cost
      using errcode = '22023', hint = 'cost_usd is the expected cost of one call in USD, >= 0';
  end if;
  if v_max is not null and (jsonb_typeof(v_max) <> 'number' or (v_max)::numeric < 0
                            or (v_max)::numeric <> trunc((v_max)::numeric)) then
    raise exception 'step "%": config.max_rate_limited = % is not valid', new.step_name, v_max
      using errcode = '22023', hint = 'max_rate_limited is an integer >= 0 (0: a 429 is a failure)';
  end if;
  return new;
end
$$;

create trigger enrichment_registry_check_provider
  before insert or update of config on public.enrichment_registry
  for each row execute function public.registry_check_provider();

-- Budgets -----------------------------------------------------------------------------------------

alter table public.batches
  add column budget_usd numeric constraint batches_budget_usd check (budget_usd >= 0),
  add column use_cache boolean not null default true,
  add column spent_usd numeric not null default 0 constraint batches_spent_usd check (spent_usd >= 0),
  add column paused_reason text;

comment on column public.batches.budget_usd is
  'USD the batch may spend on paid providers (null: no limit). Once spent_usd reaches it, no paid row '
  'is claimed (paused_reason says so); raising it resumes the batch.';
comment on column public.batches.use_cache is
  'false: paid steps call their provider even when the result cache has an answer (--no-cache).';
comment on column public.batches.spent_usd is
  'What the batch''s provider calls cost so far: the sum of its provider_costs rows.';
comment on column public.batches.paused_reason is
  'Why paid rows of the batch are not claimed (the budget); null when nothing holds them back.';

create function public.format_usd(p_value numeric) returns text
language sql immutable
as $$ select '$' || to_char(round(p_value, 4), 'FM999999999990.0099') $$;

create function public.budget_reached_reason(p_spent numeric, p_budget numeric) returns text
language sql immutable
as $$ select format('budget reached: %s of %s', public.format_usd(p_spent), public.format_usd(p_budget)) $$;

-- A new batch starts with nothing spent; a changed budget clears or sets the pause.
create function public.batches_budget() returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
begin
  if tg_op = 'INSERT' then
    new.spent_usd := 0;
    new.paused_reason := null;
  elsif new.budget_usd is distinct from old.budget_usd then
    new.paused_reason := case
      when new.budget_usd is null or new.budget_usd > new.spent_usd then null
      else budget_reached_reason(new.spent_usd, new.budget_usd) end;
  end if;
  return new;
end
$$;

create trigger batches_budget
  before insert or update of budget_usd on public.batches
  for each row execute function public.batches_budget();

-- Raising (or changing) a budget wakes the conductor, as a state change does (20261122000300):
-- one notification per changed batch, the same channel and payload shape, and the Database
-- Webhook on Supabase.
create function public.notify_budget_change() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_change jsonb;
begin
  v_change := jsonb_build_object(
    'op', 'BUDGET',
    'batch_ids', jsonb_build_array(new.id),
    'more_batches', false,
    'ready', (select count(*) from workflow_states ws
              where ws.batch_id = new.id and ws.status = 'PENDING'),
    'finished', 0);
  perform pg_notify('enrichment_state_changed', v_change::text);
  if to_regprocedure('net.http_post(text, jsonb, jsonb, jsonb, integer)') is not null
     and to_regprocedure('public.state_webhook_notify(jsonb)') is not null then
    perform public.state_webhook_notify(v_change);
  end if;
  return null;
end
$$;

create trigger batches_notify_budget_change
  after update of budget_usd on public.batches
  for each row
  when (new.budget_usd is distinct from old.budget_usd
        and new.status in ('PENDING', 'IN_PROGRESS'))
  execute function public.notify_budget_change();

-- Sets a batch's budget (null: none) and returns {batch_id, budget_usd, spent_usd,
-- paused_reason}. Same as an UPDATE from Studio.
create function public.set_batch_budget(p_batch_id uuid, p_budget_usd numeric) returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_batch batches;
begin
  if p_budget_usd is not null and p_budget_usd < 0 then
    raise exception 'a budget is an amount of USD >= 0, got %', p_budget_usd using errcode = '22023';
  end if;
  perform require_batch(p_batch_id);
  update batches set budget_usd = p_budget_usd, updated_at = now()
  where id = p_batch_id
  returning * into v_batch;
  if not found then  -- visible to require_batch but not updatable: another client's (RLS)
    raise exception 'batch % not found', p_batch_id using errcode = 'P0002';
  end if;
  return jsonb_build_object('batch_id', v_batch.id, 'budget_usd', v_batch.budget_usd,
                            'spent_usd', v_batch.spent_usd, 'paused_reason', v_batch.paused_reason);
end
$$;

-- The cost ledger ---------------------------------------------------------------------------------

create table public.provider_costs (
  batch_id uuid not null,
  item_id uuid not null,
  step_name text not null,
  attempt integer not null,
  provider text not null,
  units numeric not null default 0 constraint provider_costs_units check (units >= 0),
  usd numeric not null default 0 constraint provider_costs_usd check (usd >= 0),
  -- Served from the result cache: the provider was not called (usd 0).
  cached boolean not null default false,
  created_at timestamptz not null default now(),
  primary key (batch_id, item_id, step_name, attempt, provider),
  foreign key (batch_id, item_id) references public.batch_items (batch_id, id) on delete cascade
);

comment on table public.provider_costs is
  'Every paid provider call (and every cache hit, at zero), recorded before its result is trusted.';

-- batches.spent_usd follows the ledger, whoever inserts (record_costs, the cache, SQL).
create function public.provider_costs_spend() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  -- Ordered by id: two recorders never lock batches in opposite orders.
  perform 1 from batches b
  where b.id in (select n.batch_id from new_costs n where n.usd <> 0)
  order by b.id
  for update;
  update batches b
  set spent_usd = b.spent_usd + s.usd,
      paused_reason = case
        when b.budget_usd is not null and b.spent_usd + s.usd >= b.budget_usd
        then budget_reached_reason(b.spent_usd + s.usd, b.budget_usd)
        else b.paused_reason end,
      updated_at = now()
  from (select n.batch_id, sum(n.usd) as usd from new_costs n group by n.batch_id
        having sum(n.usd) <> 0) s
  where b.id = s.batch_id;
  return null;
end
$$;

create trigger provider_costs_spend
  after insert on public.provider_costs
  referencing new table as new_costs
  for each statement execute function public.provider_costs_spend();

-- Records what provider calls cost, in bulk, before the verdicts they led to are written.
-- Idempotent: a repeat (after a lost answer) records nothing twice. Not fenced by attempt: a call a
-- stale attempt made was still paid for.
-- p_costs: [{batch_id, item_id, step_name, attempt, provider, units, usd, cached}]
-- outcome: ok (recorded) | duplicate (already recorded) | not_found (no such item any more)
create function public.record_costs(p_costs jsonb)
returns table (batch_id uuid, item_id uuid, step_name text, attempt integer, provider text, outcome text)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
  perform require_task_array(p_costs);
  if exists (
    select 1 from jsonb_array_elements(p_costs) e
    where jsonb_typeof(e -> 'provider') is distinct from 'string'
       or jsonb_typeof(e -> 'usd') is distinct from 'number' or (e ->> 'usd')::numeric < 0
       or (e ? 'units' and (jsonb_typeof(e -> 'units') <> 'number' or (e ->> 'units')::numeric < 0))
       or (e ? 'cached' and jsonb_typeof(e -> 'cached') <> 'boolean')) then
    raise exception 'every cost needs a provider (a string) and usd (a number >= 0); units >= 0 and cached are optional'
      using errcode = '22023';
  end if;
  -- A lost record would under-report what was spent: it must survive a crash.
  perform durable_commit();
  return query
  with input as (
    select * from jsonb_to_recordset(p_costs)
      as t(batch_id uuid, item_id uuid, step_name text, attempt integer, provider text,
           units numeric, usd numeric, cached boolean)
  ), recorded as (
    insert into provider_costs as pc (batch_id, item_id, step_name, attempt, provider, units, usd, cached)
    select i.batch_id, i.item_id, i.step_name, i.attempt, i.provider, coalesce(i.units, 0), i.usd,
           coalesce(i.cached, false)
    from input i
    join batch_items bi on bi.batch_id = i.batch_id and bi.id = i.item_id
    on conflict do nothing
    returning pc.batch_id, pc.item_id, pc.step_name, pc.attempt, pc.provider
  )
  select i.batch_id, i.item_id, i.step_name, i.attempt, i.provider,
         case when r.item_id is not null then 'ok'
              when exists (select 1 from provider_costs pc
                           where pc.batch_id = i.batch_id and pc.item_id = i.item_id
                             and pc.step_name = i.step_name and pc.attempt = i.attempt
                             and pc.provider = i.provider) then 'duplicate'
              else 'not_found' end
  from input i
  left join recorded r
    on r.batch_id = i.batch_id and r.item_id = i.item_id and r.step_name = i.step_name
   and r.attempt = i.attempt and r.provider = i.provider;
end
$$;

-- Claiming ----------------------------------------------------------------------------------------

-- Ready rows by (batch, step), in claim order within the pair. Paid rows are claimed through it,
-- pair by pair, so rows held back (by a bucket, a cap or a budget) are never walked through; the
-- rest of the claim uses it only while some paid row is ready (see claim_steps). One entry per
-- PENDING row, like workflow_states_ready.
create index workflow_states_ready_by_batch_step on public.workflow_states (batch_id, step_name, run_after, id)
  where status = 'PENDING';

-- The cache and conditions (20261130001300) resolve rows of paid steps before any token is taken:
-- a cache hit or a skipped row never waits for, nor uses, the provider's bucket. A stub until then.
create function public.settle_without_provider(p_step_names text[], p_batch_ids uuid[])
returns integer
language plpgsql
set search_path = public, pg_temp
as $$
begin
  return 0;
end
$$;

-- The claim's last statement, for whatever rows it picked and locked: QUEUED, attempt + 1, a
-- lease, and the batches it starts.
create function public.claim_rows(p_ids bigint[], p_owner text)
returns table (
  batch_id uuid,
  item_id uuid,
  step_name text,
  attempt integer,
  modal_function_name text,
  step_type public.step_type,
  lease_expires_at timestamptz
)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
  return query
  with claimed as (
    update workflow_states ws
    set status = 'QUEUED', attempt = ws.attempt + 1, lease_expires_at = now() + step_timeout(r.config),
        started_at = null, lease_owner = p_owner, updated_at = now()
    from enrichment_registry r
    where ws.id = any(p_ids) and r.step_name = ws.step_name
    returning ws.batch_id, ws.item_id, ws.step_name, ws.attempt, r.modal_function_name, r.type,
              ws.lease_expires_at
  ), batches_started as (
    update batches b set status = 'IN_PROGRESS', started_at = coalesce(b.started_at, now()), updated_at = now()
    where b.id in (select distinct c.batch_id from claimed c) and b.status = 'PENDING'
  )
  select * from claimed;
end
$$;

-- claim_steps, with providers and budgets.
--
-- While no row of a paid step (one whose config names a provider) is ready, the claim is the walk
-- it always was (20261130001000: workflow_states_ready in order, enable_sort off), minus paid
-- steps, which it never claims: a paid row that becomes ready meanwhile waits for the next claim.
-- Asking whether a paid row is ready costs one index probe per (unfinished batch, paid step of its
-- blueprint), so steps without a provider cost nothing extra.
--
-- Once paid rows are ready:
--   1. each provider's row is locked (in name order; defer_steps takes them in the same order), its
--      bucket refilled, and the claim takes at most floor(tokens), what max_concurrency leaves
--      (rows of its steps QUEUED or IN_PROGRESS, not awaiting a callback) and what daily_cap
--      leaves (calls claimed today), then the tokens it used;
--   2. within that, each batch with a budget gets at most what its remaining budget covers at the
--      step's expected cost per call (config.cost_usd, else the provider's cost_usd, else 0),
--      remaining = budget - spent - the expected cost of its paid rows already in flight (claimed,
--      not yet in the ledger). So a batch overshoots its budget only by what calls in flight cost
--      beyond their expected cost (and, for a batch with two providers, by one claim of the other
--      provider running at the same moment). A batch that cannot pay for one more call is skipped,
--      and paused_reason says so once spent itself leaves no room;
--   3. rows of other steps are claimed pair by pair (unfinished batch, step), the same order
--      (later blueprint steps first, then oldest), without walking through the paid rows held
--      back in front of them.
-- Every row is still locked FOR UPDATE SKIP LOCKED: concurrent claimers never get the same row,
-- and the provider row lock makes them take tokens one after the other. The rows picked are
-- locked by id, their status compared as text so that the primary key, not a partial index on
-- status, finds them (as in 20261130001000). enable_sort off (20261130001000) puts a huge cost on
-- the small sorts the pair-by-pair merge needs, which would make PostgreSQL JIT-compile them
-- (a quarter of a second per claim): jit is off.
drop function public.claim_steps(integer, text[], uuid[], text);

create function public.claim_steps(
  p_limit integer default 100,
  p_step_names text[] default null,
  p_batch_ids uuid[] default null,
  p_owner text default null
) returns table (
  batch_id uuid,
  item_id uuid,
  step_name text,
  attempt integer,
  modal_function_name text,
  step_type public.step_type,
  lease_expires_at timestamptz
)
language plpgsql
set search_path = public, pg_temp
set enable_sort = off
set jit = off
as $$
#variable_conflict use_column
declare
  v_paid jsonb;            -- {step_name: {"provider": name, "cost": usd per call}} of every paid step
  v_paid_steps text[];
  v_pairs jsonb;           -- (batch, paid step) pairs with ready rows, and the batch's budget
  v_ids bigint[] := '{}';
  v_got bigint[];
  v_left integer := p_limit;
  v_provider text;
  v_p providers;
  v_now timestamptz;
  v_tokens numeric;
  v_allow integer;
  v_committed jsonb := '{}';  -- {batch_id: expected cost of the paid rows claimed so far}
  v_inflight jsonb;           -- {batch_id: expected cost of its paid rows in flight, "provider": n}
begin
  if p_limit is null or p_limit < 1 or p_limit > 50000 then
    raise exception 'claim limit must be between 1 and 50000, got %', p_limit using errcode = '22023';
  end if;
  -- A lost claim would hand its attempt number out again after a crash: fencing needs it durable.
  perform durable_commit();
  perform settle_without_provider(p_step_names, p_batch_ids);

  select coalesce(jsonb_object_agg(r.step_name, jsonb_build_object(
           'provider', p.name, 'cost', coalesce((r.config ->> 'cost_usd')::numeric, p.cost_usd, 0))),
         '{}'::jsonb),
         coalesce(array_agg(r.step_name), '{}')
    into v_paid, v_paid_steps
  from enrichment_registry r
  join providers p on p.name = step_provider(r.config);

  if cardinality(v_paid_steps) > 0 then
    select coalesce(jsonb_agg(jsonb_build_object(
             'batch_id', b.id, 'step_name', s.step_name, 'step_index', s.ord - 1,
             'provider', v_paid -> s.step_name ->> 'provider',
             'cost', (v_paid -> s.step_name ->> 'cost')::numeric,
             'budget', b.budget_usd, 'spent', b.spent_usd, 'paused', b.paused_reason is not null)),
           '[]'::jsonb)
      into v_pairs
    from batches b
    cross join lateral jsonb_array_elements_text(b.blueprint) with ordinality s(step_name, ord)
    -- One probe of workflow_states_ready_by_batch_step per pair: the ORDER BY is the index's,
    -- which rules out the plans the planner otherwise picks from its row estimates, each a scan
    -- of every ready row (as EXISTS: all of them, made unique, 22 ms at 60,000 ready rows; as a
    -- bare LIMIT 1: a sequential scan that met the batch's rows only after 1.5 million others).
    cross join lateral (
      select ws.run_after from workflow_states ws
      where ws.batch_id = b.id and ws.step_name = s.step_name
        and ws.status = 'PENDING' and ws.run_after <= now()
      order by ws.run_after
      limit 1
    ) ready
    where b.status in ('PENDING', 'IN_PROGRESS') and b.cancelled_at is null
      and (p_batch_ids is null or b.id = any(p_batch_ids))
      and (p_step_names is null or s.step_name = any(p_step_names))
      and s.step_name = any(v_paid_steps);
  end if;

  if cardinality(v_paid_steps) = 0 or v_pairs = '[]'::jsonb then
    return query select * from claim_rows(array(
      select ws.id from workflow_states ws
      where ws.status = 'PENDING' and ws.run_after <= now()
        and (p_step_names is null or ws.step_name = any(p_step_names))
        and (p_batch_ids is null or ws.batch_id = any(p_batch_ids))
        and not (ws.step_name = any(v_paid_steps))
        and not exists (select 1 from batches cb where cb.id = ws.batch_id and cb.cancelled_at is not null)
      order by ws.step_index desc, ws.run_after, ws.id
      limit p_limit
      for update of ws skip locked), p_owner);
    return;
  end if;

  -- 1 and 2: paid rows, provider by provider.
  for v_provider in
    select distinct pr.provider from jsonb_to_recordset(v_pairs) as pr(provider text) order by 1
  loop
    exit when v_left <= 0;
    select * into v_p from providers p where p.name = v_provider for update;
    v_now := clock_timestamp();
    v_tokens := provider_tokens(v_p, v_now);
    v_allow := least(v_left, floor(v_tokens)::integer);
    if v_allow > 0 and v_p.daily_cap is not null then
      v_allow := least(v_allow, v_p.daily_cap - provider_calls_today(v_p, v_now));
    end if;
    -- Rows in flight, counted now that the provider is locked (claims of it are serialized, so
    -- none is missed): its own for max_concurrency, each budgeted batch's (every provider) for
    -- its budget. Scanned only when a cap or a budget needs them.
    v_inflight := '{}';
    if v_allow > 0 and (v_p.max_concurrency is not null or exists (
          select 1 from jsonb_to_recordset(v_pairs) as pr(provider text, budget numeric)
          where pr.provider = v_provider and pr.budget is not null)) then
      select coalesce(jsonb_object_agg(x.key, x.value), '{}'::jsonb) into v_inflight
      from (
        select ws.batch_id::text as key, sum((v_paid -> ws.step_name ->> 'cost')::numeric) as value
        from workflow_states ws
        where ws.status in ('QUEUED', 'IN_PROGRESS') and ws.step_name = any(v_paid_steps)
          and awaiting_callback(ws.status, ws.attempt, ws.meta) is not true
        group by ws.batch_id
        union all
        select 'provider', count(*) from workflow_states ws
        where ws.status in ('QUEUED', 'IN_PROGRESS')
          and v_paid -> ws.step_name ->> 'provider' = v_provider
          and awaiting_callback(ws.status, ws.attempt, ws.meta) is not true
      ) x;
      if v_p.max_concurrency is not null then
        v_allow := least(v_allow, v_p.max_concurrency - (v_inflight ->> 'provider')::integer);
      end if;
    end if;
    continue when v_allow <= 0;

    v_got := array(
      select ws.id from workflow_states ws
      where ws.id = any(array(
          select t.id from (
            select c.id, c.remaining,
                   sum(c.cost) over (partition by c.batch_id
                                     order by c.step_index desc, c.run_after, c.id) as spend
            from (
              select c.id, c.run_after, pr.batch_id, pr.step_index, pr.cost, pr.remaining
              from (
                select pr.batch_id, pr.step_name, pr.step_index, pr.cost,
                       pr.budget - pr.spent
                         - coalesce((v_committed ->> pr.batch_id::text)::numeric, 0)
                         - coalesce((v_inflight ->> pr.batch_id::text)::numeric, 0) as remaining
                from jsonb_to_recordset(v_pairs)
                  as pr(batch_id uuid, step_name text, step_index integer, provider text,
                        cost numeric, budget numeric, spent numeric)
                where pr.provider = v_provider
              ) pr
              cross join lateral (
                select ws.id, ws.run_after from workflow_states ws
                where ws.batch_id = pr.batch_id and ws.step_name = pr.step_name
                  and ws.status = 'PENDING' and ws.run_after <= now()
                order by ws.run_after, ws.id
                limit v_allow
              ) c
              where pr.remaining is null or (pr.remaining > 0 and pr.remaining >= pr.cost)
              order by pr.step_index desc, c.run_after, c.id
              limit v_allow
            ) c
          ) t
          where t.remaining is null or t.spend <= t.remaining))
        and ws.status::text = 'PENDING' and ws.run_after <= now()
      for update of ws skip locked);

    if cardinality(v_got) > 0 then
      update providers p
      set tokens = greatest(v_tokens - cardinality(v_got), 0), refilled_at = v_now,
          calls_today = provider_calls_today(v_p, v_now) + cardinality(v_got),
          calls_day = utc_day(v_now)
      where p.name = v_provider;
      select v_committed || coalesce(jsonb_object_agg(x.batch_id::text,
               coalesce((v_committed ->> x.batch_id::text)::numeric, 0) + x.cost), '{}'::jsonb)
        into v_committed
      from (select ws.batch_id, sum((v_paid -> ws.step_name ->> 'cost')::numeric) as cost
            from workflow_states ws where ws.id = any(v_got) group by ws.batch_id) x;
      v_ids := v_ids || v_got;
      v_left := v_left - cardinality(v_got);
    end if;
  end loop;

  -- Batches whose budget cannot pay for one more call of a step with ready rows say so. After
  -- the providers: every transition locks providers, then rows, then batches (defer_steps too).
  update batches b
  set paused_reason = budget_reached_reason(b.spent_usd, b.budget_usd), updated_at = now()
  where b.id in (select pr.batch_id
                 from jsonb_to_recordset(v_pairs)
                   as pr(batch_id uuid, cost numeric, budget numeric, spent numeric, paused boolean)
                 where pr.budget is not null and not pr.paused
                   and (pr.spent >= pr.budget or pr.spent + pr.cost > pr.budget))
    and b.paused_reason is null and b.budget_usd is not null;

  -- 3: rows of steps without a provider, pair by pair.
  if v_left > 0 then
    v_got := array(
      select ws.id from workflow_states ws
      where ws.id = any(array(
          select c.id
          from (
            select b.id as batch_id, s.step_name, s.ord - 1 as step_index
            from batches b
            cross join lateral jsonb_array_elements_text(b.blueprint) with ordinality s(step_name, ord)
            where b.status in ('PENDING', 'IN_PROGRESS') and b.cancelled_at is null
              and (p_batch_ids is null or b.id = any(p_batch_ids))
              and (p_step_names is null or s.step_name = any(p_step_names))
              and not (s.step_name = any(v_paid_steps))
          ) pr
          cross join lateral (
            select ws.id, ws.run_after from workflow_states ws
            where ws.batch_id = pr.batch_id and ws.step_name = pr.step_name
              and ws.status = 'PENDING' and ws.run_after <= now()
            order by ws.run_after, ws.id
            limit v_left
          ) c
          order by pr.step_index desc, c.run_after, c.id
          limit v_left))
        and ws.status::text = 'PENDING' and ws.run_after <= now()
      for update of ws skip locked);
    v_ids := v_ids || v_got;
  end if;

  return query select * from claim_rows(v_ids, p_owner);
end
$$;

-- The 429 path ------------------------------------------------------------------------------------

-- A provider answered 429 (rate limited). p_deferrals: [{batch_id, item_id, step_name, attempt,
-- provider, retry_after_seconds (null: the step's backoff), error}]
--   - the provider's bucket slows down (every row named, current attempt or not: the 429 happened):
--     no tokens before now + the longest Retry-After (1 s when none was given), the refill rate
--     halved (at most once a second however many 429s arrive together), recovering by half every
--     recovery_seconds;
--   - an IN_PROGRESS row of that attempt goes back to PENDING after its Retry-After, its attempt
--     refunded, while it has been rate limited fewer than config.max_rate_limited times; past
--     that, it fails like any retryable error (an attempt used, FAILED when none is left).
-- outcome and status as fail_steps: the row's status afterwards, PENDING or FAILED.
create function public.defer_steps(p_deferrals jsonb)
returns table (batch_id uuid, item_id uuid, step_name text, attempt integer, outcome text, status public.workflow_status)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_rows jsonb;
  v_now timestamptz := clock_timestamp();
begin
  perform require_task_array(p_deferrals);
  if exists (
    select 1 from jsonb_array_elements(p_deferrals) e
    where (e ? 'retry_after_seconds' and jsonb_typeof(e -> 'retry_after_seconds') <> 'null'
           and (jsonb_typeof(e -> 'retry_after_seconds') <> 'number'
                or (e ->> 'retry_after_seconds')::numeric < 0))
       or (e ? 'provider' and jsonb_typeof(e -> 'provider') not in ('string', 'null'))) then
    raise exception 'retry_after_seconds must be a number of seconds >= 0 (or null), provider a name'
      using errcode = '22023';
  end if;

  -- The providers first, in name order (as claim_steps locks them), then the rows.
  with input as (
    select * from jsonb_to_recordset(p_deferrals)
      as t(step_name text, provider text, retry_after_seconds numeric)
  ), named as (
    select coalesce(p_named.name, p_step.name) as provider,
           max(least(coalesce(i.retry_after_seconds, 1), 3600)) as wait, count(*) as answers
    from input i
    left join providers p_named on p_named.name = i.provider
    left join enrichment_registry r on r.step_name = i.step_name
    left join providers p_step on p_step.name = step_provider(r.config)
    where coalesce(p_named.name, p_step.name) is not null
    group by 1
  ), locked as (
    select p.name from providers p where p.name in (select n.provider from named n)
    order by p.name for update
  )
  update providers p
  set tokens = 0,
      refilled_at = greatest(p.refilled_at, v_now),
      blocked_until = greatest(coalesce(p.blocked_until, v_now), v_now + make_interval(secs => n.wait::float8)),
      slowdown = case when p.slowed_at is null or p.slowed_at < v_now - interval '1 second'
                      then least(provider_slowdown(p, v_now) * 2, 64) else p.slowdown end,
      slowed_at = case when p.slowed_at is null or p.slowed_at < v_now - interval '1 second'
                       then v_now else p.slowed_at end,
      rate_limited = p.rate_limited + n.answers
  from named n, (select count(*) from locked) l
  where p.name = n.provider;

  with input as (
    select * from jsonb_to_recordset(p_deferrals)
      as t(batch_id uuid, item_id uuid, step_name text, attempt integer, retry_after_seconds numeric,
           error text)
  ), matched as (
    select ws.id, ws.attempt, ws.meta, r.config, i.retry_after_seconds,
           left(coalesce(i.error, 'rate limited (HTTP 429)'), 2000) as error
    from input i
    join workflow_states ws
      on ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
    join enrichment_registry r on r.step_name = ws.step_name
    where ws.attempt = i.attempt and ws.status::text = 'IN_PROGRESS'
    for update of ws
  ), deferred as (
    update workflow_states ws
    set status = 'PENDING', lease_expires_at = null, started_at = null,
        run_after = now() + coalesce(make_interval(secs => m.retry_after_seconds::float8),
                                     step_backoff(m.config, coalesce((m.meta ->> 'rate_limited')::integer, 0) + 1)),
        retry_from = ws.retry_from + 1, updated_at = now(),
        meta = ws.meta || jsonb_build_object(
          'rate_limited', coalesce((ws.meta ->> 'rate_limited')::integer, 0) + 1,
          'last_error', jsonb_build_object(
            'message', m.error, 'kind', 'rate_limited', 'attempt', ws.attempt, 'at', now(),
            'will_retry', true, 'retry_after_seconds', m.retry_after_seconds))
    from matched m
    where ws.id = m.id
      and coalesce((m.meta ->> 'rate_limited')::integer, 0) < step_max_rate_limited(m.config)
    returning ws.id, ws.batch_id, ws.status
  )
  select jsonb_build_object(
           'deferred', coalesce((select jsonb_agg(to_jsonb(d)) from deferred d), '[]'::jsonb),
           'exhausted', coalesce((select jsonb_agg(jsonb_build_object(
                          'id', m.id, 'retryable', true, 'kind', 'rate_limited',
                          'error', format('%s (rate limited again past max_rate_limited = %s: '
                                          'counted as a failed attempt)',
                                          m.error, step_max_rate_limited(m.config))))
                        from matched m
                        where coalesce((m.meta ->> 'rate_limited')::integer, 0)
                              >= step_max_rate_limited(m.config)), '[]'::jsonb))
    into v_rows;

  -- Past max_rate_limited: an ordinary retryable failure. Decide first, report after.
  select (v_rows -> 'deferred') || coalesce(jsonb_agg(to_jsonb(f)), '[]'::jsonb) into v_rows
  from fail_rows(v_rows -> 'exhausted') f;

  return query
  with input as (
    select * from jsonb_to_recordset(p_deferrals) as t(batch_id uuid, item_id uuid, step_name text, attempt integer)
  ), done as (
    select * from jsonb_to_recordset(v_rows) as f(id bigint, status public.workflow_status)
  )
  select i.batch_id, i.item_id, i.step_name, i.attempt,
         call_outcome(d.id is not null, ws.attempt, i.attempt),
         ws.status
  from input i
  left join workflow_states ws
    on ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
  left join done d on d.id = ws.id;
end
$$;

-- Progress shows spend, the budget, a projection and the pause ----------------------------------

-- The "cost" part of batch_progress, from the step counts it has already made (p_steps:
-- {"<step>": {"COMPLETED": n, "FAILED": n, ...}}). Paid rows are rows of steps with a provider:
-- done = COMPLETED + FAILED; left = rows still to run (items not stopped by an earlier failure,
-- minus those done). The projection for the rest is spent / done x left, or the expected cost per
-- call x left before anything is done.
create function public.batch_cost(p_batch public.batches, p_steps jsonb) returns jsonb
language sql stable
set search_path = public, pg_temp
as $$
  with steps as (
    select s.step_name, s.ord,
           coalesce((p_steps -> s.step_name ->> 'COMPLETED')::bigint, 0) as completed,
           coalesce((p_steps -> s.step_name ->> 'FAILED')::bigint, 0) as failed,
           p.name is not null as paid,
           coalesce((r.config ->> 'cost_usd')::numeric, p.cost_usd, 0) as cost
    from jsonb_array_elements_text(p_batch.blueprint) with ordinality s(step_name, ord)
    left join enrichment_registry r on r.step_name = s.step_name
    left join providers p on p.name = step_provider(r.config)
  ), rows as (
    select st.*,
           greatest(p_batch.item_count
                    - coalesce(sum(st.failed) over (order by st.ord rows between unbounded preceding
                                                                       and 1 preceding), 0)
                    - st.completed - st.failed, 0) as left_rows
    from steps st
  ), totals as (
    select coalesce(jsonb_agg(x.step_name order by x.ord) filter (where x.paid), '[]'::jsonb) as paid_steps,
           coalesce(sum(x.completed + x.failed) filter (where x.paid), 0) as done,
           coalesce(sum(x.left_rows) filter (where x.paid), 0) as left_rows,
           coalesce(sum(x.left_rows * x.cost) filter (where x.paid), 0) as expected
    from rows x
  )
  select jsonb_build_object(
    'spent_usd', p_batch.spent_usd,
    'budget_usd', p_batch.budget_usd,
    -- A batch that finished (its last paid call reached the budget) is not paused.
    'paused_reason', case when p_batch.status in ('PENDING', 'IN_PROGRESS') then p_batch.paused_reason end,
    'use_cache', p_batch.use_cache,
    'paid_steps', t.paid_steps,
    'paid_rows_done', t.done,
    'paid_rows_left', t.left_rows,
    'projected_rest_usd', round(case when t.done > 0 then p_batch.spent_usd / t.done * t.left_rows
                                     else t.expected end, 6))
  from totals t
$$;

-- As 20261130000800's, plus "cost" (see batch_cost). The documented shape stays.
create or replace function public.batch_progress(p_batch_id uuid) returns jsonb
language plpgsql stable
set search_path = public, pg_temp
as $$
declare
  v_batch batches;
  v_steps jsonb;
  v_awaiting jsonb;
begin
  v_batch := require_batch(p_batch_id);
  select jsonb_object_agg(s.step_name, s.counts order by s.ord),
         jsonb_object_agg(s.step_name, s.awaiting order by s.ord)
    into v_steps, v_awaiting
  from (
    select bp.step_name, bp.ord,
           jsonb_build_object(
             'PENDING', count(*) filter (where ws.status = 'PENDING'),
             'QUEUED', count(*) filter (where ws.status = 'QUEUED'),
             'IN_PROGRESS', count(*) filter (where ws.status = 'IN_PROGRESS'),
             'COMPLETED', count(*) filter (where ws.status = 'COMPLETED'),
             'FAILED', count(*) filter (where ws.status = 'FAILED')) as counts,
           count(*) filter (where awaiting_callback(ws.status, ws.attempt, ws.meta)) as awaiting
    from jsonb_array_elements_text(v_batch.blueprint) with ordinality bp(step_name, ord)
    left join workflow_states ws on ws.batch_id = v_batch.id and ws.step_name = bp.step_name
    group by bp.step_name, bp.ord
  ) s;
  return jsonb_build_object(
    'batch_id', v_batch.id,
    'name', v_batch.name,
    'status', v_batch.status,
    'items', v_batch.item_count,
    'cancelled', v_batch.cancelled_at is not null,
    'blueprint', v_batch.blueprint,
    'steps', coalesce(v_steps, '{}'::jsonb),
    'awaiting_callback', coalesce(v_awaiting, '{}'::jsonb),
    'cost', batch_cost(v_batch, coalesce(v_steps, '{}'::jsonb)));
end
$$;

-- create_batch with a budget and the cache switch --------------------------------------------------

drop function public.create_batch(jsonb, jsonb, uuid, text);

create function public.create_batch(
  p_blueprint jsonb,
  p_items jsonb,
  p_client_id uuid default null,
  p_name text default null,
  p_budget_usd numeric default null,
  p_use_cache boolean default true
) returns uuid
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_batch_id uuid;
  v_bad bigint;
begin
  if p_items is null or jsonb_typeof(p_items) <> 'array' or jsonb_array_length(p_items) = 0 then
    raise exception 'items must be a non-empty JSON array of objects' using errcode = '22023';
  end if;
  select n into v_bad from jsonb_array_elements(p_items) with ordinality e(value, n)
  where jsonb_typeof(e.value) <> 'object' limit 1;
  if v_bad is not null then
    raise exception 'item % of % is not a JSON object', v_bad, jsonb_array_length(p_items)
      using errcode = '22023';
  end if;
  if p_budget_usd is not null and p_budget_usd < 0 then
    raise exception 'a budget is an amount of USD >= 0, got %', p_budget_usd using errcode = '22023';
  end if;

  insert into batches (client_id, name, blueprint, budget_usd, use_cache)
  values (coalesce(p_client_id, request_client_id(), '00000000-0000-0000-0000-000000000000'::uuid),
          p_name, p_blueprint, p_budget_usd, coalesce(p_use_cache, true))
  returning id into v_batch_id;

  insert into batch_items (batch_id, raw_data)
  select v_batch_id, e.value
  from jsonb_array_elements(p_items) with ordinality e(value, n)
  order by e.n;
  return v_batch_id;
end
$$;

-- Row level security and privileges ---------------------------------------------------------------

alter table public.providers enable row level security;
alter table public.provider_costs enable row level security;

create policy providers_read on public.providers
  for select to authenticated using (true);
create policy provider_costs_read_own_client on public.provider_costs
  for select to authenticated using (public.owns_batch(batch_id));

revoke all on public.providers, public.provider_costs from anon, authenticated;
grant select on public.providers, public.provider_costs to authenticated;
grant all on public.providers, public.provider_costs to service_role;
-- Studio users set a batch's budget and cache switch; spent_usd and paused_reason are the
-- database's.
grant update (budget_usd, use_cache) on public.batches to authenticated;

revoke execute on function
  public.provider_slowdown(public.providers, timestamptz),
  public.provider_tokens(public.providers, timestamptz),
  public.utc_day(timestamptz),
  public.provider_calls_today(public.providers, timestamptz),
  public.step_provider(jsonb),
  public.step_max_rate_limited(jsonb),
  public.format_usd(numeric),
  public.budget_reached_reason(numeric, numeric),
  public.batches_budget(),
  public.notify_budget_change(),
  public.providers_touch(),
  public.registry_check_provider(),
  public.provider_costs_spend(),
  public.set_batch_budget(uuid, numeric),
  public.record_costs(jsonb),
  public.settle_without_provider(text[], uuid[]),
  public.claim_rows(bigint[], text),
  public.claim_steps(integer, text[], uuid[], text),
  public.defer_steps(jsonb),
  public.batch_cost(public.batches, jsonb),
  public.create_batch(jsonb, jsonb, uuid, text, numeric, boolean)
  from public, anon, authenticated;
grant execute on function
  public.record_costs(jsonb),
  public.settle_without_provider(text[], uuid[]),
  public.claim_rows(bigint[], text),
  public.claim_steps(integer, text[], uuid[], text),
  public.defer_steps(jsonb),
  public.set_batch_budget(uuid, numeric),
  public.create_batch(jsonb, jsonb, uuid, text, numeric, boolean)
  to service_role;
-- What a signed-in user may call (RLS applies: its own batches only). batch_progress calls
-- batch_cost, and a budget edit the batches_budget trigger, with their helpers, as the user.
grant execute on function
  public.create_batch(jsonb, jsonb, uuid, text, numeric, boolean),
  public.set_batch_budget(uuid, numeric),
  public.batch_cost(public.batches, jsonb),
  public.step_provider(jsonb),
  public.format_usd(numeric),
  public.budget_reached_reason(numeric, numeric)
  to authenticated;
