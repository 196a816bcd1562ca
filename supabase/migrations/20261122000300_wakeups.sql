-- Wake-ups: one pg_notify per statement that changes workflow_states, never one per row.
--
-- Channel `enrichment_state_changed`, payload {"op", "batch_ids": [...], "ready": n, "finished": n,
-- "more_batches": bool}. Only statements that make rows ready (PENDING) or finish them (COMPLETED,
-- FAILED) notify: claims, starts and heartbeats are the conductor's and workers' own doing and
-- would only wake the conductor for nothing. Notifications are delivered at commit, and identical
-- ones within a transaction are folded by PostgreSQL. They are a hint, never the only path: the
-- conductor also sweeps on a timer.

create function public.notify_state_change() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_ready bigint;
  v_finished bigint;
  v_batch_ids jsonb;
  v_batches bigint;
  v_change jsonb;
begin
  select count(*) filter (where c.status = 'PENDING'),
         count(*) filter (where c.status in ('COMPLETED', 'FAILED'))
    into v_ready, v_finished
  from changed c;
  if v_ready = 0 and v_finished = 0 then
    return null;
  end if;
  -- pg_notify payloads are limited to 8000 bytes: name at most 100 batches.
  select coalesce(jsonb_agg(x.batch_id), '[]'::jsonb), max(x.total)
    into v_batch_ids, v_batches
  from (select b.batch_id, count(*) over () as total
        from (select distinct c.batch_id from changed c) b limit 100) x;
  v_change := jsonb_build_object(
    'op', tg_op,
    'batch_ids', v_batch_ids,
    'more_batches', coalesce(v_batches, 0) > 100,
    'ready', v_ready,
    'finished', v_finished);
  perform pg_notify('enrichment_state_changed', v_change::text);
  -- On Supabase the same statement also posts the Database Webhook (pg_net, debounced): see
  -- 20261122000600_database_webhooks.sql. Plain PostgreSQL has no net schema: pg_notify only.
  if to_regprocedure('net.http_post(text, jsonb, jsonb, jsonb, integer)') is not null
     and to_regprocedure('public.state_webhook_notify(jsonb)') is not null then
    perform public.state_webhook_notify(v_change);
  end if;
  return null;
end
$$;

create trigger workflow_states_notify_insert
  after insert on public.workflow_states
  referencing new table as changed
  for each statement execute function public.notify_state_change();

create trigger workflow_states_notify_update
  after update on public.workflow_states
  referencing new table as changed
  for each statement execute function public.notify_state_change();
