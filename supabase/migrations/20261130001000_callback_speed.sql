-- Plans that do not depend on fresh statistics (issue 7: bench/callbacks.py).
--
-- ASYNC steps keep thousands of rows IN_PROGRESS, awaiting their callbacks, while other rows of the
-- same batch are claimed, started, submitted and completed around them. The planner sizes the
-- partial indexes on status (workflow_states_leased, workflow_states_active_batch) from the
-- statistics of the last ANALYZE, typically taken when none of those rows existed: it expects one
-- row and picks them. Each call then read every awaiting row:
--   start/submit/complete/fail/heartbeat: a scan of workflow_states_leased (all QUEUED and
--     IN_PROGRESS rows) hashed against the call's tasks, instead of one lookup per task by
--     (batch_id, item_id, step_name);
--   claim: a scan of workflow_states_active_batch (every unfinished row of the batch), sorted,
--     instead of walking workflow_states_ready in its order up to the limit.
-- With 10,000 rows awaiting, claim + start + submit + complete of 40 rows cost 1,200 us of server
-- CPU per row (432 us after an ANALYZE, which no one runs mid-batch); bench/callbacks.py spent
-- more CPU in PostgreSQL than in every Python process together.
--
-- The fix, function by function, with the bodies otherwise exactly as they were (claim_steps and
-- complete_steps: 20261130000700; start_steps, submit_steps and heartbeat_steps: 20261130000800;
-- fail_steps: 20261122000200):
--   the status guard of a per-task transition compares status as text. It still guards the row
--     (it is a condition on the updated row, re-checked on a concurrent update), but the planner
--     cannot match it to a partial index's predicate, so the one way left to find a task's row is
--     the unique key, one lookup per task;
--   claim_steps runs with enable_sort off: the order it needs is workflow_states_ready's, and a
--     plan that sorts (all unfinished rows of the batch) is never the cheaper one.

-- claim_steps: walk the ready index in order, never sort a batch's unfinished rows ---------------

create or replace function public.claim_steps(
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
as $$
#variable_conflict use_column
begin
  if p_limit is null or p_limit < 1 or p_limit > 50000 then
    raise exception 'claim limit must be between 1 and 50000, got %', p_limit using errcode = '22023';
  end if;
  -- A lost claim would hand its attempt number out again after a crash: fencing needs it durable.
  perform durable_commit();
  return query
  with ready as (
    select ws.id from workflow_states ws
    where ws.status = 'PENDING' and ws.run_after <= now()
      and (p_step_names is null or ws.step_name = any(p_step_names))
      and (p_batch_ids is null or ws.batch_id = any(p_batch_ids))
      and not exists (select 1 from batches cb where cb.id = ws.batch_id and cb.cancelled_at is not null)
    order by ws.step_index desc, ws.run_after, ws.id
    limit p_limit
    for update of ws skip locked
  ), claimed as (
    update workflow_states ws
    set status = 'QUEUED', attempt = ws.attempt + 1, lease_expires_at = now() + step_timeout(r.config),
        started_at = null, lease_owner = p_owner, updated_at = now()
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

-- start_steps: one lookup per task ---------------------------------------------------------------

create or replace function public.start_steps(p_tasks jsonb)
returns table (
  batch_id uuid,
  item_id uuid,
  step_name text,
  attempt integer,
  outcome text,
  raw_data jsonb,
  config jsonb,
  inputs jsonb
)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_started jsonb;
  v_inputs jsonb;
begin
  perform require_task_array(p_tasks);
  -- A lost start would refuse the completion of a step that ran: it would run (and bill) again.
  perform durable_commit();
  with input as (
    select * from jsonb_to_recordset(p_tasks) as t(batch_id uuid, item_id uuid, step_name text, attempt integer)
  ), started as (
    update workflow_states ws
    set status = 'IN_PROGRESS', lease_expires_at = now() + step_timeout(r.config),
        started_at = coalesce(ws.started_at, now()), updated_at = now()
    from input i, enrichment_registry r
    where ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
      and ws.attempt = i.attempt and ws.status::text in ('QUEUED', 'IN_PROGRESS')
      and r.step_name = ws.step_name
      and not exists (select 1 from batches cb where cb.id = ws.batch_id and cb.cancelled_at is not null)
    returning ws.batch_id, ws.item_id, ws.step_name, r.config
  )
  select coalesce(jsonb_agg(to_jsonb(started)), '[]'::jsonb) into v_started from started;
  v_inputs := needed_results(v_started);

  return query
  with input as (
    select * from jsonb_to_recordset(p_tasks) as t(batch_id uuid, item_id uuid, step_name text, attempt integer)
  ), started as (
    select * from jsonb_to_recordset(v_started) as s(batch_id uuid, item_id uuid, step_name text, config jsonb)
  )
  select i.batch_id, i.item_id, i.step_name, i.attempt,
         call_outcome(s.item_id is not null, ws.attempt, i.attempt),
         bi.raw_data,
         s.config,
         case when s.item_id is not null and s.config ? 'needs'
              then coalesce(v_inputs -> s.item_id::text, '{}'::jsonb) end
  from input i
  left join started s on s.batch_id = i.batch_id and s.item_id = i.item_id and s.step_name = i.step_name
  left join workflow_states ws
    on ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
  left join batch_items bi on bi.id = s.item_id;
end
$$;

-- submit_steps: one lookup per task --------------------------------------------------------------

create or replace function public.submit_steps(p_submissions jsonb)
returns table (batch_id uuid, item_id uuid, step_name text, attempt integer, outcome text,
               lease_expires_at timestamptz)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
  perform require_task_array(p_submissions);
  -- The provider has the item now: forgetting that after a crash would submit (and bill) it again.
  perform durable_commit();
  return query
  with input as (
    select * from jsonb_to_recordset(p_submissions)
      as t(batch_id uuid, item_id uuid, step_name text, attempt integer, request_id text)
  ), submitted as (
    update workflow_states ws
    set lease_expires_at = now() + step_callback_timeout(r.config), lease_owner = null,
        updated_at = now(),
        meta = ws.meta || jsonb_build_object('awaiting', jsonb_build_object(
          'attempt', ws.attempt, 'request_id', i.request_id, 'since', now()))
    from input i, enrichment_registry r
    where ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
      and ws.attempt = i.attempt and ws.status::text = 'IN_PROGRESS' and r.step_name = ws.step_name
    returning ws.batch_id, ws.item_id, ws.step_name, ws.lease_expires_at
  )
  select i.batch_id, i.item_id, i.step_name, i.attempt,
         call_outcome(s.item_id is not null, ws.attempt, i.attempt),
         s.lease_expires_at
  from input i
  left join submitted s on s.batch_id = i.batch_id and s.item_id = i.item_id and s.step_name = i.step_name
  left join workflow_states ws
    on ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name;
end
$$;

-- complete_steps: one lookup per task ------------------------------------------------------------

create or replace function public.complete_steps(p_results jsonb)
returns table (batch_id uuid, item_id uuid, step_name text, attempt integer, outcome text)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_done jsonb;
  v_table text;
  v_finished uuid[];
  v_batches uuid[];
begin
  perform require_task_array(p_results);
  if exists (select 1 from jsonb_array_elements(p_results) e
             where e ? 'result' and jsonb_typeof(e -> 'result') not in ('object', 'null')) then
    raise exception 'every result must be a JSON object' using errcode = '22023';
  end if;
  -- Waits for a cancel in progress; the statements below then see it (each takes a new snapshot).
  select array_agg(distinct (e ->> 'batch_id')::uuid) into v_batches
  from jsonb_array_elements(p_results) e;
  perform lock_batches_shared(v_batches);

  with input as (
    select * from jsonb_to_recordset(p_results)
      as t(batch_id uuid, item_id uuid, step_name text, attempt integer, result jsonb)
  ), done as (
    update workflow_states ws
    set status = 'COMPLETED', lease_expires_at = null, finished_at = now(), updated_at = now()
    from input i
    where ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
      and ws.attempt = i.attempt and ws.status::text = 'IN_PROGRESS'
      and not exists (select 1 from batches cb where cb.id = ws.batch_id and cb.cancelled_at is not null)
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
    and b.cancelled_at is null
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

-- fail_steps: one lookup per task ----------------------------------------------------------------

create or replace function public.fail_steps(p_failures jsonb)
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
    where ws.attempt = i.attempt and ws.status::text in ('QUEUED', 'IN_PROGRESS')
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

-- heartbeat_steps: one lookup per task -----------------------------------------------------------

create or replace function public.heartbeat_steps(p_tasks jsonb)
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
    set lease_expires_at = greatest(ws.lease_expires_at, now() + step_timeout(r.config)),
        updated_at = now()
    from input i, enrichment_registry r
    where ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
      and ws.attempt = i.attempt and ws.status::text = 'IN_PROGRESS' and r.step_name = ws.step_name
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
