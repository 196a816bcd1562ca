-- mark_dispatched also records the call id of a row its worker already finished.
--
-- The conductor learns a call id only when spawn returns, and a fast worker (a cache hit, the
-- local stand-in for Modal, an ASYNC step whose provider answered at once) can complete or fail
-- the row before the conductor records it: the row then kept no trace of the call that did it.
-- The attempt still guards against a stale mark: a row handed back and claimed again has a higher
-- attempt and is not touched. A PENDING row of the same attempt was handed back (released) and
-- ran nowhere, so it is still skipped. Marking a finished row wakes the conductor once more (the
-- statement changes COMPLETED/FAILED rows); that happens only when the worker beat the mark.
create or replace function public.mark_dispatched(p_dispatches jsonb) returns integer
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
    and ws.attempt = i.attempt and ws.status in ('QUEUED', 'IN_PROGRESS', 'COMPLETED', 'FAILED');
  get diagnostics v_count = row_count;
  return v_count;
end
$$;
