-- ASYNC steps (issue 7): providers that answer later, by signed callback.
--
-- The life of an ASYNC row keeps the five statuses:
--   claim_steps      PENDING -> QUEUED, as for any step
--   start_steps      QUEUED -> IN_PROGRESS: the worker gets the item's input, as for any step
--   submit_steps     IN_PROGRESS stays IN_PROGRESS, now awaiting a callback: the worker sent the
--                    item to the provider (with a callback URL carrying a token signed for this
--                    attempt), records the provider's request id in meta.awaiting and exits. The
--                    lease becomes the callback deadline (config.callback_timeout_seconds, default
--                    3600) and no process holds it (lease_owner null): nothing waits in memory.
--   complete_steps / fail_steps   the callback, applied exactly like a SYNC verdict (guarded by
--                    status and attempt: a replay finds the row finished, a late callback for an
--                    older attempt is stale).
--   sweep            no callback by the deadline: a failed attempt ("no callback within N s"),
--                    re-submitted with backoff while attempts remain, else FAILED.
-- A callback can even beat the recording of its submission (a fast provider): the completion is
-- accepted (the row is IN_PROGRESS for that attempt), and submit_steps then finds it finished.

-- Registry config: callback_timeout_seconds ------------------------------------------------------

create function public.step_callback_timeout(p_config jsonb) returns interval
language sql immutable
as $$ select make_interval(secs => coalesce((p_config ->> 'callback_timeout_seconds')::float8, 3600)) $$;

create function public.registry_check_async() returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_value jsonb := new.config -> 'callback_timeout_seconds';
begin
  if v_value is not null and (jsonb_typeof(v_value) <> 'number' or (v_value)::numeric <= 0) then
    raise exception 'step "%": config.callback_timeout_seconds = % is not valid', new.step_name, v_value
      using errcode = '22023', hint = 'callback_timeout_seconds is a number of seconds > 0';
  end if;
  return new;
end
$$;

create trigger enrichment_registry_check_async
  before insert or update on public.enrichment_registry
  for each row execute function public.registry_check_async();

-- Is the row awaiting a callback for its current attempt?
create function public.awaiting_callback(p_status public.workflow_status, p_attempt integer, p_meta jsonb)
returns boolean
language sql immutable
as $$
  select p_status = 'IN_PROGRESS' and (p_meta -> 'awaiting' ->> 'attempt')::integer = p_attempt
$$;

-- submit_steps -----------------------------------------------------------------------------------

-- p_submissions: [{batch_id, item_id, step_name, attempt, request_id}]
create function public.submit_steps(p_submissions jsonb)
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
      and ws.attempt = i.attempt and ws.status = 'IN_PROGRESS' and r.step_name = ws.step_name
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

-- The sweep: refunds never-started rows (20261130000700) and knows about callbacks --------------

-- Why a lease expired, for the row's error: a callback that never came, or a lost worker.
create function public.lease_expiry_error(
  p_status public.workflow_status, p_attempt integer, p_meta jsonb, p_config jsonb
) returns text
language sql immutable
as $$
  select case
    when public.awaiting_callback(p_status, p_attempt, p_meta) then
      format('no callback within %s s (attempt %s, request %s)',
             extract(epoch from public.step_callback_timeout(p_config))::bigint, p_attempt,
             coalesce(p_meta -> 'awaiting' ->> 'request_id', 'unknown'))
    else format('lease expired while %s (attempt %s): the worker was lost or timed out',
                p_status, p_attempt)
  end
$$;

create or replace function public.sweep_expired_leases(p_limit integer default 10000)
returns table (batch_id uuid, item_id uuid, step_name text, attempt integer, status public.workflow_status)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_expired jsonb;
  v_idle uuid[];
begin
  select coalesce(jsonb_agg(jsonb_build_object(
           'id', x.id, 'retryable', true,
           'kind', case when awaiting_callback(x.status, x.attempt, x.meta) then 'callback_timeout'
                        else 'lease_expired' end,
           'refund', refundable(x.status, x.meta),
           'reason', format('lease expired while QUEUED (attempt %s): the step never started',
                            x.attempt),
           'error', lease_expiry_error(x.status, x.attempt, x.meta, r.config))), '[]'::jsonb)
    into v_expired
  from (
    select ws.id, ws.status, ws.attempt, ws.meta, ws.step_name from workflow_states ws
    where ws.status in ('QUEUED', 'IN_PROGRESS') and ws.lease_expires_at < now()
    order by ws.lease_expires_at
    limit p_limit
    for update of ws skip locked
  ) x
  join enrichment_registry r on r.step_name = x.step_name;

  return query select * from hand_back_rows(v_expired);

  select array_agg(b.id) into v_idle
  from batches b
  where b.status in ('PENDING', 'IN_PROGRESS') and b.item_count > 0
    and not exists (select 1 from workflow_states ws
                    where ws.batch_id = b.id and ws.status in ('PENDING', 'QUEUED', 'IN_PROGRESS'));
  perform rollup_batches(v_idle);
end
$$;

-- Heartbeats never shorten a lease: a worker's last beat, racing the recording of its submission,
-- must not cut the callback deadline down to the step's timeout.
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

-- Progress shows ASYNC rows awaiting their callback apart from running ones ----------------------
-- The documented shape stays; "awaiting_callback" is added: {"<step>": n} for every blueprint step
-- (these rows are also counted IN_PROGRESS in "steps").

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
    'awaiting_callback', coalesce(v_awaiting, '{}'::jsonb));
end
$$;

-- Steps read earlier steps' results ----------------------------------------------------------
-- config.needs: ["normalize_domain", ...] names earlier steps whose results the step reads. The
-- start call hands them over with raw_data, in the same round trip, as "inputs":
-- {"normalize_domain": {...its result...}} (a step without a result yet is absent). The worker never
-- queries results tables itself.

create or replace function public.registry_check_async() returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_value jsonb := new.config -> 'callback_timeout_seconds';
  v_needs jsonb := new.config -> 'needs';
  v_bad text;
begin
  if v_value is not null and (jsonb_typeof(v_value) <> 'number' or (v_value)::numeric <= 0) then
    raise exception 'step "%": config.callback_timeout_seconds = % is not valid', new.step_name, v_value
      using errcode = '22023', hint = 'callback_timeout_seconds is a number of seconds > 0';
  end if;
  if v_needs is not null then
    if jsonb_typeof(v_needs) <> 'array'
       or exists (select 1 from jsonb_array_elements(v_needs) e where jsonb_typeof(e) <> 'string') then
      raise exception 'step "%": config.needs must be a JSON array of step names, got %', new.step_name, v_needs
        using errcode = '22023';
    end if;
    select e into v_bad from jsonb_array_elements_text(v_needs) e
    where not exists (select 1 from enrichment_registry r
                      where r.step_name = e and r.results_table is not null)
    limit 1;
    if v_bad is not null then
      raise exception 'step "%": config.needs names "%", which is not a registered step with a results table',
        new.step_name, v_bad using errcode = '22023';
    end if;
  end if;
  return new;
end
$$;

-- The earlier results each started row needs, keyed by item id: {"<item_id>": {"<step>": result}}.
-- One query per needed results table for the whole bulk call, not one per row.
create function public.needed_results(p_started jsonb) returns jsonb
language plpgsql stable
set search_path = public, pg_temp
as $$
declare
  v_need record;
  v_part jsonb;
  v_inputs jsonb := '{}'::jsonb;
begin
  for v_need in
    select distinct n.need, r.results_table
    from jsonb_to_recordset(p_started) s(config jsonb)
    cross join lateral jsonb_array_elements_text(
      case when jsonb_typeof(s.config -> 'needs') = 'array' then s.config -> 'needs' else '[]' end) n(need)
    join enrichment_registry r on r.step_name = n.need
    where r.results_table is not null
  loop
    execute format(
      'select coalesce(jsonb_object_agg(t.item_id::text, t.result), ''{}'')
       from public.%I t
       join jsonb_to_recordset($1) s(batch_id uuid, item_id uuid, config jsonb)
         on t.batch_id = s.batch_id and t.item_id = s.item_id
       where s.config -> ''needs'' ? $2', v_need.results_table)
      into v_part using p_started, v_need.need;
    select v_inputs || coalesce(jsonb_object_agg(
             e.key, coalesce(v_inputs -> e.key, '{}'::jsonb) || jsonb_build_object(v_need.need, e.value)),
           '{}'::jsonb)
      into v_inputs
    from jsonb_each(v_part) e;
  end loop;
  return v_inputs;
end
$$;

drop function public.start_steps(jsonb);

create function public.start_steps(p_tasks jsonb)
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
      and ws.attempt = i.attempt and ws.status in ('QUEUED', 'IN_PROGRESS')
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

-- step_async: the built-in ASYNC shell, answered by a local provider emulator --------------------

create table public.step_async_results (
  batch_id uuid not null,
  item_id uuid not null,
  attempt integer not null,
  result jsonb not null,
  request_id text generated always as (result ->> 'request_id') stored,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (batch_id, item_id),
  foreign key (batch_id, item_id) references public.batch_items (batch_id, id) on delete cascade
);
alter table public.step_async_results enable row level security;
create policy step_async_results_read_own_client on public.step_async_results
  for select to authenticated using (public.owns_batch(batch_id));
revoke all on public.step_async_results from anon, authenticated;
grant select on public.step_async_results to authenticated;
grant all on public.step_async_results to service_role;
