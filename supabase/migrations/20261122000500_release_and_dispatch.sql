-- Two more guarded transitions for the conductor and the local worker pool.

-- A clean shutdown (Ctrl-C, SIGTERM) hands back rows it claimed or started but did not finish, and
-- the conductor hands back rows it could not send to workers: QUEUED | IN_PROGRESS -> PENDING, and
-- the attempt is refunded (retry_from + 1) because the step never ran to a verdict. Attempt numbers
-- still increase, so fencing holds. delay_seconds (default 0) keeps a row back, so a conductor
-- facing an outage does not spin on the same rows.
-- p_tasks: [{batch_id, item_id, step_name, attempt, reason?, delay_seconds?}]
create function public.release_steps(p_tasks jsonb)
returns table (batch_id uuid, item_id uuid, step_name text, attempt integer, outcome text)
language plpgsql
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
  perform require_task_array(p_tasks);
  return query
  with input as (
    select * from jsonb_to_recordset(p_tasks)
      as t(batch_id uuid, item_id uuid, step_name text, attempt integer, reason text,
           delay_seconds float8)
  ), released as (
    update workflow_states ws
    set status = 'PENDING', lease_expires_at = null, started_at = null,
        run_after = now() + make_interval(secs => greatest(coalesce(i.delay_seconds, 0), 0)),
        retry_from = ws.retry_from + 1, updated_at = now(),
        meta = ws.meta || jsonb_build_object('released', jsonb_build_object(
          'attempt', ws.attempt, 'at', now(), 'reason', coalesce(i.reason, 'worker shut down')))
    from input i
    where ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
      and ws.attempt = i.attempt and ws.status in ('QUEUED', 'IN_PROGRESS')
    returning ws.batch_id, ws.item_id, ws.step_name
  )
  select i.batch_id, i.item_id, i.step_name, i.attempt,
         call_outcome(r.item_id is not null, ws.attempt, i.attempt)
  from input i
  left join released r on r.batch_id = i.batch_id and r.item_id = i.item_id and r.step_name = i.step_name
  left join workflow_states ws
    on ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name;
end
$$;

-- Records where a claimed row was sent (e.g. the Modal function call id) in meta.dispatch, for
-- tracing a row to its worker. Only the current attempt of a QUEUED or IN_PROGRESS row is touched.
-- p_dispatches: [{batch_id, item_id, step_name, attempt, call_id}]
create function public.mark_dispatched(p_dispatches jsonb) returns integer
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_count integer;
begin
  perform require_task_array(p_dispatches);
  update workflow_states ws
  set meta = ws.meta || jsonb_build_object('dispatch', jsonb_build_object(
        'call_id', i.call_id, 'attempt', ws.attempt, 'at', now()))
  from jsonb_to_recordset(p_dispatches)
    as i(batch_id uuid, item_id uuid, step_name text, attempt integer, call_id text)
  where ws.batch_id = i.batch_id and ws.item_id = i.item_id and ws.step_name = i.step_name
    and ws.attempt = i.attempt and ws.status in ('QUEUED', 'IN_PROGRESS');
  get diagnostics v_count = row_count;
  return v_count;
end
$$;

revoke execute on function public.release_steps(jsonb), public.mark_dispatched(jsonb)
  from public, anon, authenticated;
grant execute on function public.release_steps(jsonb), public.mark_dispatched(jsonb) to service_role;
