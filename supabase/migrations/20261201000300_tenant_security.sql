-- Tenant security (issue 9, items 3, 4, 5 and 12).
--
-- 1. Row level security that scales. The policies of batch_items, workflow_states, provider_costs
--    and the results tables called owns_batch(batch_id) for every row: a tenant's select read every
--    tenant's rows (seconds at 100,000 others, linear beyond; Supabase's statement timeout for
--    `authenticated` is 8 s). They now compare batch_id with the tenant's batch ids, computed once
--    per statement (an InitPlan: `array(select ...)` is not correlated), which is an index condition
--    on every table keyed by batch_id. No State API function changes.
--    Why n_distinct as well: the planner estimates `batch_id = any($1)` from the column's statistics,
--    and a shared database with a few huge batches (one tenant's 1,000,000 items) has a handful of
--    distinct batch ids, so it expects half the table and scans all of it. A tenant's batches are a
--    small share of a shared table by design: say so (n_distinct 10,000), and the plan is an index
--    scan for the small tenant and an index scan of its own rows for the big one. ANALYZE keeps an
--    n_distinct set this way. result_cache (keyed by client_id) gets the same treatment.
--    secure_results_table() applies all of this to a results table; a migration adding a step calls
--    it, and registry_check_security (5) refuses a results table without RLS.
-- 2. Tenant id from the JWT: app_metadata.client_id only. Supabase's OAuth 2.1 server puts the OAuth
--    app's id in the top-level `client_id` claim ("client_id: Unique identifier of the OAuth client
--    that obtained this token", supabase.com/docs/guides/auth/oauth-server/token-security), so
--    users of different tenants signing in through one app shared a tenant. app_metadata is
--    writable only with the service role key; user_metadata (writable by the user) stays ignored.
-- 3. Default privileges. `alter default privileges in schema public revoke execute on functions
--    from public` (20261122000400) changed nothing: EXECUTE for PUBLIC is a global default, and a
--    per-schema entry can only add to it. Supabase's image also adds per-schema defaults for the
--    role that runs the migrations: its init script (supabase/postgres,
--    migrations/db/init-scripts/00000000000000-initial-schema.sql, run as `postgres` by
--    migrations/db/migrate.sh) says `alter default privileges in schema public grant all on
--    tables|functions|sequences to postgres, anon, authenticated, service_role`. So every later
--    function was callable by anon through /rpc, and every later table and sequence was anon's.
--    Both are revoked for the owning role (the role running this migration: `postgres` on
--    Supabase), globally and in schema public, for functions, tables and sequences; the service
--    role keeps its default grants. Existing objects are re-revoked (earlier migrations, including
--    20261201000100/000200, left PUBLIC execute on several functions, state transitions among
--    them, and Supabase's defaults gave anon the sequences) while the explicit grants stay: the
--    service role keeps what it could call, a signed-in user the tenant-facing functions below.
-- 4. pg-safeupdate: Supabase loads it for sessions through the Data API (supabase/postgres,
--    migrations/db/migrations/20260403172611_safeupdate-data-api-enable.sql: session_preload_libraries
--    of `authenticator`). It refuses an UPDATE or DELETE whose query has no WHERE, nested
--    data-modifying CTEs included, and inside functions too (a post-parse-analyze hook:
--    github.com/eradman/pg-safeupdate, safeupdate.c). state_webhook_send's `delete ... returning`
--    CTE and flush_state_webhook's purge had none, so a worker's change was only ever sent by the
--    pg_cron flush (which runs as postgres with safeupdate.enabled = 0). Both take `where true`.

-- 2. Tenant id ------------------------------------------------------------------------------------

create or replace function public.request_client_id() returns uuid
language sql stable
set search_path = public, pg_temp
as $$
  select nullif(auth.jwt() -> 'app_metadata' ->> 'client_id', '')::uuid
$$;

-- 1. Row level security that scales ----------------------------------------------------------------

-- Enables RLS on a results table keyed by (batch_id, item_id), gives `authenticated` a select of its
-- own batches' rows through the scalable policy, and nothing to anon. For the migration that adds a
-- step: `select public.secure_results_table('public.my_step_results');` before its registry row.
create function public.secure_results_table(p_table regclass) returns void
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_name text := (select c.relname from pg_class c where c.oid = p_table);
begin
  execute format('alter table %s enable row level security', p_table);
  execute format('alter table %s alter column batch_id set (n_distinct = 10000)', p_table);
  execute format('drop policy if exists %I on %s', v_name || '_read_own_client', p_table);
  execute format(
    'create policy %I on %s for select to authenticated using ('
    'batch_id = any (array(select b.id from public.batches b'
    ' where b.client_id = (select public.request_client_id()))))',
    v_name || '_read_own_client', p_table);
  execute format('revoke all on %s from public, anon, authenticated', p_table);
  execute format('grant select on %s to authenticated', p_table);
  execute format('grant all on %s to service_role', p_table);
end
$$;

select public.secure_results_table(t::regclass)
from unnest(array['public.step_a_results', 'public.step_b_results',
                  'public.normalize_domain_results', 'public.clean_company_name_results',
                  'public.step_async_results', 'public.clay_enrich_results',
                  'public.exa_verify_results']) t;

-- Items: reads, updates and deletes through the batch ids; an insert still checks its one batch
-- (a key lookup per new row, as before).
drop policy batch_items_own_client on public.batch_items;
create policy batch_items_own_client on public.batch_items
  for all to authenticated
  using (batch_id = any (array(select b.id from public.batches b
                               where b.client_id = (select public.request_client_id()))))
  with check (public.owns_batch(batch_id));

drop policy workflow_states_read_own_client on public.workflow_states;
create policy workflow_states_read_own_client on public.workflow_states
  for select to authenticated
  using (batch_id = any (array(select b.id from public.batches b
                               where b.client_id = (select public.request_client_id()))));

drop policy provider_costs_read_own_client on public.provider_costs;
create policy provider_costs_read_own_client on public.provider_costs
  for select to authenticated
  using (batch_id = any (array(select b.id from public.batches b
                               where b.client_id = (select public.request_client_id()))));

-- The client id once per statement (an InitPlan), not once per row.
drop policy result_cache_read_own_client on public.result_cache;
create policy result_cache_read_own_client on public.result_cache
  for select to authenticated
  using (client_id = (select public.request_client_id()));

alter table public.batch_items alter column batch_id set (n_distinct = 10000);
alter table public.workflow_states alter column batch_id set (n_distinct = 10000);
alter table public.provider_costs alter column batch_id set (n_distinct = 10000);
alter table public.result_cache alter column client_id set (n_distinct = 10000);

-- 3. Default privileges and existing grants --------------------------------------------------------

do $$
begin
  -- Global: PUBLIC's EXECUTE on every new function. Per schema: what Supabase's image adds.
  execute format('alter default privileges for role %I revoke execute on functions from public',
                 current_user);
  execute format('alter default privileges for role %I in schema public '
                 'revoke all on functions from public, anon, authenticated', current_user);
  execute format('alter default privileges for role %I in schema public '
                 'revoke all on tables from public, anon, authenticated', current_user);
  execute format('alter default privileges for role %I in schema public '
                 'revoke all on sequences from public, anon, authenticated', current_user);
  -- What the service role is meant to have on new objects (as 20261122000400 said, now for the
  -- owning role explicitly).
  execute format('alter default privileges for role %I in schema public '
                 'grant all on tables to service_role', current_user);
  execute format('alter default privileges for role %I in schema public '
                 'grant usage, select on sequences to service_role', current_user);
  execute format('alter default privileges for role %I in schema public '
                 'grant execute on functions to service_role', current_user);
end
$$;

-- Functions: the service role keeps every function it could call through PUBLIC (start_steps,
-- submit_steps and others were recreated after 20261122000400's grants and had only PUBLIC's).
do $$
declare
  v_fn regprocedure;
begin
  for v_fn in
    select p.oid::regprocedure
    from pg_proc p
    join pg_namespace n on n.oid = p.pronamespace and n.nspname = 'public'
    where p.prokind in ('f', 'p')
      and exists (select 1 from aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                  where a.grantee = 0 and a.privilege_type = 'EXECUTE')
  loop
    execute format('grant execute on function %s to service_role', v_fn);
  end loop;
end
$$;
revoke execute on all functions in schema public from public, anon, authenticated;
-- What a signed-in user calls, directly or through a policy, a column default or a trigger that
-- runs as the user (RLS applies: its own batches only).
grant execute on function
  public.request_client_id(),
  public.owns_batch(uuid),
  public.require_batch(uuid),
  public.validate_blueprint(jsonb),
  public.create_batch(jsonb, jsonb, uuid, text, numeric, boolean),
  public.batch_progress(uuid),
  public.set_batch_budget(uuid, numeric),
  public.batch_cost(public.batches, jsonb),
  public.step_provider(jsonb),
  public.format_usd(numeric),
  public.budget_reached_reason(numeric, numeric)
  to authenticated;
revoke execute on function public.secure_results_table(regclass) from service_role;

-- Sequences: nobody but the service role (identity columns need no grant to insert).
revoke all on all sequences in schema public from public, anon, authenticated;

-- Tables: nothing for anon anywhere; for authenticated, only the tenant-facing tables keep the
-- (column-level, policy-backed) grants their migrations gave.
revoke all on all tables in schema public from public, anon;
do $$
declare
  v_table regclass;
begin
  for v_table in
    select c.oid::regclass
    from pg_class c
    join pg_namespace n on n.oid = c.relnamespace and n.nspname = 'public'
    where c.relkind in ('r', 'p', 'v', 'm', 'f')
      and c.relname not in ('batches', 'batch_items', 'workflow_states', 'enrichment_registry',
                            'providers', 'provider_costs', 'result_cache')
      and c.relname not in (select r.results_table from public.enrichment_registry r
                            where r.results_table is not null)
      and c.relname not like '%\_results'
  loop
    execute format('revoke all on %s from authenticated', v_table);
  end loop;
end
$$;

-- 5. Results tables a step names must be protected -----------------------------------------------

-- A results table without RLS would show every tenant's results to whoever has a grant on it; one
-- granted to anon (or PUBLIC: anon inherits it) is readable without signing in.
create function public.registry_check_security() returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_table regclass;
  v_grantees text;
begin
  if new.results_table is null then
    return new;
  end if;
  v_table := to_regclass(format('public.%I', new.results_table));
  if v_table is null then
    return new;  -- registry_check refuses it
  end if;
  if not (select c.relrowsecurity from pg_class c where c.oid = v_table) then
    raise exception 'step "%": results table public.% has row level security disabled',
      new.step_name, new.results_table using errcode = '22023',
      hint = format('select public.secure_results_table(%L) in the migration that creates it',
                    'public.' || new.results_table);
  end if;
  select string_agg(distinct coalesce(r.rolname, 'PUBLIC'), ', ') into v_grantees
  from (
    select a.grantee from pg_class c, aclexplode(c.relacl) a where c.oid = v_table
    union all
    select a.grantee from pg_attribute t, aclexplode(t.attacl) a
    where t.attrelid = v_table and t.attnum > 0
  ) g
  left join pg_roles r on r.oid = g.grantee
  where g.grantee = 0 or r.rolname = 'anon';
  if v_grantees is not null then
    raise exception 'step "%": results table public.% is granted to %', new.step_name,
      new.results_table, v_grantees using errcode = '22023',
      hint = format('revoke all on public.%I from public, anon (or call secure_results_table)',
                    new.results_table);
  end if;
  return new;
end
$$;

create trigger enrichment_registry_check_security
  before insert or update on public.enrichment_registry
  for each row execute function public.registry_check_security();

revoke execute on function public.registry_check_security() from public, anon, authenticated;

-- 4. pg-safeupdate ---------------------------------------------------------------------------------

-- As 20261122000600, with `where true` on the delete that takes every pending change.
create or replace function public.state_webhook_send(p_url text, p_window interval, p_change jsonb)
returns bigint
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_last timestamptz;
  v_body jsonb;
  v_headers jsonb;
  v_token text;
  v_request_id bigint;
begin
  begin
    -- Never waits: a row locked by another sender is skipped. (Under REPEATABLE READ a row updated
    -- since the snapshot raises a serialization failure instead; caught below, like any failure.)
    select d.last_sent_at into v_last
    from enrichment_webhook_debounce d where d.id
    for update skip locked;
    if found and (v_last is null or clock_timestamp() >= v_last + p_window) then
      with taken as (
        -- Every pending change. pg-safeupdate refuses a DELETE without WHERE, even in a CTE.
        delete from enrichment_webhook_pending p where true returning p.id, p.created_at, p.change
      ), changes as (
        select t.id, t.created_at, t.change from taken t
        union all
        select null, clock_timestamp(), p_change where p_change is not null
      ), ids as (
        select b.value as batch_id, min(coalesce(c.id, 9223372036854775807)) as first_seen
        from changes c
        cross join lateral jsonb_array_elements(
          case jsonb_typeof(c.change -> 'batch_ids') when 'array' then c.change -> 'batch_ids'
               else '[]'::jsonb end) b
        group by b.value
      )
      select case when count(*) = 0 then null else jsonb_build_object(
               'source', coalesce(public.enrichment_setting('webhook_source'), current_database()),
               'database', current_database(),
               'event_id', gen_random_uuid(),
               'op', coalesce(p_change ->> 'op', 'FLUSH'),
               'batch_ids', coalesce((select jsonb_agg(i.batch_id order by i.first_seen)
                                      from (select * from ids order by first_seen limit 100) i),
                                     '[]'::jsonb),
               'more_batches', coalesce(bool_or((c.change ->> 'more_batches')::boolean), false)
                               or (select count(*) from ids) > 100,
               'ready', coalesce(sum((c.change ->> 'ready')::bigint), 0),
               'finished', coalesce(sum((c.change ->> 'finished')::bigint), 0),
               'notifications', count(*),
               'first_change_at', min(c.created_at),
               'sent_at', clock_timestamp())
             end
        into v_body
      from changes c;

      if v_body is not null then
        v_headers := '{"Content-Type": "application/json"}'::jsonb;
        v_token := public.enrichment_secret('prefect_webhook_token');
        if v_token is not null then
          v_headers := v_headers || jsonb_build_object('Authorization', 'Bearer ' || v_token);
        end if;
        v_request_id := public.state_webhook_post(
          p_url, v_body, v_headers,
          public.enrichment_setting_number('webhook_timeout_ms', 5000)::integer);
        update enrichment_webhook_debounce
        set last_sent_at = clock_timestamp(), last_request_id = v_request_id,
            sent_count = sent_count + 1
        where id;
        return v_request_id;
      end if;
      return null;  -- a flush with nothing pending
    end if;
  exception when others then
    -- Everything in this block is undone (the pending rows taken are back); the state change goes on.
    raise warning 'enrichment webhook not sent, kept pending: % (SQLSTATE %)', sqlerrm, sqlstate;
  end;
  if p_change is not null then
    insert into enrichment_webhook_pending (change) values (p_change);
  end if;
  return null;
end
$$;

-- As 20261122000600, with `where true` on the purge after the URL was removed (the service role
-- may call this through /rpc, where pg-safeupdate is loaded).
create or replace function public.flush_state_webhook() returns bigint
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_url text;
begin
  delete from enrichment_webhook_pending where created_at < clock_timestamp() - interval '1 hour';
  if not exists (select 1 from enrichment_webhook_pending) then
    return null;
  end if;
  v_url := public.enrichment_secret('prefect_webhook_url');
  if v_url is null then
    -- The URL was removed: nothing will ever send them.
    delete from enrichment_webhook_pending where true;
    return null;
  end if;
  if not exists (select 1 from enrichment_webhook_debounce) then
    insert into enrichment_webhook_debounce (id) values (true) on conflict do nothing;
  end if;
  return public.state_webhook_send(
    v_url,
    make_interval(secs => public.enrichment_setting_number('webhook_debounce_seconds', 2)),
    null);
end
$$;
