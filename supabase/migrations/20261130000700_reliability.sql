-- Reliability under faults (issue 11): durable acknowledgements, cancel that nothing escapes, rows
-- of a lost or never-started worker handed back without burning an attempt.
--
-- 1. Durable acknowledgements. The embedded cluster runs with synchronous_commit = off, but every
--    state transition a caller was told "ok" about must survive a crash of the server: a lost
--    completion re-runs a paid step; so does a lost start (the step ran, its completion is then
--    refused); a lost claim hands its attempt number out a second time, which breaks fencing. The
--    fault matrix (bench/fault_matrix.py) showed each. Only heartbeats keep the fast path (a lost
--    one shortens a lease by one beat). durable_commit() raises synchronous_commit for the rest of
--    the calling transaction; it has to be set_config(..., is_local => true) inside the body: a
--    function's own SET clause is undone when the function returns, before the commit that reads
--    the setting. Bulk calls make it cheap (one flush per statement of hundreds of rows: no
--    difference in bench/throughput.py within its noise). On Supabase synchronous_commit is
--    already on, and this changes nothing.
-- 2. Cancel races with completions. complete_steps seeds next-step rows in its own transaction; a
--    cancel_batch running at the same moment could not see them (they were not in its snapshot) and
--    they escaped it. Now every completion holds a shared advisory lock per batch for its
--    transaction and cancel_batch takes the same lock exclusively, so a cancel waits for
--    completions in flight and their next steps are cancelled with the rest, and completions that
--    come after the cancel find the batch cancelled. claim, start and complete refuse rows of a
--    cancelled batch outright.
-- 3. Leases owned by a process. claim_steps records an optional lease_owner (the local pool passes
--    "host/pid/start-time"); reclaim_orphaned_steps hands back the rows of owners that are gone
--    (checked by the caller, which can see the processes) without waiting for their leases.
-- 4. A QUEUED row whose lease expires never started: the sweep hands it back with its attempt
--    refunded (up to three times per row, so a worker that never starts anything still ends in
--    FAILED rather than looping forever). The functions for it are here (refundable,
--    hand_back_rows); the sweep itself is redefined once, in 20261130000800_async_steps.sql,
--    which also knows about callback deadlines.

alter table public.workflow_states add column lease_owner text;

comment on column public.workflow_states.lease_owner is
  'Who holds the lease of a QUEUED or IN_PROGRESS row, when the claimer said (the local pool: '
  'host/pid/start-time). Null for rows dispatched to Modal.';

-- Durable commits --------------------------------------------------------------------------------

create function public.durable_commit() returns void
language plpgsql volatile
as $$
begin
  if current_setting('synchronous_commit') in ('off', 'local') then
    perform set_config('synchronous_commit', 'on', true);
  end if;
end
$$;

-- Batch locks: completions share, cancel excludes ---------------------------------------------

-- One advisory lock key per batch, in a namespace of its own (the first key is the namespace).
create function public.batch_lock_key(p_batch_id uuid) returns integer
language sql immutable
as $$ select hashtext(p_batch_id::text) $$;

create function public.lock_batches_shared(p_batch_ids uuid[]) returns void
language plpgsql volatile
as $$
declare
  v_batch uuid;
begin
  -- Sorted, so two transactions never wait on each other in opposite orders.
  for v_batch in select distinct b from unnest(p_batch_ids) b order by 1 loop
    perform pg_advisory_xact_lock_shared(7101, public.batch_lock_key(v_batch));
  end loop;
end
$$;

-- claim_steps, with the lease owner -------------------------------------------------------------
-- "Not cancelled" is written out as NOT EXISTS in each transition, not as a helper function: the
-- planner turns it into one anti-join, where a function is called per candidate row (a claim over
-- a 20,000-row batch took 58 ms with the function, 10 ms with the join).

drop function public.claim_steps(integer, text[], uuid[]);

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

-- start_steps: refuses rows of a cancelled batch ------------------------------------------------

create or replace function public.start_steps(p_tasks jsonb)
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
  -- A lost start would refuse the completion of a step that ran: it would run (and bill) again.
  perform durable_commit();
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
      and not exists (select 1 from batches cb where cb.id = ws.batch_id and cb.cancelled_at is not null)
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

-- complete_steps: durable, shares the batch lock, refuses and never seeds a cancelled batch ------

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
      and ws.attempt = i.attempt and ws.status = 'IN_PROGRESS'
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

-- Durable acknowledgements: one trigger for every path ---------------------------------------
-- A statement that makes rows ready (PENDING) or finishes them (COMPLETED, FAILED) is an
-- acknowledgement someone relies on: complete_steps, fail_steps, the sweep, cancel_batch,
-- retry_failed, release_steps, an import, an edit in Studio. Such a transaction commits durably
-- (claim_steps and start_steps say so themselves; heartbeats keep the fast path). The same rule as
-- the wake-up trigger's, so whatever wakes the conductor is also on disk.

create function public.durable_state_change() returns trigger
language plpgsql
as $$
begin
  if exists (select 1 from changed c where c.status in ('PENDING', 'COMPLETED', 'FAILED')) then
    perform public.durable_commit();
  end if;
  return null;
end
$$;

create trigger workflow_states_durable_insert
  after insert on public.workflow_states
  referencing new table as changed
  for each statement execute function public.durable_state_change();

create trigger workflow_states_durable_update
  after update on public.workflow_states
  referencing new table as changed
  for each statement execute function public.durable_state_change();

-- cancel_batch: waits for completions in flight, so nothing they seed escapes -------------------

create or replace function public.cancel_batch(p_batch_id uuid) returns integer
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_count integer;
  v_try integer := 0;
begin
  perform require_batch(p_batch_id);
  -- Exclusive against lock_batches_shared: completions of this batch that are in flight commit
  -- first, and the update below (a new snapshot) sees the next steps they seeded. Completions that
  -- come later wait for this transaction, then find the batch cancelled.
  perform pg_advisory_xact_lock(7101, batch_lock_key(p_batch_id));
  loop
    begin
      -- Rows, then the batch: the order every transition takes (a claim, a failure and its
      -- roll-up lock rows first), so the only deadlocks left are between rows updated in
      -- different orders by a bulk call of a worker; the loser of those is retried, here or there.
      update workflow_states ws
      set status = 'FAILED', lease_expires_at = null, finished_at = now(), updated_at = now(),
          meta = ws.meta || jsonb_build_object('error', 'cancelled', 'cancelled_at', now())
      where ws.batch_id = p_batch_id and ws.status in ('PENDING', 'QUEUED', 'IN_PROGRESS');
      get diagnostics v_count = row_count;
      update batches
      set status = 'FAILED', cancelled_at = now(), finished_at = now(), updated_at = now()
      where id = p_batch_id and status in ('PENDING', 'IN_PROGRESS');
      return v_count;
    exception when deadlock_detected then
      v_try := v_try + 1;
      if v_try >= 5 then
        raise;
      end if;
      perform pg_sleep(0.05 * v_try);
    end;
  end loop;
end
$$;

-- Handing back rows that never ran to a verdict ---------------------------------------------------

-- QUEUED | IN_PROGRESS rows (already matched and locked by the caller) -> PENDING now, attempt
-- refunded: the step never ran to a verdict. The one place for it besides release_steps, whose
-- callers name attempts. p_rows: [{id, reason}]
create function public.refund_rows(p_rows jsonb)
returns table (id bigint, batch_id uuid, status public.workflow_status)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
  return query
  update workflow_states ws
  set status = 'PENDING', lease_expires_at = null, started_at = null, run_after = now(),
      retry_from = ws.retry_from + 1, updated_at = now(),
      meta = ws.meta || jsonb_build_object(
        'released', jsonb_build_object('attempt', ws.attempt, 'at', now(), 'reason', i.reason),
        'lease_refunds', coalesce((ws.meta ->> 'lease_refunds')::integer, 0) + 1)
  from jsonb_to_recordset(p_rows) as i(id bigint, reason text)
  where ws.id = i.id
  returning ws.id, ws.batch_id, ws.status;
end
$$;

-- How many times a row's lease may run out before its step started and still cost no attempt.
create function public.max_lease_refunds() returns integer
language sql immutable as $$ select 3 $$;

-- Rows a worker lost (matched and locked by the caller), each either refunded (it never started)
-- or failed like any lost attempt (retried while attempts remain). p_rows: [{id, refund, reason,
-- error, retryable, kind}]
create function public.hand_back_rows(p_rows jsonb)
returns table (batch_id uuid, item_id uuid, step_name text, attempt integer, status public.workflow_status)
language sql
set search_path = public, pg_temp
as $$
  select ws.batch_id, ws.item_id, ws.step_name, ws.attempt, f.status
  from (
    select * from refund_rows(jsonb_path_query_array(p_rows, '$[*] ? (@.refund == true)'))
    union all
    select * from fail_rows(jsonb_path_query_array(p_rows, '$[*] ? (@.refund == false)'))
  ) f join workflow_states ws on ws.id = f.id
$$;

-- Whether a lost row that never started may have its attempt back (bounded, so a worker that never
-- starts anything still ends in FAILED).
create function public.refundable(p_status public.workflow_status, p_meta jsonb) returns boolean
language sql immutable
as $$
  select p_status = 'QUEUED' and coalesce((p_meta ->> 'lease_refunds')::integer, 0) < public.max_lease_refunds()
$$;

-- Rows leased by processes that are gone ---------------------------------------------------------

-- The owners holding leases (of the given batches, or all) whose name starts with p_prefix, with
-- how many rows each holds: the local pool asks for the owners on its own host, then checks which
-- of them are still alive. Two columns, so PostgREST answers with objects, as for every other
-- function here (a one-column table would be a set of scalars to it).
create function public.lease_owners(p_prefix text, p_batch_ids uuid[] default null)
returns table (lease_owner text, leased bigint)
language sql stable
set search_path = public, pg_temp
as $$
  select ws.lease_owner, count(*) from workflow_states ws
  where ws.status in ('QUEUED', 'IN_PROGRESS')
    and ws.lease_owner like replace(replace(replace(p_prefix, '\', '\\'), '%', '\%'), '_', '\_') || '%'
    and (p_batch_ids is null or ws.batch_id = any(p_batch_ids))
  group by ws.lease_owner
$$;

-- Hands back, now, the rows leased by owners the caller found gone (their process exited without
-- releasing them: kill -9, a crash, the machine rebooted): a QUEUED row never started and gets its
-- attempt back; an IN_PROGRESS row was interrupted mid-step and is retried as after a lost worker.
create function public.reclaim_orphaned_steps(p_owners text[], p_batch_ids uuid[] default null)
returns table (batch_id uuid, item_id uuid, step_name text, attempt integer, status public.workflow_status)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_rows jsonb;
begin
  if p_owners is null or cardinality(p_owners) = 0 then
    return;
  end if;
  select coalesce(jsonb_agg(jsonb_build_object(
           'id', x.id, 'retryable', true, 'kind', 'worker_lost',
           'refund', refundable(x.status, x.meta),
           'reason', format('the process %s that claimed it is gone; it never started', x.lease_owner),
           'error', format('the process %s running it is gone (attempt %s)', x.lease_owner, x.attempt))),
           '[]'::jsonb)
    into v_rows
  from (
    select ws.id, ws.status, ws.attempt, ws.meta, ws.lease_owner from workflow_states ws
    where ws.status in ('QUEUED', 'IN_PROGRESS') and ws.lease_owner = any(p_owners)
      and (p_batch_ids is null or ws.batch_id = any(p_batch_ids))
    for update skip locked
  ) x;

  return query select * from hand_back_rows(v_rows);
end
$$;

revoke execute on function public.refund_rows(jsonb), public.hand_back_rows(jsonb),
  public.durable_commit(), public.lock_batches_shared(uuid[]) from public, anon, authenticated;
