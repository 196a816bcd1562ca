-- Quotas, server-managed columns and direct-SQL guards (issue 9, items 2, 6 and 7).
--
-- 1. Quotas, enforced by triggers so that every way in obeys them: create_batch, the CSV import's
--    COPY, Supabase Studio and PostgREST inserts alike. Limits are enrichment_settings rows (below,
--    generous defaults; an operator edits the row, no migration needed). A refusal raises SQLSTATE
--    23514 (check_violation: PostgREST answers 400, the client's fault) with CONSTRAINT = the
--    setting's key, a message naming the limit, the value and the setting, and nothing is written
--    (the statement, hence the import's transaction, is rolled back).
--      quota_items_per_batch              items one batch may hold
--      quota_item_bytes                   size of one item's raw_data (pg_column_size: the jsonb as
--                                         received, about the length of its JSON text)
--      quota_batch_name_chars             length of batches.name
--      quota_batch_meta_bytes             size of batches.meta
--      quota_unfinished_rows_per_client   PENDING | QUEUED | IN_PROGRESS rows one client may have
--    The item checks are one statement-level trigger over the inserted rows (a transition table),
--    never a row trigger: a 1,000,000-row COPY pays one pass over the rows, not a million calls.
-- 2. Server-managed columns of batches: a new batch always starts PENDING, empty, stamped now(),
--    whatever an insert says (a BEFORE INSERT trigger, for every role); a tenant (authenticated)
--    may insert only the columns it owns, so it cannot pick an id either (which would also let it
--    probe for another tenant's batch id through a duplicate-key error).
-- 3. Direct SQL on workflow_states: a row's status, attempt and identity change only through the
--    State API functions. A statement-level trigger reads the call stack (PG_CONTEXT) once per
--    statement and refuses an INSERT, or an UPDATE of those columns, that no State API function
--    runs (Studio's table editor, the SQL editor, PostgREST as service_role). Operators keep
--    their tools: retry_failed, cancel_batch and the rest are State API functions; and
--    `set local enrich.allow_direct_state_edits = on` opens the door for one transaction.
--    The sweep now also recovers QUEUED / IN_PROGRESS rows that have no lease at all (made by hand
--    before this guard, or through that door), which no lease expiry would ever reach.

-- 1. Quotas ----------------------------------------------------------------------------------------

insert into public.enrichment_settings (key, value) values
  ('quota_items_per_batch', '2000000'),
  ('quota_item_bytes', '1048576'),
  ('quota_batch_name_chars', '1000'),
  ('quota_batch_meta_bytes', '1048576'),
  ('quota_unfinished_rows_per_client', '10000000')
on conflict (key) do nothing;

comment on table public.enrichment_settings is
  'Operational settings read at run time (webhook_debounce_seconds, webhook_source, '
  'webhook_timeout_ms; prefect_webhook_url only where Supabase Vault is missing; the quota_* '
  'limits of 20261201000200_quotas_and_guards.sql). Not exposed to anon or authenticated.';

-- The limit a quota setting holds. An unset or unreadable value falls back to the default, as
-- enrichment_setting_number does for every other setting.
create function public.quota_limit(p_key text) returns bigint
language sql stable
security definer
set search_path = public, pg_temp
as $$
  select public.enrichment_setting_number(p_key, case p_key
    when 'quota_items_per_batch' then 2000000
    when 'quota_item_bytes' then 1048576
    when 'quota_batch_name_chars' then 1000
    when 'quota_batch_meta_bytes' then 1048576
    when 'quota_unfinished_rows_per_client' then 10000000
  end)::bigint
$$;

-- The one way a quota refuses: SQLSTATE 23514, CONSTRAINT = the setting, the figures in the text.
create function public.quota_exceeded(p_key text, p_what text, p_value bigint, p_unit text, p_limit bigint)
returns void
language plpgsql
as $$
begin
  raise exception 'quota exceeded: % is % %; the limit is % (enrichment_settings.%)',
    p_what, p_value, p_unit, p_limit, p_key
    using errcode = '23514', constraint = p_key,
          hint = format('an operator may raise it: update enrichment_settings set value = ''<n>'' '
                        'where key = %L', p_key);
end
$$;

-- Name and meta of a batch: checked on insert and whenever they change.
create function public.batches_check_quotas(p_name text, p_meta jsonb) returns void
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_limit bigint;
begin
  v_limit := quota_limit('quota_batch_name_chars');
  if char_length(p_name) > v_limit then
    perform quota_exceeded('quota_batch_name_chars', 'the batch name''s length',
                           char_length(p_name), 'characters', v_limit);
  end if;
  v_limit := quota_limit('quota_batch_meta_bytes');
  if pg_column_size(p_meta) > v_limit then
    perform quota_exceeded('quota_batch_meta_bytes', 'the size of the batch''s meta',
                           pg_column_size(p_meta), 'bytes', v_limit);
  end if;
end
$$;

-- Item quotas, once per INSERT / COPY statement on batch_items. Named so that it fires before
-- batch_items_seed_first_step (same timing, triggers fire in name order): a refused import never
-- seeds its first steps. security definer: it counts the client's rows without row security
-- (which would call owns_batch per row) and reads the settings.
create function public.batch_items_check_quotas() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_limit bigint;
  v_seq bigint;
  v_size bigint;
  v_batches uuid[];
  v_counts bigint[];
  v_batch uuid;
  v_count bigint;
  v_client uuid;
  v_active bigint;
begin
  -- One pass over the inserted rows (a hash aggregate): items per batch and the largest item.
  -- pg_column_size reads the datum's length word: no parsing, no copy. The rest of the checks
  -- work on these few per-batch figures; only a refusal looks at the rows again, to name one.
  select array_agg(c.batch_id), array_agg(c.n), max(c.biggest) into v_batches, v_counts, v_size
  from (select n.batch_id, count(*) as n, max(pg_column_size(n.raw_data)) as biggest
        from new_items n group by n.batch_id) c;
  if v_batches is null then
    return null;
  end if;

  v_limit := quota_limit('quota_item_bytes');
  if v_size > v_limit then
    select n.seq, pg_column_size(n.raw_data) into v_seq, v_size
    from new_items n where pg_column_size(n.raw_data) > v_limit
    order by n.seq limit 1;
    perform quota_exceeded('quota_item_bytes',
      format('the size of the raw_data of item %s of this insert',
             (select count(*) from new_items n where n.seq <= v_seq)),
      v_size, 'bytes', v_limit);
  end if;

  -- Items per batch and unfinished rows per client. Concurrent inserts for one client are
  -- serialised from here to their commit (an advisory lock per client, its own namespace 7102),
  -- so two imports cannot both pass a check that only one fits; each statement of this function
  -- then reads what the other committed. A lock, not a row lock on batches: inserted items hold
  -- KEY SHARE on their batch, which FOR UPDATE would wait for.
  perform pg_advisory_xact_lock(7102, hashtext(c.client_id::text))
  from (select distinct b.client_id from batches b where b.id = any(v_batches)
        order by b.client_id) c;

  v_limit := quota_limit('quota_items_per_batch');
  select b.id, b.item_count + c.n into v_batch, v_count
  from unnest(v_batches, v_counts) c(batch_id, n)
  join batches b on b.id = c.batch_id
  where b.item_count + c.n > v_limit
  limit 1;
  if v_batch is not null then
    perform quota_exceeded('quota_items_per_batch',
                           format('the number of items of batch %s', v_batch), v_count, 'items',
                           v_limit);
  end if;

  -- Each item has at most one unfinished row (the next step is seeded when one completes), so the
  -- items of a client's unfinished batches bound its unfinished rows from above: a lookup of a few
  -- batches rows. Only a client near its limit pays for the exact count, through the partial
  -- index on unfinished rows.
  v_limit := quota_limit('quota_unfinished_rows_per_client');
  for v_client, v_count in
    select b.client_id, sum(c.n)
    from unnest(v_batches, v_counts) c(batch_id, n)
    join batches b on b.id = c.batch_id
    group by b.client_id
  loop
    select coalesce(sum(b.item_count), 0) into v_active
    from batches b
    where b.client_id = v_client and b.status in ('PENDING', 'IN_PROGRESS');
    continue when v_active + v_count <= v_limit;
    select count(*) into v_active
    from workflow_states ws
    where ws.status in ('PENDING', 'QUEUED', 'IN_PROGRESS')
      and ws.batch_id in (select b.id from batches b
                          where b.client_id = v_client and b.status in ('PENDING', 'IN_PROGRESS'));
    if v_active + v_count > v_limit then
      perform quota_exceeded('quota_unfinished_rows_per_client',
        format('the number of unfinished rows of client %s with this insert (%s new)', v_client, v_count),
        v_active + v_count, 'rows', v_limit);
    end if;
  end loop;
  return null;
end
$$;

create trigger batch_items_check_quotas
  after insert on public.batch_items
  referencing new table as new_items
  for each statement execute function public.batch_items_check_quotas();

-- 2. Server-managed columns of batches ------------------------------------------------------------

-- A new batch is PENDING, empty, created now: status, counts and timestamps are the database's
-- (the items' insert trigger counts items, claims and the roll-up move the status). For every
-- role, Studio's table editor included. Named to fire first among the batches row triggers
-- (batches_budget, batches_check_*): they see the reset row. security definer: a tenant needs no
-- privilege on the quota functions it calls.
create function public.batches_admit() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  if tg_op = 'INSERT' then
    new.status := 'PENDING';
    new.item_count := 0;
    new.created_at := now();
    new.updated_at := now();
    new.started_at := null;
    new.finished_at := null;
    new.cancelled_at := null;
    new.spent_usd := 0;
    new.paused_reason := null;
  end if;
  perform batches_check_quotas(new.name, new.meta);
  return new;
end
$$;

create trigger batches_admit
  before insert or update of name, meta on public.batches
  for each row execute function public.batches_admit();

-- A tenant inserts only the columns it owns. Column privileges, so a tenant naming id, status,
-- item_count, a timestamp or spent_usd gets "permission denied" (42501) before any row is looked
-- at: no duplicate-key answer can tell it whether another tenant's id exists. The list is every
-- column but the server-managed ones, so a column an earlier migration added for tenants (a
-- priority, say) stays insertable; a column added later is not until its migration grants it.
do $$
declare
  v_columns text;
begin
  select string_agg(quote_ident(a.attname), ', ' order by a.attnum) into v_columns
  from pg_attribute a
  where a.attrelid = 'public.batches'::regclass and a.attnum > 0 and not a.attisdropped
    and a.attname not in ('id', 'status', 'item_count', 'created_at', 'updated_at', 'started_at',
                          'finished_at', 'cancelled_at', 'spent_usd', 'paused_reason');
  revoke insert on public.batches from anon, authenticated;
  execute format('grant insert (%s) on public.batches to authenticated', v_columns);
end
$$;

-- Items: a tenant gives the batch and the data; the id (the same probe as above), seq and
-- created_at are the database's.
revoke insert on public.batch_items from anon, authenticated;
grant insert (batch_id, raw_data) on public.batch_items to authenticated;

-- 3. Direct SQL on workflow_states ----------------------------------------------------------------

-- The State API functions that insert or update workflow_states, by name, plus the trigger
-- functions that seed rows. One of them anywhere on the call stack admits the statement: helper
-- functions they call (fail_rows under sweep_expired_leases, a new helper of claim_steps) need no
-- entry of their own.
create function public.state_api_functions() returns text[]
language sql immutable
as $$
  select array[
    'batch_items_seed_first_step', 'cancel_batch', 'claim_rows', 'claim_steps', 'complete_steps',
    'defer_steps', 'fail_rows', 'fail_steps', 'hand_back_rows', 'heartbeat_steps',
    'mark_dispatched', 'reclaim_orphaned_steps', 'refund_rows', 'release_steps', 'retry_failed',
    'settle_without_provider', 'start_steps', 'submit_steps', 'sweep_expired_leases',
    'sync_settling_steps']
$$;

-- Statement level: one call per statement, whatever the number of rows, so the State API's bulk
-- statements pay a few microseconds each. PG_CONTEXT lists the frames that run this statement,
-- one per line ("PL/pgSQL function complete_steps(jsonb) line 22 at SQL statement",
-- "SQL function \"hand_back_rows\" statement 1"); a statement typed by hand has only this
-- function's own frame, a DO block has "inline_code_block". This is a guard against mistakes,
-- not against the database owner, who may drop it: the owner and service role already hold every
-- privilege on the table. security definer only so that any role may run its helper.
create function public.workflow_states_guard_direct() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_context text;
  v_line text;
  v_name text;
begin
  get diagnostics v_context = pg_context;
  -- Fast path: the outermost frame comes last, and a State API function called by a client is
  -- that frame. Reading its name takes string functions only; a regex over the context (which
  -- holds the statement's text, kilobytes for complete_steps) cost ~30 us a statement, as much
  -- as the statement itself. A function compiled while public was not on the search path is
  -- named public.<name>.
  v_line := split_part(right(v_context, 300), E'\n', -1);
  v_name := case when v_line like 'PL/pgSQL function %' then split_part(substr(v_line, 19), '(', 1)
                 when v_line like 'SQL function "%' then split_part(substr(v_line, 15), '"', 1) end;
  if v_name like 'public.%' then
    v_name := substr(v_name, 8);
  end if;
  if v_name = any(state_api_functions()) then
    return null;
  end if;
  -- Slow path, any frame: the first-step seeding under create_batch, a State API function
  -- called from a DO block or another function.
  if v_context ~ ('\n(PL/pgSQL function |SQL function ")(public\.)?('
                  || array_to_string(state_api_functions(), '|') || ')[("]')
     or current_setting('enrich.allow_direct_state_edits', true) = 'on' then
    return null;
  end if;
  raise exception 'workflow_states rows are created and moved only by the State API: % % refused',
    tg_op, case when tg_op = 'UPDATE' then 'of status, attempt, retry_from or a row''s identity' else '' end
    using errcode = '42501',
          hint = 'use retry_failed(batch_id[, step_name]) or cancel_batch(batch_id); an operator '
                 'who must edit rows by hand runs `set local enrich.allow_direct_state_edits = on` '
                 'in the same transaction';
end
$$;

create trigger workflow_states_guard_direct_insert
  before insert on public.workflow_states
  for each statement execute function public.workflow_states_guard_direct();

create trigger workflow_states_guard_direct_update
  before update of status, attempt, retry_from, batch_id, item_id, step_name, step_index
  on public.workflow_states
  for each statement execute function public.workflow_states_guard_direct();

-- The sweep, as in 20261130000800 plus: a QUEUED or IN_PROGRESS row without a lease is recovered
-- like one whose lease expired (every State API transition into those states sets a lease, so
-- such a row was made by hand, and nothing else would ever move it). Both conditions are ranges
-- of the same partial index (workflow_states_leased).
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
           'kind', case when x.lease_expires_at is null then 'no_lease'
                        when awaiting_callback(x.status, x.attempt, x.meta) then 'callback_timeout'
                        else 'lease_expired' end,
           'refund', refundable(x.status, x.meta),
           'reason', case when x.lease_expires_at is null
                          then format('QUEUED without a lease (attempt %s): set outside the State API',
                                      x.attempt)
                          else format('lease expired while QUEUED (attempt %s): the step never started',
                                      x.attempt) end,
           'error', case when x.lease_expires_at is null
                         then format('%s without a lease (attempt %s): set outside the State API',
                                     x.status, x.attempt)
                         else lease_expiry_error(x.status, x.attempt, x.meta, r.config) end)),
           '[]'::jsonb)
    into v_expired
  from (
    select ws.id, ws.status, ws.attempt, ws.meta, ws.step_name, ws.lease_expires_at
    from workflow_states ws
    where ws.status in ('QUEUED', 'IN_PROGRESS')
      and (ws.lease_expires_at < now() or ws.lease_expires_at is null)
    order by ws.lease_expires_at nulls first
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

-- Privileges: the migration-wide grants (20261122000400) ran before these functions existed.
revoke execute on function public.quota_limit(text), public.quota_exceeded(text, text, bigint, text, bigint),
  public.batches_check_quotas(text, jsonb), public.batch_items_check_quotas(), public.batches_admit(),
  public.state_api_functions(), public.workflow_states_guard_direct()
  from public, anon, authenticated;
grant execute on function public.quota_limit(text), public.quota_exceeded(text, text, bigint, text, bigint),
  public.batches_check_quotas(text, jsonb), public.batch_items_check_quotas(), public.batches_admit(),
  public.state_api_functions(), public.workflow_states_guard_direct()
  to service_role;
