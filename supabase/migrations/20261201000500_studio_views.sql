-- Views for Supabase Studio: where each batch stands, step by step, and each item with its inputs
-- and its results side by side, so a Studio user (or a Data API client) needs no SQL.
--
--   studio_batch_progress  one row per (batch, blueprint step): counts per status, the rows awaiting
--                          a callback, skipped by a condition or served from the cache (read from
--                          batch_progress), percent done, the step's spend and the batch's budget.
--   studio_batch_items     one row per item: its inputs (raw_data), a summary (status, the step it
--                          is at, the first error) and "steps": {"<step>": {status, attempt, error,
--                          result, ...}} with each step's result read from its registry
--                          results_table.
--
-- Both are security_invoker views: "Views bypass RLS by default because they are usually created
-- with the postgres user ... In Postgres 15 and above, you can make a view obey the RLS policies of
-- the underlying tables when invoked by anon and authenticated roles by setting
-- security_invoker = true" (Supabase docs, Database > Row Level Security > Views,
-- https://supabase.com/docs/guides/database/postgres/row-level-security#views; PostgreSQL 15
-- CREATE VIEW). So a signed-in user sees only its own client's rows through them, by the tables'
-- own policies; service_role and the owner (Studio's table editor) see every tenant.
--
-- Speed at a million rows of other tenants: both views start from batches, whose policy
-- (client_id = request_client_id()) is an index condition on batches_client_created, and reach
-- items, states, results and the ledger by (batch_id, ...) indexes, whatever the statistics say
-- (tests/test_studio_views.py checks the plans, with batch_id's n_distinct pinned as
-- 20261201000300 does and as ANALYZE measures it). Supabase's RLS guide: "Add filters to every
-- query ... Even though this duplicates the contents of the Policy, Postgres can use the filter to
-- construct a better query plan": the views filter items by the batches the caller can see, so
-- an unfiltered Studio page never scans every tenant's items. Measured here with 1,000,000 items of
-- another tenant (batch_id's statistics as ANALYZE measures them): a small tenant's first page of
-- items in 1-6 ms and its progress in 5 ms; the big batch's owner gets its first page in 5 ms and
-- its progress in 1.4 s (batch_progress counts its 2,000,000 state rows). A plain join of batches
-- to items chose a sequential scan of all of them (50 s with the per-row owns_batch policies).

-- Results tables are per step and may be added later (a registry row names one), so the item view
-- is generated: refresh_studio_views() rebuilds it with one branch per results table, each gated by
-- its step name (the planner probes only the matching table, by its primary key). It runs here and
-- after every change of the registry's results tables. A results table that `authenticated` may
-- not read is left out (its steps show status and error, no result): a security_invoker view that
-- names a table its caller may not read fails for every caller. A migration that adds a step
-- secures its results table first (secure_results_table, 20261201000300, grants the select), then
-- registers the step; a grant made later needs `select public.refresh_studio_views()`.

-- Progress per (batch, step) -------------------------------------------------------------------------

create view public.studio_batch_progress with (security_invoker = true) as
select b.id as batch_id,
       b.name as batch_name,
       b.status as batch_status,
       bp.ord::integer as step_number,
       bp.step_name,
       b.item_count as items,
       (p.progress -> 'steps' -> bp.step_name ->> 'PENDING')::bigint as pending,
       (p.progress -> 'steps' -> bp.step_name ->> 'QUEUED')::bigint as queued,
       (p.progress -> 'steps' -> bp.step_name ->> 'IN_PROGRESS')::bigint as in_progress,
       (p.progress -> 'steps' -> bp.step_name ->> 'COMPLETED')::bigint as completed,
       (p.progress -> 'steps' -> bp.step_name ->> 'FAILED')::bigint as failed,
       (p.progress -> 'awaiting_callback' ->> bp.step_name)::bigint as awaiting_callback,
       (p.progress -> 'skipped' ->> bp.step_name)::bigint as skipped,
       (p.progress -> 'cached' ->> bp.step_name)::bigint as cached,
       -- Rows of this step that finished (COMPLETED or FAILED), out of the batch's items.
       round(100.0 * ((p.progress -> 'steps' -> bp.step_name ->> 'COMPLETED')::bigint
                      + (p.progress -> 'steps' -> bp.step_name ->> 'FAILED')::bigint)
             / nullif(b.item_count, 0), 1) as percent_done,
       coalesce((s.spend -> bp.step_name ->> 'usd')::numeric, 0) as spent_usd,
       coalesce((s.spend -> bp.step_name ->> 'calls')::bigint, 0) as paid_calls,
       b.spent_usd as batch_spent_usd,
       b.budget_usd as batch_budget_usd,
       (p.progress -> 'cost' ->> 'projected_rest_usd')::numeric as batch_projected_rest_usd,
       (p.progress -> 'cost' ->> 'paused_reason') as paused_reason,
       b.cancelled_at is not null as cancelled,
       b.created_at,
       b.updated_at
from public.batches b
-- The counts are batch_progress's own (one function, one definition of each count), computed once
-- per batch: a function in FROM is not inlined, so it runs once per row of batches, as the caller
-- (RLS applies), and its query is planned for that batch alone.
cross join lateral public.batch_progress(b.id) as p(progress)
cross join lateral (
  -- The ledger: what each step's provider calls cost (cache hits are recorded at zero).
  select jsonb_object_agg(x.step_name, jsonb_build_object('usd', x.usd, 'calls', x.calls)) as spend
  from (select pc.step_name, sum(pc.usd) as usd, count(*) filter (where not pc.cached) as calls
        from public.provider_costs pc
        where pc.batch_id = b.id
        group by pc.step_name) x
) s
cross join lateral jsonb_array_elements_text(b.blueprint) with ordinality as bp(step_name, ord);

comment on view public.studio_batch_progress is
  'Each batch''s progress per blueprint step: counts per status (awaiting_callback, skipped and '
  'cached are COMPLETED or IN_PROGRESS rows counted again), percent done and spend. RLS applies.';

-- Items with inputs and results, generated from the registry -------------------------------------------

-- The lateral subquery that finds a state row's result: one branch per results table the signed-in
-- role may read, gated by its step name.
create function public.studio_result_branches() returns text
language sql stable
set search_path = public, pg_temp
as $$
  select coalesce(
    string_agg(format(
      'select r.result from public.%I r'
      ' where ws.step_name = %L and r.batch_id = ws.batch_id and r.item_id = ws.item_id',
      r.results_table, r.step_name), ' union all ' order by r.step_name),
    'select null::jsonb as result where false')
  from enrichment_registry r
  where r.results_table is not null
    and to_regclass(format('public.%I', r.results_table)) is not null
    and has_table_privilege('authenticated', format('public.%I', r.results_table), 'select')
$$;

-- (Re)creates studio_batch_items. security definer: it runs from a trigger on the registry, whoever
-- changes it, and only the owner may replace the view. Its columns never change, so
-- create or replace keeps the view's grants.
create function public.refresh_studio_views() returns void
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  execute format($view$
    create or replace view public.studio_batch_items with (security_invoker = true) as
    select b.id as batch_id,
           b.name as batch_name,
           i.seq,
           i.id as item_id,
           i.raw_data as inputs,
           -- COMPLETED when every blueprint step is, FAILED when a step failed (or the batch was
           -- cancelled), IN_PROGRESS once a step was claimed, else PENDING.
           case when st.failed > 0 then 'FAILED'
                when st.completed >= jsonb_array_length(b.blueprint) then 'COMPLETED'
                when st.started > 0 then 'IN_PROGRESS'
                else 'PENDING' end as status,
           st.current_step,
           st.error,
           coalesce(st.steps, '{}'::jsonb) as steps,
           st.last_change_at
    from public.batches b
    -- Items batch by batch, in import order: a lateral subquery with its own order stays a
    -- parameterised scan of batch_items_batch_seq, whatever the planner guesses a batch holds.
    cross join lateral (
      select i.id, i.seq, i.raw_data from public.batch_items i
      where i.batch_id = b.id
      order by i.seq
    ) i
    cross join lateral (
      select count(*) filter (where ws.status = 'FAILED') as failed,
             count(*) filter (where ws.status = 'COMPLETED') as completed,
             count(*) filter (where ws.status <> 'PENDING') as started,
             (array_agg(ws.step_name order by ws.step_index desc))[1] as current_step,
             (array_agg(ws.step_name || ': ' || coalesce(ws.meta ->> 'error', 'failed')
                        order by ws.step_index)
                filter (where ws.status = 'FAILED'))[1] as error,
             jsonb_object_agg(ws.step_name, jsonb_strip_nulls(jsonb_build_object(
               'status', ws.status,
               'attempt', ws.attempt,
               'error', case when ws.status = 'FAILED' then ws.meta ->> 'error' end,
               'last_error', case when ws.status in ('PENDING', 'QUEUED', 'IN_PROGRESS')
                                  then ws.meta -> 'last_error' ->> 'message' end,
               'awaiting_callback',
                 case when public.awaiting_callback(ws.status, ws.attempt, ws.meta) then true end,
               'skipped', case when ws.status = 'COMPLETED' then ws.meta ->> 'skipped' end,
               'cached', case when ws.status = 'COMPLETED' and ws.meta ? 'cached' then true end,
               'result', res.result))) as steps,
             max(ws.updated_at) as last_change_at
      from public.workflow_states ws
      left join lateral (%s) res on true
      where ws.batch_id = b.id and ws.item_id = i.id
    ) st
  $view$, studio_result_branches());
  comment on view public.studio_batch_items is
    'Each item: its inputs (raw_data) and, per blueprint step reached, {status, attempt, error, '
    'result} (result from the step''s results table). RLS applies. Rebuilt by refresh_studio_views().';
end
$$;

select public.refresh_studio_views();

create function public.studio_views_follow_registry() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  perform refresh_studio_views();
  return null;
end
$$;

create trigger enrichment_registry_studio_views
  after insert or delete or update of results_table on public.enrichment_registry
  for each statement execute function public.studio_views_follow_registry();

-- Privileges ----------------------------------------------------------------------------------------
-- Explicit, whatever the default privileges say: the signed-in role and the service role read the
-- views (RLS decides which rows), anon gets nothing. The views call awaiting_callback as their
-- caller.

revoke all on public.studio_batch_progress, public.studio_batch_items from public, anon, authenticated;
grant select on public.studio_batch_progress, public.studio_batch_items to authenticated, service_role;

revoke execute on function public.studio_result_branches(), public.refresh_studio_views(),
  public.studio_views_follow_registry() from public, anon, authenticated;
grant execute on function public.refresh_studio_views() to service_role;
grant execute on function public.awaiting_callback(public.workflow_status, integer, jsonb)
  to authenticated, service_role;
