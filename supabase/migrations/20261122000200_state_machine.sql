-- The State API: every state change is one of these functions.
--
-- Row state machine:  PENDING -> QUEUED -> IN_PROGRESS -> COMPLETED | FAILED
--   claim_steps      PENDING (run_after passed) -> QUEUED, attempt + 1, lease = now + timeout
--   start_steps      QUEUED (or IN_PROGRESS, same attempt: a repeated start) -> IN_PROGRESS
--   complete_steps   IN_PROGRESS -> COMPLETED, upserts the result, seeds the next blueprint step
--   fail_steps       QUEUED | IN_PROGRESS -> PENDING with backoff while attempts remain, else FAILED
--   heartbeat_steps  IN_PROGRESS: extends the lease
--   sweep_expired_leases   QUEUED | IN_PROGRESS whose lease passed: as fail_steps, retryable
--   retry_failed     FAILED -> PENDING with a fresh attempt budget
--   cancel_batch     PENDING | QUEUED | IN_PROGRESS -> FAILED (meta.error = 'cancelled')
--
-- Every worker call names (batch_id, item_id, step_name, attempt) and is guarded by the expected
-- status and attempt, so a duplicate or late call changes nothing and says why in `outcome`:
--   ok | not_found | stale_attempt | wrong_status
-- Bulk forms take a JSON array of such objects, so one statement handles many rows.
-- Invalid arguments raise SQLSTATE 22023, an unknown batch P0002.

-- Registry config --------------------------------------------------------------------------------

create function public.step_timeout(p_config jsonb) returns interval
language sql immutable
as $$ select make_interval(secs => coalesce((p_config ->> 'timeout_seconds')::float8, 300)) $$;

create function public.step_max_attempts(p_config jsonb) returns integer
language sql immutable
as $$ select coalesce((p_config ->> 'max_attempts')::integer, 3) $$;

-- Delay before retry number n (n = 1 for the first retry): backoff_seconds * backoff_multiplier^(n-1),
-- capped at backoff_max_seconds, spread by +-backoff_jitter so rows that failed together (a rate
-- limit, an outage) do not all come back in the same instant.
create function public.step_backoff(p_config jsonb, p_retry integer) returns interval
language sql volatile
as $$
  select make_interval(secs =>
    least(
      coalesce((p_config ->> 'backoff_max_seconds')::float8, 300),
      coalesce((p_config ->> 'backoff_seconds')::float8, 5)
        * power(coalesce((p_config ->> 'backoff_multiplier')::float8, 2), greatest(p_retry - 1, 0))
    ) * (1 + coalesce((p_config ->> 'backoff_jitter')::float8, 0.1) * (2 * random() - 1))
  )
$$;

-- Registry rows are checked when written, so the casts above can never fail inside a transition.
create function public.registry_check() returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_key text;
  v_value jsonb;
  v_missing text;
begin
  foreach v_key in array array['timeout_seconds', 'backoff_seconds', 'backoff_multiplier',
                               'backoff_max_seconds', 'backoff_jitter', 'max_attempts'] loop
    v_value := new.config -> v_key;
    continue when v_value is null;
    if jsonb_typeof(v_value) <> 'number'
       or (v_key = 'max_attempts' and ((v_value)::numeric < 1 or (v_value)::numeric <> trunc((v_value)::numeric)))
       or (v_key in ('timeout_seconds') and (v_value)::numeric <= 0)
       or (v_key = 'backoff_multiplier' and (v_value)::numeric < 1)
       or (v_key = 'backoff_jitter' and ((v_value)::numeric < 0 or (v_value)::numeric > 1))
       or (v_value)::numeric < 0 then
      raise exception 'step "%": config.% = % is not valid', new.step_name, v_key, v_value
        using errcode = '22023',
              hint = 'timeout_seconds > 0, max_attempts an integer >= 1, backoff_seconds and '
                     'backoff_max_seconds >= 0, backoff_multiplier >= 1, backoff_jitter in [0, 1]';
    end if;
  end loop;

  if new.results_table is not null then
    if to_regclass(format('public.%I', new.results_table)) is null then
      raise exception 'step "%": results table public.% does not exist', new.step_name, new.results_table
        using errcode = '22023', hint = 'create it in a migration first, keyed by (batch_id, item_id)';
    end if;
    select string_agg(c, ', ') into v_missing
    from unnest(array['batch_id', 'item_id', 'attempt', 'result', 'updated_at']) c
    where not exists (
      select 1 from pg_attribute a
      where a.attrelid = format('public.%I', new.results_table)::regclass
        and a.attname = c and not a.attisdropped);
    if v_missing is not null then
      raise exception 'step "%": results table public.% lacks column(s) %',
        new.step_name, new.results_table, v_missing using errcode = '22023',
        hint = 'complete_steps upserts (batch_id, item_id, attempt, result, updated_at)';
    end if;
    -- complete_steps upserts ON CONFLICT (batch_id, item_id): that needs a unique key on exactly it.
    if not exists (
      select 1 from pg_index i
      where i.indrelid = format('public.%I', new.results_table)::regclass and i.indisunique
        and i.indpred is null
        and (select array_agg(a.attname::text order by a.attname) from pg_attribute a
             where a.attrelid = i.indrelid and a.attnum = any(i.indkey)) = array['batch_id', 'item_id']) then
      raise exception 'step "%": results table public.% needs a primary key or unique key on (batch_id, item_id)',
        new.step_name, new.results_table using errcode = '22023';
    end if;
  end if;
  new.updated_at := now();
  return new;
end
$$;

create trigger enrichment_registry_check
  before insert or update on public.enrichment_registry
  for each row execute function public.registry_check();

-- Blueprints --------------------------------------------------------------------------------------

create function public.validate_blueprint(p_blueprint jsonb) returns void
language plpgsql stable
set search_path = public, pg_temp
as $$
declare
  v_known text;
  v_bad jsonb;
  v_step text;
begin
  select coalesce(string_agg(step_name, ', ' order by step_name), '(none registered)')
    into v_known from enrichment_registry;
  if p_blueprint is null or jsonb_typeof(p_blueprint) <> 'array' then
    raise exception 'blueprint must be a JSON array of step names, got %', coalesce(p_blueprint::text, 'null')
      using errcode = '22023', hint = format('known steps: %s', v_known);
  end if;
  if jsonb_array_length(p_blueprint) = 0 then
    raise exception 'blueprint is empty: name at least one step'
      using errcode = '22023', hint = format('known steps: %s', v_known);
  end if;
  select e into v_bad from jsonb_array_elements(p_blueprint) e where jsonb_typeof(e) <> 'string' limit 1;
  if v_bad is not null then
    raise exception 'blueprint element % is not a step name (a string)', v_bad
      using errcode = '22023', hint = format('known steps: %s', v_known);
  end if;
  select e into v_step from jsonb_array_elements_text(p_blueprint) e
  group by e having count(*) > 1 limit 1;
  if v_step is not null then
    raise exception 'blueprint names step "%" more than once; each step runs once per item', v_step
      using errcode = '22023';
  end if;
  select e into v_step from jsonb_array_elements_text(p_blueprint) e
  where not exists (select 1 from enrichment_registry r where r.step_name = e) limit 1;
  if v_step is not null then
    raise exception 'blueprint step "%" is not in enrichment_registry', v_step
      using errcode = '22023', hint = format('known steps: %s', v_known);
  end if;
end
$$;

create function public.batches_check_blueprint() returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
begin
  if tg_op = 'UPDATE' then
    if new.blueprint is distinct from old.blueprint then
      raise exception 'the blueprint of batch % cannot change once the batch exists', old.id
        using errcode = '22023', hint = 'create a new batch with the blueprint you want';
    end if;
    return new;
  end if;
  perform validate_blueprint(new.blueprint);
  return new;
end
$$;

create trigger batches_check_blueprint
  before insert or update of blueprint on public.batches
  for each row execute function public.batches_check_blueprint();

-- Inserting items (create_batch, COPY, or plain SQL from Supabase Studio) starts their workflow:
-- each item's first blueprint step is seeded as PENDING in the same statement.
create function public.batch_items_seed_first_step() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_cancelled uuid;
begin
  select b.id into v_cancelled
  from batches b where b.id in (select distinct n.batch_id from new_items n) and b.cancelled_at is not null
  limit 1;
  if v_cancelled is not null then
    raise exception 'batch % is cancelled: it takes no new items', v_cancelled
      using errcode = '22023', hint = 'create a new batch';
  end if;

  -- New items reopen a finished batch.
  update batches b
  set item_count = b.item_count + c.n,
      status = case when b.status in ('COMPLETED', 'FAILED') then 'IN_PROGRESS'::batch_status else b.status end,
      finished_at = null,
      updated_at = now()
  from (select n.batch_id, count(*) as n from new_items n group by n.batch_id) c
  where b.id = c.batch_id;

  -- In input order: state ids break claim ties, so the first rows of a list are worked first.
  insert into workflow_states (batch_id, item_id, step_name, step_index)
  select n.batch_id, n.id, b.blueprint ->> 0, 0
  from new_items n join batches b on b.id = n.batch_id
  order by n.seq;
  return null;
end
$$;

create trigger batch_items_seed_first_step
  after insert on public.batch_items
  referencing new table as new_items
  for each statement execute function public.batch_items_seed_first_step();

create function public.batch_items_count_deleted() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  update batches b set item_count = greatest(b.item_count - c.n, 0), updated_at = now()
  from (select o.batch_id, count(*) as n from old_items o group by o.batch_id) c
  where b.id = c.batch_id;
  return null;
end
$$;

create trigger batch_items_count_deleted
  after delete on public.batch_items
  referencing old table as old_items
  for each statement execute function public.batch_items_count_deleted();

-- Batch roll-up -----------------------------------------------------------------------------------

-- A batch is finished when none of its rows is PENDING, QUEUED or IN_PROGRESS: completing a step
-- seeds the next one in the same transaction, so an item with no active row has either completed its
-- blueprint or failed. COMPLETED if no row failed, else FAILED (partial success: batch_status()
-- counts COMPLETED rows of the last step against FAILED rows).
create function public.rollup_batches(p_batch_ids uuid[]) returns void
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  if p_batch_ids is null or cardinality(p_batch_ids) = 0 then
    return;
  end if;
  -- Two transactions finishing the last rows of a batch concurrently would each still see the
  -- other's row as active. Locking the batch row serialises them: the second one's next statement
  -- takes a fresh snapshot that includes the first one's commit. Ordered by id: no deadlock.
  perform 1 from batches where id = any(p_batch_ids) order by id for update;
  update batches b
  set status = case
        when exists (select 1 from workflow_states ws where ws.batch_id = b.id and ws.status = 'FAILED')
        then 'FAILED'::batch_status else 'COMPLETED'::batch_status end,
      finished_at = now(),
      updated_at = now()
  where b.id = any(p_batch_ids)
    and b.status in ('PENDING', 'IN_PROGRESS')
    and b.item_count > 0
    and not exists (
      select 1 from workflow_states ws
      where ws.batch_id = b.id and ws.status in ('PENDING', 'QUEUED', 'IN_PROGRESS'));
end
$$;

-- Creating batches --------------------------------------------------------------------------------

create function public.create_batch(
  p_blueprint jsonb,
  p_items jsonb,
  p_client_id uuid default null,
  p_name text default null
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

  insert into batches (client_id, name, blueprint)
  values (coalesce(p_client_id, request_client_id(), '00000000-0000-0000-0000-000000000000'::uuid),
          p_name, p_blueprint)
  returning id into v_batch_id;

  insert into batch_items (batch_id, raw_data)
  select v_batch_id, e.value
  from jsonb_array_elements(p_items) with ordinality e(value, n)
  order by e.n;
  return v_batch_id;
end
$$;

-- Worker and conductor transitions ----------------------------------------------------------------

create function public.require_task_array(p_tasks jsonb) returns void
language plpgsql immutable
as $$
begin
  if p_tasks is null or jsonb_typeof(p_tasks) <> 'array' then
    raise exception 'expected a JSON array of {batch_id, item_id, step_name, attempt} objects, got %',
      left(coalesce(p_tasks::text, 'null'), 200) using errcode = '22023';
  end if;
  if exists (
    select 1 from jsonb_array_elements(p_tasks) e
    where jsonb_typeof(e) <> 'object'
       or jsonb_typeof(e -> 'batch_id') is distinct from 'string'
       or jsonb_typeof(e -> 'item_id') is distinct from 'string'
       or jsonb_typeof(e -> 'step_name') is distinct from 'string'
       or jsonb_typeof(e -> 'attempt') is distinct from 'number') then
    raise exception 'every task needs batch_id, item_id, step_name and attempt'
      using errcode = '22023';
  end if;
end
$$;

-- Why a worker call was refused for one row, from the row as it stands (null: no such row).
create function public.call_outcome(p_accepted boolean, p_row_attempt integer, p_attempt integer)
returns text
language sql immutable
as $$
  select case when p_accepted then 'ok'
              when p_row_attempt is null then 'not_found'
              when p_row_attempt <> p_attempt then 'stale_attempt'
              else 'wrong_status' end
$$;

-- Claims up to p_limit ready rows (PENDING, run_after passed), skipping rows another claimer holds,
-- and returns what dispatch needs. Concurrent claimers never get the same row.
-- Order: later blueprint steps first, then oldest first. Depth-first moves items through the whole
-- pipeline as soon as their previous step completes (a short hand-off, finished items early)
-- instead of finishing step 1 for every item before any item starts step 2.
create function public.claim_steps(
  p_limit integer default 100,
  p_step_names text[] default null,
  p_batch_ids uuid[] default null
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
as $$
#variable_conflict use_column
begin
  if p_limit is null or p_limit < 1 or p_limit > 50000 then
    raise exception 'claim limit must be between 1 and 50000, got %', p_limit using errcode = '22023';
  end if;
  return query
  with ready as (
    select ws.id from workflow_states ws
    where ws.status = 'PENDING' and ws.run_after <= now()
      and (p_step_names is null or ws.step_name = any(p_step_names))
      and (p_batch_ids is null or ws.batch_id = any(p_batch_ids))
    order by ws.step_index desc, ws.run_after, ws.id
    limit p_limit
    for update skip locked
  ), claimed as (
    update workflow_states ws
    set status = 'QUEUED', attempt = ws.attempt + 1, lease_expires_at = now() + step_timeout(r.config),
        started_at = null, updated_at = now()
    from ready, enrichment_registry r
    where ws.id = ready.id and r.step_name = ws.step_name
    returning ws.batch_id, ws.item_id, ws.step_name, ws.attempt, r.modal_function_name, r.type,
              ws.lease_expires_at
  ), batches_started as (
    update batches b set status = 'IN_PROGRESS', started_at = coalesce(b.started_at, now()), updated_at = now()
    where b.id in (select distinct c.batch_id from claimed c) and b.status = 'PENDING'
  )
  select * from claimed;
end
$$;

-- Moves claimed rows to IN_PROGRESS and returns each item's input and its step's config.
-- A second start of the same attempt (a worker invocation retried by the platform) is accepted
-- and only extends the lease.
create function public.start_steps(p_tasks jsonb)
returns table (
  batch_id uuid,
  item_id uuid,
  step_name text,
  attempt integer,
  outcome text,
  raw_data jsonb,
  config jsonb
)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
  perform require_task_array(p_tasks);
  return query
  with input as (
    select * from jsonb_to_recordset(p_tasks) as t(batch_id uuid, item_id uuid, step_name text, attempt integer)
  ), started as (
    update workflow_states ws
    set status = 'IN_PROGRESS', lease_expires_at = now() + step_timeout(r.config),
        started_at = coalesce(ws.started_at, now()), updated_at = now()
    from input i, enrichment_registry r
    where ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
      and ws.attempt = i.attempt and ws.status in ('QUEUED', 'IN_PROGRESS')
      and r.step_name = ws.step_name
    returning ws.batch_id, ws.item_id, ws.step_name, r.config
  )
  select i.batch_id, i.item_id, i.step_name, i.attempt,
         call_outcome(s.item_id is not null, ws.attempt, i.attempt),
         bi.raw_data,
         s.config
  from input i
  left join started s on s.batch_id = i.batch_id and s.item_id = i.item_id and s.step_name = i.step_name
  left join workflow_states ws
    on ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
  left join batch_items bi on bi.id = s.item_id;
end
$$;

-- Marks IN_PROGRESS rows COMPLETED, upserts their results, seeds each item's next blueprint step as
-- PENDING and rolls up batches whose items finished, all in the caller's transaction.
-- p_results: [{batch_id, item_id, step_name, attempt, result: {...}}]
create function public.complete_steps(p_results jsonb)
returns table (batch_id uuid, item_id uuid, step_name text, attempt integer, outcome text)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_done jsonb;
  v_table text;
  v_finished uuid[];
begin
  perform require_task_array(p_results);
  if exists (select 1 from jsonb_array_elements(p_results) e
             where e ? 'result' and jsonb_typeof(e -> 'result') not in ('object', 'null')) then
    raise exception 'every result must be a JSON object' using errcode = '22023';
  end if;

  with input as (
    select * from jsonb_to_recordset(p_results)
      as t(batch_id uuid, item_id uuid, step_name text, attempt integer, result jsonb)
  ), done as (
    update workflow_states ws
    set status = 'COMPLETED', lease_expires_at = null, finished_at = now(), updated_at = now()
    from input i
    where ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
      and ws.attempt = i.attempt and ws.status = 'IN_PROGRESS'
    returning ws.batch_id, ws.item_id, ws.step_name, ws.step_index, ws.attempt, i.result
  )
  select coalesce(jsonb_agg(to_jsonb(done)), '[]'::jsonb) into v_done from done;

  for v_table in
    select distinct r.results_table
    from jsonb_to_recordset(v_done) d(step_name text)
    join enrichment_registry r on r.step_name = d.step_name
    where r.results_table is not null
  loop
    execute format(
      'insert into public.%I as t (batch_id, item_id, attempt, result)
       select d.batch_id, d.item_id, d.attempt, coalesce(d.result, ''{}''::jsonb)
       from jsonb_to_recordset($1) d(batch_id uuid, item_id uuid, step_name text, attempt integer, result jsonb)
       join public.enrichment_registry r on r.step_name = d.step_name and r.results_table = $2
       on conflict (batch_id, item_id) do update
       set attempt = excluded.attempt, result = excluded.result, updated_at = now()',
      v_table) using v_done, v_table;
  end loop;

  insert into workflow_states (batch_id, item_id, step_name, step_index)
  select d.batch_id, d.item_id, b.blueprint ->> (d.step_index + 1), d.step_index + 1
  from jsonb_to_recordset(v_done) d(batch_id uuid, item_id uuid, step_index integer)
  join batches b on b.id = d.batch_id
  where d.step_index + 1 < jsonb_array_length(b.blueprint)
  on conflict on constraint workflow_states_batch_item_step_key do nothing;

  select array_agg(distinct d.batch_id) into v_finished
  from jsonb_to_recordset(v_done) d(batch_id uuid, step_index integer)
  join batches b on b.id = d.batch_id
  where d.step_index + 1 >= jsonb_array_length(b.blueprint);
  perform rollup_batches(v_finished);

  return query
  with input as (
    select * from jsonb_to_recordset(p_results) as t(batch_id uuid, item_id uuid, step_name text, attempt integer)
  ), done as (
    select * from jsonb_to_recordset(v_done) as d(batch_id uuid, item_id uuid, step_name text)
  )
  select i.batch_id, i.item_id, i.step_name, i.attempt,
         call_outcome(d.item_id is not null, ws.attempt, i.attempt)
  from input i
  left join done d on d.batch_id = i.batch_id and d.item_id = i.item_id and d.step_name = i.step_name
  left join workflow_states ws
    on ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name;
end
$$;

-- The one place that decides retry or FAILED. p_rows: [{id, error, retryable, kind}] of rows the
-- caller has already matched and locked.
create function public.fail_rows(p_rows jsonb)
returns table (id bigint, batch_id uuid, status public.workflow_status)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_failed_batches uuid[];
begin
  return query
  with input as (
    select * from jsonb_to_recordset(p_rows) as t(id bigint, error text, retryable boolean, kind text)
  ), decided as (
    select ws.id,
           coalesce(i.retryable, true) and ws.attempt - ws.retry_from < step_max_attempts(r.config) as retry,
           left(coalesce(i.error, 'unknown error'), 2000) as error,
           coalesce(i.kind, 'error') as kind,
           r.config
    from input i
    join workflow_states ws on ws.id = i.id
    join enrichment_registry r on r.step_name = ws.step_name
  )
  update workflow_states ws
  set status = case when d.retry then 'PENDING'::workflow_status else 'FAILED'::workflow_status end,
      run_after = case when d.retry then now() + step_backoff(d.config, ws.attempt - ws.retry_from)
                       else ws.run_after end,
      lease_expires_at = null,
      finished_at = case when d.retry then null else now() end,
      updated_at = now(),
      meta = ws.meta
        || jsonb_build_object('last_error', jsonb_build_object(
             'message', d.error, 'kind', d.kind, 'attempt', ws.attempt, 'at', now(),
             'will_retry', d.retry))
        || case when d.retry then '{}'::jsonb else jsonb_build_object('error', d.error) end
  from decided d
  where ws.id = d.id
  returning ws.id, ws.batch_id, ws.status;

  select array_agg(distinct ws.batch_id) into v_failed_batches
  from workflow_states ws
  where ws.id in (select (e ->> 'id')::bigint from jsonb_array_elements(p_rows) e)
    and ws.status = 'FAILED';
  perform rollup_batches(v_failed_batches);
end
$$;

-- A worker reports a failure. retryable (default true) false means retrying cannot help: FAILED now.
-- p_failures: [{batch_id, item_id, step_name, attempt, error, retryable}]
create function public.fail_steps(p_failures jsonb)
returns table (batch_id uuid, item_id uuid, step_name text, attempt integer, outcome text, status public.workflow_status)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_rows jsonb;
begin
  perform require_task_array(p_failures);
  with input as (
    select * from jsonb_to_recordset(p_failures)
      as t(batch_id uuid, item_id uuid, step_name text, attempt integer, error text, retryable boolean)
  ), matched as (
    select ws.id, i.error, i.retryable
    from input i
    join workflow_states ws
      on ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
    where ws.attempt = i.attempt and ws.status in ('QUEUED', 'IN_PROGRESS')
    for update of ws
  )
  select coalesce(jsonb_agg(jsonb_build_object('id', m.id, 'error', m.error, 'retryable', m.retryable,
                                               'kind', 'worker_error')), '[]'::jsonb)
    into v_rows from matched m;

  -- Decide first, report after: the report must see the rows as fail_rows left them.
  select coalesce(jsonb_agg(to_jsonb(f)), '[]'::jsonb) into v_rows from fail_rows(v_rows) f;

  return query
  with input as (
    select * from jsonb_to_recordset(p_failures) as t(batch_id uuid, item_id uuid, step_name text, attempt integer)
  ), failed as (
    select * from jsonb_to_recordset(v_rows) as f(id bigint, status public.workflow_status)
  )
  select i.batch_id, i.item_id, i.step_name, i.attempt,
         call_outcome(f.id is not null, ws.attempt, i.attempt),
         ws.status
  from input i
  left join workflow_states ws
    on ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
  left join failed f on f.id = ws.id;
end
$$;

-- Extends the lease of IN_PROGRESS rows. A refused heartbeat tells a worker its attempt is over
-- (timed out and retried, or the batch was cancelled): it should stop.
create function public.heartbeat_steps(p_tasks jsonb)
returns table (batch_id uuid, item_id uuid, step_name text, attempt integer, outcome text, lease_expires_at timestamptz)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
  perform require_task_array(p_tasks);
  return query
  with input as (
    select * from jsonb_to_recordset(p_tasks) as t(batch_id uuid, item_id uuid, step_name text, attempt integer)
  ), beat as (
    update workflow_states ws
    set lease_expires_at = now() + step_timeout(r.config), updated_at = now()
    from input i, enrichment_registry r
    where ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
      and ws.attempt = i.attempt and ws.status = 'IN_PROGRESS' and r.step_name = ws.step_name
    returning ws.batch_id, ws.item_id, ws.step_name, ws.lease_expires_at
  )
  select i.batch_id, i.item_id, i.step_name, i.attempt,
         call_outcome(b.item_id is not null, ws.attempt, i.attempt),
         b.lease_expires_at
  from input i
  left join beat b on b.batch_id = i.batch_id and b.item_id = i.item_id and b.step_name = i.step_name
  left join workflow_states ws
    on ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name;
end
$$;

-- Rows whose lease passed (a worker died, hung or was never started) are retried with backoff, or
-- FAILED after max_attempts. Also rolls up any unfinished batch that has nothing left to run, as a
-- safety net. Run by every conductor pass and by the scheduled sweep.
create function public.sweep_expired_leases(p_limit integer default 10000)
returns table (batch_id uuid, item_id uuid, step_name text, attempt integer, status public.workflow_status)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_rows jsonb;
  v_idle uuid[];
begin
  select coalesce(jsonb_agg(jsonb_build_object(
           'id', x.id, 'retryable', true, 'kind', 'lease_expired',
           'error', format('lease expired while %s (attempt %s): the worker was lost or timed out',
                           x.status, x.attempt))), '[]'::jsonb)
    into v_rows
  from (
    select ws.id, ws.status, ws.attempt from workflow_states ws
    where ws.status in ('QUEUED', 'IN_PROGRESS') and ws.lease_expires_at < now()
    order by ws.lease_expires_at
    limit p_limit
    for update skip locked
  ) x;

  return query
  select ws.batch_id, ws.item_id, ws.step_name, ws.attempt, f.status
  from fail_rows(v_rows) f join workflow_states ws on ws.id = f.id;

  select array_agg(b.id) into v_idle
  from batches b
  where b.status in ('PENDING', 'IN_PROGRESS') and b.item_count > 0
    and not exists (select 1 from workflow_states ws
                    where ws.batch_id = b.id and ws.status in ('PENDING', 'QUEUED', 'IN_PROGRESS'));
  perform rollup_batches(v_idle);
end
$$;

-- Batch operations --------------------------------------------------------------------------------

create function public.require_batch(p_batch_id uuid) returns public.batches
language plpgsql stable
set search_path = public, pg_temp
as $$
declare
  v_batch batches;
begin
  select * into v_batch from batches where id = p_batch_id;
  if not found then
    raise exception 'batch % not found', p_batch_id using errcode = 'P0002';
  end if;
  return v_batch;
end
$$;

-- FAILED rows of a batch (optionally of one step) go back to PENDING with a fresh attempt budget.
-- Returns how many rows were retried.
create function public.retry_failed(p_batch_id uuid, p_step_name text default null) returns integer
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_batch batches;
  v_count integer;
begin
  v_batch := require_batch(p_batch_id);
  if p_step_name is not null and not (v_batch.blueprint ? p_step_name) then
    raise exception 'step "%" is not in the blueprint of batch % (%)', p_step_name, p_batch_id,
      (select string_agg(e, ', ') from jsonb_array_elements_text(v_batch.blueprint) e)
      using errcode = '22023';
  end if;
  update workflow_states ws
  set status = 'PENDING', run_after = now(), retry_from = ws.attempt, lease_expires_at = null,
      finished_at = null, updated_at = now(),
      meta = (ws.meta - 'error') || jsonb_build_object('retried_at', now())
  where ws.batch_id = p_batch_id and ws.status = 'FAILED'
    and (p_step_name is null or ws.step_name = p_step_name);
  get diagnostics v_count = row_count;
  if v_count > 0 then
    update batches set status = 'IN_PROGRESS', finished_at = null, cancelled_at = null, updated_at = now()
    where id = p_batch_id;
  end if;
  return v_count;
end
$$;

-- Stops a batch: every unfinished row becomes FAILED with meta.error = 'cancelled', so late worker
-- calls are refused (wrong_status). retry_failed resumes it. Returns how many rows were cancelled.
create function public.cancel_batch(p_batch_id uuid) returns integer
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_count integer;
begin
  perform require_batch(p_batch_id);
  update workflow_states ws
  set status = 'FAILED', lease_expires_at = null, finished_at = now(), updated_at = now(),
      meta = ws.meta || jsonb_build_object('error', 'cancelled', 'cancelled_at', now())
  where ws.batch_id = p_batch_id and ws.status in ('PENDING', 'QUEUED', 'IN_PROGRESS');
  get diagnostics v_count = row_count;
  update batches
  set status = 'FAILED', cancelled_at = now(), finished_at = now(), updated_at = now()
  where id = p_batch_id and status in ('PENDING', 'IN_PROGRESS');
  return v_count;
end
$$;

-- {"batch_id", "name", "status", "items", "cancelled", "blueprint", "steps": {"<step>": {"PENDING": n,
-- ...}}} with every blueprint step and every status present (zeros included). jsonb does not keep key
-- order: "blueprint" gives the step order.
create function public.batch_progress(p_batch_id uuid) returns jsonb
language plpgsql stable
set search_path = public, pg_temp
as $$
declare
  v_batch batches;
  v_steps jsonb;
begin
  v_batch := require_batch(p_batch_id);
  select jsonb_object_agg(s.step_name, s.counts order by s.ord) into v_steps
  from (
    select bp.step_name, bp.ord,
           jsonb_build_object(
             'PENDING', count(*) filter (where ws.status = 'PENDING'),
             'QUEUED', count(*) filter (where ws.status = 'QUEUED'),
             'IN_PROGRESS', count(*) filter (where ws.status = 'IN_PROGRESS'),
             'COMPLETED', count(*) filter (where ws.status = 'COMPLETED'),
             'FAILED', count(*) filter (where ws.status = 'FAILED')) as counts
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
    'steps', coalesce(v_steps, '{}'::jsonb));
end
$$;
