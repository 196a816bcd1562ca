-- Runtime queries, one place, each named by a `-- name: <name>` header (read by shared.queries).
-- Every state change is a State API function of supabase/migrations; these only call them.

-- name: create_batch
select public.create_batch(%(blueprint)s, %(items)s, %(client_id)s, %(name)s, %(budget_usd)s::numeric,
                           %(use_cache)s) as batch_id;

-- name: claim_steps
select batch_id, item_id, step_name, attempt, modal_function_name, step_type::text, lease_expires_at
from public.claim_steps(%(limit)s, %(step_names)s, %(batch_ids)s, %(owner)s);

-- name: start_steps
select batch_id, item_id, step_name, attempt, outcome, raw_data, config, inputs
from public.start_steps(%(tasks)s);

-- name: complete_steps
select batch_id, item_id, step_name, attempt, outcome from public.complete_steps(%(results)s);

-- name: fail_steps
select batch_id, item_id, step_name, attempt, outcome, status::text
from public.fail_steps(%(failures)s);

-- name: defer_steps
select batch_id, item_id, step_name, attempt, outcome, status::text
from public.defer_steps(%(deferrals)s);

-- name: record_costs
select count(*) filter (where outcome = 'ok') as recorded from public.record_costs(%(costs)s);

-- name: set_batch_budget
select public.set_batch_budget(%(batch_id)s, %(budget_usd)s::numeric) as budget;

-- name: submit_steps
select batch_id, item_id, step_name, attempt, outcome from public.submit_steps(%(submissions)s);

-- name: heartbeat_steps
select batch_id, item_id, step_name, attempt, outcome from public.heartbeat_steps(%(tasks)s);

-- name: sweep_expired_leases
select batch_id, item_id, step_name, attempt, status::text from public.sweep_expired_leases(%(limit)s);

-- name: lease_owners
select lease_owner, leased from public.lease_owners(%(prefix)s, %(batch_ids)s);

-- name: reclaim_orphaned_steps
select batch_id, item_id, step_name, attempt, status::text
from public.reclaim_orphaned_steps(%(owners)s, %(batch_ids)s);

-- name: retry_failed
select public.retry_failed(%(batch_id)s, %(step_name)s) as retried;

-- name: cancel_batch
select public.cancel_batch(%(batch_id)s) as cancelled;

-- name: batch_progress
select public.batch_progress(%(batch_id)s) as progress;

-- name: release_steps
select batch_id, item_id, step_name, attempt, outcome from public.release_steps(%(tasks)s);

-- name: mark_dispatched
select public.mark_dispatched(%(dispatches)s) as marked;

-- name: export_steps
-- The blueprint of a batch in order, each step with its results table (null: no result columns),
-- and its function and config (which say what its result holds: shared/step_outputs.py).
-- require_batch raises P0002 for an unknown batch.
select bp.step_name, r.results_table, b.item_count, r.modal_function_name, r.config
from public.require_batch(%(batch_id)s) b
cross join lateral jsonb_array_elements_text(b.blueprint) with ordinality as bp(step_name, ord)
left join public.enrichment_registry r on r.step_name = bp.step_name
order by bp.ord;

-- name: export_input_keys
-- The union of the items' raw_data keys: in the CSV's column order where the import recorded it
-- (batches.meta.source.keys), then in first-seen order (jsonb keeps no key order: keys first seen
-- in the same item come in byte order). One aggregate, computed in the database.
with declared as (
  select d.key, d.ord
  from public.batches b
  cross join lateral jsonb_array_elements_text(
    case when jsonb_typeof(b.meta -> 'source' -> 'keys') = 'array'
         then b.meta -> 'source' -> 'keys' else '[]'::jsonb end) with ordinality as d(key, ord)
  where b.id = %(batch_id)s
), seen as (
  select k.key, min(bi.seq) as first_seq
  from public.batch_items bi
  cross join lateral jsonb_object_keys(bi.raw_data) as k(key)
  where bi.batch_id = %(batch_id)s
  group by k.key
)
select s.key
from seen s left join declared d on d.key = s.key
order by d.ord nulls last, s.first_seq, s.key collate "C";

-- name: export_headers
-- The CSV's own header names, {header: key}, and its keys in column order, as the import recorded
-- them (null for a batch made by SQL or Studio).
select meta -> 'source' -> 'columns', meta -> 'source' -> 'keys'
from public.batches where id = %(batch_id)s;

-- name: step_functions
-- The function the registry runs each step with (the local worker service checks spawns by it).
select step_name, modal_function_name from public.enrichment_registry
where step_name = any(%(step_names)s);

-- name: cluster_clients
-- Who else is connected to the server, by application name (`enrich db down` refuses to cut
-- them off). Client backends only: not autovacuum, walwriter or pg_cron's launcher.
select coalesce(application_name, '') as application_name, count(*) as connections
from pg_catalog.pg_stat_activity
where backend_type = 'client backend' and pid <> pg_catalog.pg_backend_pid()
group by 1
order by 1;
