-- Paid providers done right (issue 8, items 1, 4 and 5): exa_verify's results, the result cache
-- and conditions.
--
-- 1. exa_verify_results: the results of exa_verify (shared/steps/exa_verify.py), one Exa search
--    per company. complete_steps writes the result object like any step's; the typed columns are
--    derived from it, so the table stays queryable in Studio and complete_steps stays generic.
-- 2. Settling rows before they are claimed. A step whose config has a cache or a condition
--    (below) "settles": its rows are held when they are created (PENDING, run_after far in the
--    future, so no claim takes them), and settle_without_provider, which claim_steps calls before
--    it takes any provider token (20261130001200), looks at each held row once:
--      - a condition says the step is pointless for the item: COMPLETED, skipped, at no cost;
--      - the cache has the answer for the item's normalised inputs: COMPLETED from the cache;
--      - else released (run_after = now): the claim pays for it like any row.
--    Skipped and cached rows go through the real completion path (IN_PROGRESS with a new attempt,
--    then complete_steps: the result is upserted, the next step seeded, the batch rolled up), in
--    bulk. Holding at insert (a row trigger whose WHEN lists the settling steps, so other steps'
--    rows never call it) means a claim never sees a row nobody has looked at, whatever claimers
--    run at once, and the claim of steps that do not settle costs one registry probe more.
-- 3. The result cache, per client: config.cache = {"ttl_seconds": n, "key": [path, ...]}. When a
--    worker completes a row of such a step (a trigger on its results table), the result is stored
--    under the normalised values of the key's paths; a held row whose key has an unexpired entry
--    of its batch's client is completed from it (meta.cached names the source batch and item;
--    the result gets "cached_from"), with a zero-cost provider_costs row (cached = true). Failures,
--    skipped rows and results that came from the cache are never stored. batches.use_cache false
--    (enrich run --no-cache) skips the lookup; the fresh results are still stored.
-- 4. Conditions: config.skip_unless = [path, ...]: the row is skipped when every path that can be
--    read for the item is empty (meta.skipped and the result's "skipped" give the reason).
--
-- A path is "<step>.<key>", a key of an earlier step's result (a step without a result for the
-- item, say one not in the batch's blueprint, cannot be read: a condition ignores it, and a cache
-- key that needs it leaves the row uncached), or "<field>", a key of the item's raw_data. Values
-- are normalised: text trimmed, lower-cased, inner whitespace collapsed; empty is null.

-- 1. exa_verify_results ---------------------------------------------------------------------------

create table public.exa_verify_results (
  batch_id uuid not null,
  item_id uuid not null,
  attempt integer not null,
  result jsonb not null,
  verified boolean generated always as (
    case when jsonb_typeof(result -> 'verified') = 'boolean' then (result ->> 'verified')::boolean end
  ) stored,
  confidence numeric generated always as (
    case when jsonb_typeof(result -> 'confidence') = 'number' then (result ->> 'confidence')::numeric end
  ) stored,
  domain text generated always as (result ->> 'domain') stored,
  company_name text generated always as (result ->> 'company_name') stored,
  matched_url text generated always as (result ->> 'matched_url') stored,
  title text generated always as (result ->> 'title') stored,
  snippet text generated always as (result ->> 'snippet') stored,
  top_domain text generated always as (result ->> 'top_domain') stored,
  request_id text generated always as (result ->> 'request_id') stored,
  -- What the Exa call that produced this result cost (a cache hit repeats it; the ledger,
  -- provider_costs, says what each row cost: nothing for a hit).
  cost_usd numeric generated always as (
    case when jsonb_typeof(result -> 'cost_usd') = 'number' then (result ->> 'cost_usd')::numeric end
  ) stored,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (batch_id, item_id),
  foreign key (batch_id, item_id) references public.batch_items (batch_id, id) on delete cascade
);
create index exa_verify_results_domain on public.exa_verify_results (domain);

alter table public.exa_verify_results enable row level security;
create policy exa_verify_results_read_own_client on public.exa_verify_results
  for select to authenticated using (public.owns_batch(batch_id));
revoke all on public.exa_verify_results from anon, authenticated;
grant select on public.exa_verify_results to authenticated;
grant all on public.exa_verify_results to service_role;

-- 2. Settling: paths, conditions and cache keys --------------------------------------------------

-- The paths of a config: its cache key's and its condition's.
create function public.settle_paths(p_config jsonb) returns setof text
language sql immutable
as $$
  select p from jsonb_array_elements_text(
    case when jsonb_typeof(p_config -> 'cache' -> 'key') = 'array' then p_config -> 'cache' -> 'key'
         else '[]'::jsonb end
    || case when jsonb_typeof(p_config -> 'skip_unless') = 'array' then p_config -> 'skip_unless'
            else '[]'::jsonb end) p
$$;

-- {"needs": [the steps the paths read]}: what needed_results (20261130000800) takes as config.
create function public.settle_needs(p_config jsonb) returns jsonb
language sql immutable
as $$
  select jsonb_build_object('needs', coalesce(jsonb_agg(distinct split_part(p, '.', 1)), '[]'::jsonb))
  from public.settle_paths(p_config) p
  where strpos(p, '.') > 0
$$;

-- What settling decides for each row, set-based (one statement for all the rows of a call, no
-- function per row: 5,000 rows in tens of milliseconds). p_rows: [{id, step_name, raw, inputs,
-- use_cache, and batch_id, item_id, client_id handed back as they came}], inputs {step: result}
-- of the steps the paths read; p_configs: {step_name: config}.
--   skip: why the step is pointless for the item ("no normalize_domain.domain"), or null: every
--         path of config.skip_unless that can be read is empty, and at least one can be;
--   cache_key: hex sha-256 of the key's paths and normalised values, and key_values {path:
--         value}; null when use_cache is false or the row cannot be cached (a path unreadable,
--         or every value empty).
create function public.settle_decide(p_rows jsonb, p_configs jsonb)
returns table (id bigint, batch_id uuid, item_id uuid, step_name text, client_id uuid,
               skip text, cache_key text, key_values jsonb)
language sql stable
rows 5000
as $$
  with rows as materialized (
    select r.*, p_configs -> r.step_name as config
    from jsonb_to_recordset(p_rows)
      as r(id bigint, batch_id uuid, item_id uuid, step_name text, client_id uuid, raw jsonb,
           inputs jsonb, use_cache boolean)
  ), paths as (
    select r.id, 'skip' as kind, e.path, e.ord, r.raw, r.inputs
    from rows r
    cross join lateral jsonb_array_elements_text(
      case when jsonb_typeof(r.config -> 'skip_unless') = 'array' then r.config -> 'skip_unless'
           else '[]'::jsonb end) with ordinality e(path, ord)
    union all
    select r.id, 'key', e.path, e.ord, r.raw, r.inputs
    from rows r
    cross join lateral jsonb_array_elements_text(
      case when r.use_cache and jsonb_typeof(r.config -> 'cache' -> 'key') = 'array'
           then r.config -> 'cache' -> 'key' else '[]'::jsonb end) with ordinality e(path, ord)
  ), read as materialized (
    -- "<step>.<key>" reads that step's result, once it has one; "<field>" the raw_data field.
    -- Values: text trimmed, lower-cased, inner whitespace collapsed; empty is null.
    select p.id, p.kind, p.path, p.ord,
           strpos(p.path, '.') = 0 or p.inputs ? split_part(p.path, '.', 1) as known,
           nullif(btrim(regexp_replace(lower(
             case jsonb_typeof(v.v) when 'string' then v.v #>> '{}' when 'null' then null
                  else v.v::text end), '\s+', ' ', 'g')), '') as val
    from paths p
    cross join lateral (
      select case when strpos(p.path, '.') > 0
                  then p.inputs -> split_part(p.path, '.', 1) -> substr(p.path, strpos(p.path, '.') + 1)
                  else p.raw -> p.path end as v) v
  ), skips as (
    select r.id, 'no ' || string_agg(r.path, ' or ' order by r.ord) filter (where r.known) as skip
    from read r where r.kind = 'skip'
    group by r.id
    having count(*) filter (where r.known) > 0
       and count(*) filter (where r.known and r.val is not null) = 0
  ), keys as (
    select r.id,
           encode(sha256(convert_to(jsonb_build_array(
             jsonb_agg(r.path order by r.ord), jsonb_agg(to_jsonb(r.val) order by r.ord))::text,
             'UTF8')), 'hex') as cache_key,
           jsonb_object_agg(r.path, r.val) as key_values
    from read r where r.kind = 'key'
    group by r.id
    having bool_and(r.known) and count(r.val) > 0
  )
  select r.id, r.batch_id, r.item_id, r.step_name, r.client_id, s.skip, k.cache_key, k.key_values
  from rows r
  left join skips s on s.id = r.id
  left join keys k on k.id = r.id
$$;

-- Registry config: cache and skip_unless, checked when written.
create function public.registry_check_settle() returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_cache jsonb := new.config -> 'cache';
  v_skip jsonb := new.config -> 'skip_unless';
  v_path text;
begin
  if v_cache is not null then
    if jsonb_typeof(v_cache) <> 'object'
       or jsonb_typeof(v_cache -> 'ttl_seconds') is distinct from 'number'
       or (v_cache ->> 'ttl_seconds')::numeric <= 0
       or jsonb_typeof(v_cache -> 'key') is distinct from 'array'
       or jsonb_array_length(v_cache -> 'key') = 0 then
      raise exception 'step "%": config.cache = % is not valid', new.step_name, v_cache
        using errcode = '22023',
              hint = 'cache is {"ttl_seconds": n > 0, "key": ["<step>.<key>" or "<field>", ...]}';
    end if;
    if new.results_table is null then
      raise exception 'step "%": config.cache needs a results table to store results from', new.step_name
        using errcode = '22023';
    end if;
  end if;
  if v_skip is not null and (jsonb_typeof(v_skip) <> 'array' or jsonb_array_length(v_skip) = 0) then
    raise exception 'step "%": config.skip_unless = % is not valid', new.step_name, v_skip
      using errcode = '22023', hint = 'skip_unless is ["<step>.<key>" or "<field>", ...]';
  end if;
  for v_path in
    select e from jsonb_array_elements(
      case when jsonb_typeof(v_cache) = 'object' then v_cache -> 'key' else '[]'::jsonb end
      || coalesce(v_skip, '[]'::jsonb)) e
    where jsonb_typeof(e) <> 'string' or btrim(e #>> '{}') = ''
  loop
    raise exception 'step "%": % is not a path ("<step>.<key>" or "<field>")', new.step_name, v_path
      using errcode = '22023';
  end loop;
  select p into v_path from settle_paths(new.config) p
  where strpos(p, '.') > 0
    and (substr(p, strpos(p, '.') + 1) = ''
         or not exists (select 1 from enrichment_registry r
                        where r.step_name = split_part(p, '.', 1) and r.results_table is not null))
  limit 1;
  if v_path is not null then
    raise exception 'step "%": path "%" does not name a key of a registered step with a results table',
      new.step_name, v_path using errcode = '22023';
  end if;
  return new;
end
$$;

create trigger enrichment_registry_check_settle
  before insert or update of config, results_table on public.enrichment_registry
  for each row execute function public.registry_check_settle();

-- 2. Holding rows of settling steps ------------------------------------------------------------------

-- Held rows: PENDING with run_after at this far-future instant (a finite one: drivers turn
-- 'infinity' into errors). Found through their own small index.
create index workflow_states_held on public.workflow_states (id)
  where status = 'PENDING' and run_after = '9999-01-01 00:00:00+00'::timestamptz;

comment on column public.workflow_states.run_after is
  'When a PENDING row may be claimed. 9999-01-01 00:00:00+00: held until settle_without_provider '
  'has looked at it (a step with a cache or a condition, 20261130001300).';

create function public.hold_for_settle() returns trigger
language plpgsql
as $$
begin
  new.run_after := '9999-01-01 00:00:00+00'::timestamptz;
  return new;
end
$$;

-- Keeps the hold trigger's step list, and the cache triggers of results tables, in step with the
-- registry. Runs after every registry statement; does nothing when nothing changed. DDL, hence
-- security definer (the tables' owner): a registry edit by the service role still works.
create function public.sync_settling_steps() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_steps text[];
  v_current text;
  v_table text;
begin
  select coalesce(array_agg(r.step_name order by r.step_name), '{}') into v_steps
  from enrichment_registry r
  where r.config ? 'cache' or r.config ? 'skip_unless';
  select obj_description(t.oid, 'pg_trigger') into v_current
  from pg_trigger t
  where t.tgrelid = 'public.workflow_states'::regclass and t.tgname = 'workflow_states_hold_for_settle';
  if v_current is distinct from array_to_string(v_steps, ',') then
    if cardinality(v_steps) = 0 then
      drop trigger if exists workflow_states_hold_for_settle on public.workflow_states;
    else
      execute format(
        'create or replace trigger workflow_states_hold_for_settle before insert on public.workflow_states'
        ' for each row when (new.step_name = any (%L::text[])) execute function public.hold_for_settle()',
        v_steps);
      execute format('comment on trigger workflow_states_hold_for_settle on public.workflow_states is %L',
                     array_to_string(v_steps, ','));
    end if;
    -- Rows held for a step that no longer settles are ready now.
    update workflow_states ws set run_after = now(), updated_at = now()
    where ws.status = 'PENDING' and ws.run_after = '9999-01-01 00:00:00+00'::timestamptz
      and not (ws.step_name = any (v_steps));
  end if;

  for v_table in
    select r.results_table from enrichment_registry r
    where jsonb_typeof(r.config -> 'cache') = 'object' and r.results_table is not null
      and not exists (select 1 from pg_trigger t
                      where t.tgrelid = format('public.%I', r.results_table)::regclass
                        and t.tgname = 'result_cache_store_insert')
  loop
    execute format(
      'create trigger result_cache_store_insert after insert on public.%I'
      ' referencing new table as new_results for each statement'
      ' execute function public.result_cache_store()', v_table);
    execute format(
      'create trigger result_cache_store_update after update on public.%I'
      ' referencing new table as new_results for each statement'
      ' execute function public.result_cache_store()', v_table);
  end loop;
  return null;
end
$$;

-- 3. The result cache ------------------------------------------------------------------------------

create table public.result_cache (
  client_id uuid not null,
  step_name text not null references public.enrichment_registry (step_name) on delete cascade,
  -- sha-256 (hex) of the key's paths and normalised values; key_values shows them.
  cache_key text not null,
  key_values jsonb not null,
  result jsonb not null constraint result_cache_result_object check (jsonb_typeof(result) = 'object'),
  -- Where the result was paid for. Not foreign keys: the answer stays the client's after the
  -- batch is deleted (delete its entries too if that is the point: by client_id or source_batch_id).
  source_batch_id uuid not null,
  source_item_id uuid not null,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  primary key (client_id, step_name, cache_key)
);
create index result_cache_expires on public.result_cache (expires_at);
create index result_cache_source_batch on public.result_cache (source_batch_id);

comment on table public.result_cache is
  'Results of steps with config.cache, per client, by normalised inputs: a hit completes a row '
  'without calling the provider (20261130001300).';

-- Stores what workers completed, from a cacheable step's results table (statement trigger; a
-- completion writes results after marking its rows COMPLETED, in the same transaction).
create function public.result_cache_store() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_step text;
  v_config jsonb;
  v_rows jsonb;
  v_inputs jsonb;
  v_keys jsonb;
begin
  -- Completions from the cache (settle_without_provider) store nothing.
  if current_setting('enrich.settling', true) = 'on' then
    return null;
  end if;
  select r.step_name, r.config into v_step, v_config
  from enrichment_registry r where r.results_table = tg_table_name;
  if v_step is null or jsonb_typeof(v_config -> 'cache') is distinct from 'object' then
    return null;
  end if;
  select coalesce(jsonb_agg(jsonb_build_object(
           'id', ws.id, 'batch_id', n.batch_id, 'item_id', n.item_id, 'client_id', b.client_id,
           'raw', bi.raw_data, 'config', settle_needs(v_config))), '[]'::jsonb)
    into v_rows
  from new_results n
  join workflow_states ws on ws.batch_id = n.batch_id and ws.item_id = n.item_id and ws.step_name = v_step
  join batches b on b.id = n.batch_id
  join batch_items bi on bi.batch_id = n.batch_id and bi.id = n.item_id
  where ws.status::text = 'COMPLETED' and ws.attempt = n.attempt
    and not (ws.meta ? 'cached') and not (ws.meta ? 'skipped')
    and jsonb_typeof(n.result) = 'object'
    and not (n.result ? 'skipped') and not (n.result ? 'cached_from');
  if v_rows = '[]'::jsonb then
    return null;
  end if;
  v_inputs := needed_results(v_rows);
  select jsonb_agg(jsonb_build_object(
           'id', r.id, 'batch_id', r.batch_id, 'item_id', r.item_id, 'client_id', r.client_id,
           'step_name', v_step, 'raw', r.raw, 'use_cache', true,
           'inputs', coalesce(v_inputs -> r.item_id::text, '{}'::jsonb)))
    into v_keys
  from jsonb_to_recordset(v_rows) r(id bigint, batch_id uuid, item_id uuid, client_id uuid, raw jsonb);

  insert into result_cache as c (client_id, step_name, cache_key, key_values, result,
                                 source_batch_id, source_item_id, created_at, expires_at)
  select distinct on (d.client_id, d.cache_key)
         d.client_id, v_step, d.cache_key, d.key_values, n.result, d.batch_id, d.item_id, now(),
         now() + make_interval(secs => (v_config -> 'cache' ->> 'ttl_seconds')::float8)
  from settle_decide(v_keys, jsonb_build_object(v_step, v_config)) d
  join new_results n on n.batch_id = d.batch_id and n.item_id = d.item_id
  where d.cache_key is not null
  order by d.client_id, d.cache_key, d.item_id
  on conflict (client_id, step_name, cache_key) do update
  set key_values = excluded.key_values, result = excluded.result,
      source_batch_id = excluded.source_batch_id, source_item_id = excluded.source_item_id,
      created_at = excluded.created_at, expires_at = excluded.expires_at;
  return null;
end
$$;

create trigger enrichment_registry_sync_settling
  after insert or update or delete on public.enrichment_registry
  for each statement execute function public.sync_settling_steps();

-- Expired entries are never used; this deletes them (run it from pg_cron, or by hand).
create function public.purge_result_cache(p_limit integer default 100000) returns integer
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_count integer;
begin
  delete from result_cache c
  where (c.client_id, c.step_name, c.cache_key) in (
    select x.client_id, x.step_name, x.cache_key from result_cache x
    where x.expires_at <= now() limit p_limit);
  get diagnostics v_count = row_count;
  return v_count;
end
$$;

-- 2-4. settle_without_provider ---------------------------------------------------------------------

-- Rows looked at per call; the rest stay held for the next claim (the claim never waits long).
create function public.settle_batch_size() returns integer
language sql immutable as $$ select 5000 $$;

-- Replaces 20261130001200's stub (same signature): skipped and cached rows complete here, the
-- others are released to the claim. Returns how many rows it completed.
-- Its own planner settings, for it and the complete_steps it calls. Every statement here finds
-- rows by key, thousands at once, in tables (workflow_states, result_cache) that a batch has just
-- filled: statistics lag behind, and the planner then prefers a sequential scan joined in a nested
-- loop to a function's rows, each of the thousands of rows read thousands of times (5,000 cache
-- hits took 13 s in complete_steps alone). Without sequential scans, each row is one index lookup.
-- And claim_steps, the caller, turns sorting off for its own walk, which would do the same. JIT
-- off: a disabled plan type adds 10^10 to the costs, which would JIT-compile every statement here
-- (70 ms each, measured; the statements themselves take milliseconds).
create or replace function public.settle_without_provider(p_step_names text[], p_batch_ids uuid[])
returns integer
language plpgsql
set search_path = public, pg_temp
set enable_sort = on
set enable_seqscan = off
set jit = off
as $$
declare
  v_configs jsonb;
  v_needs jsonb;
  v_rows jsonb;
  v_inputs jsonb;
  v_decide jsonb;
  v_settled jsonb;
  v_done jsonb;
begin
  -- No step settles (or none the caller claims): nothing is ever held.
  if not exists (select 1 from enrichment_registry r
                 where (r.config ? 'cache' or r.config ? 'skip_unless')
                   and (p_step_names is null or r.step_name = any (p_step_names))) then
    return 0;
  end if;

  if not exists (select 1 from workflow_states ws
                 where ws.status = 'PENDING' and ws.run_after = '9999-01-01 00:00:00+00'::timestamptz
                   and (p_step_names is null or ws.step_name = any (p_step_names))
                   and (p_batch_ids is null or ws.batch_id = any (p_batch_ids))) then
    return 0;
  end if;
  -- Locks in the order claim_steps and defer_steps take them (20261130001200): providers, then
  -- rows, then batches (complete_steps rolls batches up). Settling runs first in a claim, so
  -- without this it would take rows and batches before the claim takes its providers.
  perform 1 from providers p
  where p.name in (select r.config ->> 'provider' from enrichment_registry r
                   where r.config ? 'cache' or r.config ? 'skip_unless')
  order by p.name
  for update;

  select jsonb_object_agg(r.step_name, r.config),
         jsonb_object_agg(r.step_name, settle_needs(r.config))
    into v_configs, v_needs
  from enrichment_registry r
  where r.config ? 'cache' or r.config ? 'skip_unless';

  -- The held rows this call looks at, locked (another claimer skips them).
  select coalesce(jsonb_agg(jsonb_build_object(
           'id', h.id, 'batch_id', h.batch_id, 'item_id', h.item_id, 'step_name', h.step_name,
           'config', v_needs -> h.step_name)), '[]'::jsonb)
    into v_rows
  from (
    select ws.id, ws.batch_id, ws.item_id, ws.step_name from workflow_states ws
    where ws.status = 'PENDING' and ws.run_after = '9999-01-01 00:00:00+00'::timestamptz
      and (p_step_names is null or ws.step_name = any (p_step_names))
      and (p_batch_ids is null or ws.batch_id = any (p_batch_ids))
    order by ws.id
    limit settle_batch_size()
    for update of ws skip locked
  ) h;
  if v_rows = '[]'::jsonb then
    return 0;
  end if;
  v_inputs := needed_results(v_rows);

  -- What each says: skipped (a reason), cached (an entry of its batch's client), or neither.
  select jsonb_agg(jsonb_build_object(
           'id', h.id, 'batch_id', h.batch_id, 'item_id', h.item_id, 'step_name', h.step_name,
           'client_id', b.client_id, 'raw', bi.raw_data, 'use_cache', b.use_cache,
           'inputs', coalesce(v_inputs -> h.item_id::text, '{}'::jsonb)))
    into v_decide
  from jsonb_to_recordset(v_rows) h(id bigint, batch_id uuid, item_id uuid, step_name text)
  join batches b on b.id = h.batch_id and b.cancelled_at is null
  join batch_items bi on bi.batch_id = h.batch_id and bi.id = h.item_id;

  select coalesce(jsonb_agg(jsonb_build_object(
           'id', d.id, 'skip', d.skip, 'client_id', d.client_id, 'cache_key', c.cache_key,
           'source', case when d.skip is null then jsonb_build_object(
                       'batch_id', c.source_batch_id, 'item_id', c.source_item_id,
                       'at', c.created_at) end)), '[]'::jsonb)
    into v_settled
  from settle_decide(v_decide, v_configs) d
  -- One primary-key lookup per row, whatever the statistics say.
  left join lateral (
    select c.cache_key, c.source_batch_id, c.source_item_id, c.created_at from result_cache c
    where d.skip is null and c.client_id = d.client_id and c.step_name = d.step_name
      and c.cache_key = d.cache_key and c.expires_at > now()
    limit 1) c on true
  where d.skip is not null or c.cache_key is not null;

  -- The rest are ready for the claim (and paid for there).
  update workflow_states ws set run_after = now(), updated_at = now()
  from (select h.id from jsonb_to_recordset(v_rows) h(id bigint)
        except
        select s.id from jsonb_to_recordset(v_settled) s(id bigint)) rest
  where ws.id = rest.id;

  if v_settled = '[]'::jsonb then
    return 0;
  end if;

  -- The real completion path: IN_PROGRESS with a new attempt (as a claim and a start would), then
  -- complete_steps with the skipped reason or the cached result (plus where it came from).
  with moved as (
    update workflow_states ws
    set status = 'IN_PROGRESS', attempt = ws.attempt + 1, run_after = now(), started_at = now(),
        lease_expires_at = now() + step_timeout(r.config), lease_owner = null, updated_at = now(),
        meta = ws.meta || case when s.skip is not null then jsonb_build_object('skipped', s.skip)
                               else jsonb_build_object('cached', s.source) end
    from jsonb_to_recordset(v_settled) s(id bigint, skip text, client_id uuid, cache_key text,
                                         source jsonb),
         enrichment_registry r
    where ws.id = s.id and r.step_name = ws.step_name
    returning ws.batch_id, ws.item_id, ws.step_name, ws.attempt,
              r.config ->> 'provider' as provider, s.skip, s.client_id, s.cache_key, s.source
  )
  select jsonb_agg(jsonb_build_object(
           'batch_id', m.batch_id, 'item_id', m.item_id, 'step_name', m.step_name,
           'attempt', m.attempt, 'provider', m.provider, 'cached', m.skip is null,
           'result', case when m.skip is not null then jsonb_build_object('skipped', m.skip)
                          else c.result || jsonb_build_object('cached_from', m.source) end))
    into v_done
  from moved m
  left join lateral (
    select c.result from result_cache c
    where m.skip is null and c.client_id = m.client_id and c.step_name = m.step_name
      and c.cache_key = m.cache_key
    limit 1) c on true;

  update batches b set status = 'IN_PROGRESS', started_at = coalesce(b.started_at, now()), updated_at = now()
  where b.id in (select distinct d.batch_id from jsonb_to_recordset(v_done) d(batch_id uuid))
    and b.status = 'PENDING';

  -- A cache hit is in the ledger too, at zero: what the row cost, and that it was served cached.
  insert into provider_costs (batch_id, item_id, step_name, attempt, provider, units, usd, cached)
  select d.batch_id, d.item_id, d.step_name, d.attempt, d.provider, 0, 0, true
  from jsonb_to_recordset(v_done) d(batch_id uuid, item_id uuid, step_name text, attempt integer,
                                     provider text, cached boolean)
  where d.cached and d.provider is not null
  on conflict do nothing;

  perform set_config('enrich.settling', 'on', true);
  perform 1 from complete_steps(v_done);
  perform set_config('enrich.settling', '', true);
  return jsonb_array_length(v_done);
end
$$;

-- Progress shows skipped and cached rows ---------------------------------------------------------
-- As 20261130001200's, plus "skipped" and "cached": {"<step>": n} for every blueprint step, the
-- COMPLETED rows a condition skipped and those served from the cache (both also counted COMPLETED
-- in "steps"). The documented shape stays.

create or replace function public.batch_progress(p_batch_id uuid) returns jsonb
language plpgsql stable
set search_path = public, pg_temp
as $$
declare
  v_batch batches;
  v_steps jsonb;
  v_awaiting jsonb;
  v_skipped jsonb;
  v_cached jsonb;
begin
  v_batch := require_batch(p_batch_id);
  select jsonb_object_agg(s.step_name, s.counts order by s.ord),
         jsonb_object_agg(s.step_name, s.awaiting order by s.ord),
         jsonb_object_agg(s.step_name, s.skipped order by s.ord),
         jsonb_object_agg(s.step_name, s.cached order by s.ord)
    into v_steps, v_awaiting, v_skipped, v_cached
  from (
    select bp.step_name, bp.ord,
           jsonb_build_object(
             'PENDING', count(*) filter (where ws.status = 'PENDING'),
             'QUEUED', count(*) filter (where ws.status = 'QUEUED'),
             'IN_PROGRESS', count(*) filter (where ws.status = 'IN_PROGRESS'),
             'COMPLETED', count(*) filter (where ws.status = 'COMPLETED'),
             'FAILED', count(*) filter (where ws.status = 'FAILED')) as counts,
           count(*) filter (where awaiting_callback(ws.status, ws.attempt, ws.meta)) as awaiting,
           count(*) filter (where ws.status = 'COMPLETED' and ws.meta ? 'skipped') as skipped,
           count(*) filter (where ws.status = 'COMPLETED' and ws.meta ? 'cached') as cached
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
    'awaiting_callback', coalesce(v_awaiting, '{}'::jsonb),
    'skipped', coalesce(v_skipped, '{}'::jsonb),
    'cached', coalesce(v_cached, '{}'::jsonb),
    'cost', batch_cost(v_batch, coalesce(v_steps, '{}'::jsonb)));
end
$$;

-- Privileges and row level security ------------------------------------------------------------------

alter table public.result_cache enable row level security;
create policy result_cache_read_own_client on public.result_cache
  for select to authenticated using (client_id = public.request_client_id());
revoke all on public.result_cache from anon, authenticated;
grant select on public.result_cache to authenticated;
grant all on public.result_cache to service_role;

revoke execute on function
  public.settle_paths(jsonb),
  public.settle_needs(jsonb),
  public.settle_decide(jsonb, jsonb),
  public.registry_check_settle(),
  public.hold_for_settle(),
  public.sync_settling_steps(),
  public.result_cache_store(),
  public.purge_result_cache(integer),
  public.settle_batch_size(),
  public.settle_without_provider(text[], uuid[])
  from public, anon, authenticated;
grant execute on function
  public.purge_result_cache(integer),
  public.settle_without_provider(text[], uuid[])
  to service_role;
