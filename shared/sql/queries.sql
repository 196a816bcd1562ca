-- Runtime queries, one place, each named by a `-- name: <name>` header (read by shared.queries).
-- Every state change is a State API function of supabase/migrations; these only call them.

-- name: create_batch
select public.create_batch(%(blueprint)s, %(items)s, %(client_id)s, %(name)s) as batch_id;

-- name: claim_steps
select batch_id, item_id, step_name, attempt, modal_function_name, step_type::text, lease_expires_at
from public.claim_steps(%(limit)s, %(step_names)s, %(batch_ids)s);

-- name: start_steps
select batch_id, item_id, step_name, attempt, outcome, raw_data, config
from public.start_steps(%(tasks)s);

-- name: complete_steps
select batch_id, item_id, step_name, attempt, outcome from public.complete_steps(%(results)s);

-- name: fail_steps
select batch_id, item_id, step_name, attempt, outcome, status::text
from public.fail_steps(%(failures)s);

-- name: heartbeat_steps
select batch_id, item_id, step_name, attempt, outcome from public.heartbeat_steps(%(tasks)s);

-- name: sweep_expired_leases
select batch_id, item_id, step_name, attempt, status::text from public.sweep_expired_leases(%(limit)s);

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
