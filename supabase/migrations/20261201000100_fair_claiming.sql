-- Fair claiming (issue 9, item 1): round robin across tenants, then across batches.
--
-- claim_steps took ready rows in one global order (later blueprint steps first, then oldest): with
-- tenant A's 5,000-item batch queued, then tenant B's 1-item batch, claim_steps(1000) returned
-- 1,000 of A's rows and none of B's, and B waited behind all of A.
--
-- Now every claim (rows of steps without a provider, and each provider's share of paid rows) ranks
-- the ready rows it looked at in three levels and takes them in that order:
--   1. within a batch, the order it always had: later blueprint steps first, then oldest (run_after,
--      then id, which is input order) -- batch_rank;
--   2. within a tenant (batches.client_id), batches of a higher `priority` first; batches of equal
--      priority in turn, one row each per round -- tenant_rank = the row's place in
--      (priority desc, batch_rank, batch tie-break);
--   3. across tenants, in turn: every tenant's first row, then every tenant's second row, ... --
--      the claim takes the first p_limit rows of (tenant_rank, tenant tie-break).
-- So a tenant with 1 ready row gets it in the next claim however many rows another tenant has
-- queued, and tenants with many rows split a claim evenly. Priority orders batches only within
-- their own tenant: a tenant cannot jump another tenant's queue by raising it.
--
-- Ties (the same round) are broken by a hash of the tenant's (and batch's) id salted per claim: a
-- fixed order would let the first tenant win every tie, and a conductor that claims a few rows at
-- a time (its in-flight window nearly full) would then serve only that tenant.
--
-- Cost: rows are read pair by pair, (unfinished batch, blueprint step), through
-- workflow_states_ready_by_batch_step (20261130001200), as the claim of rows without a provider
-- already did once any paid row was ready. Reading p_limit rows per pair, as it did, costs
-- pairs x p_limit index entries; instead each pair is read to a depth k, first
-- ceil(p_limit / tenants): the first k rows of a tenant in its order all lie within the first k of
-- each of its pairs, so depth k gives every tenant's first k rows exactly. If those are fewer than
-- p_limit while some tenant had k rows (more may follow), k grows by the shortfall shared among
-- those tenants, and the pairs are read again (at most p_limit deep: then the answer is the exact
-- one). One big tenant alone: one round of depth p_limit. One big and one small: two rounds.
--
-- Paid rows keep their provider limits and budgets (20261130001200): each provider's candidates are
-- read as before (v_allow per pair, the budget window per batch in batch order), then taken in the
-- same round-robin order instead of the global one.
--
-- Every row is still locked FOR UPDATE SKIP LOCKED by id after it was picked, as before.

-- Priority ------------------------------------------------------------------------------------------

alter table public.batches add column priority integer not null default 0
  constraint batches_priority_range check (priority between -1000 and 1000);

comment on column public.batches.priority is
  'Orders batches within their tenant at claim time: higher first, equal ones in turn. Never '
  'across tenants (tenants are served round robin).';

-- Studio users (and the REST API) reorder their own batches; RLS keeps them to their own rows.
grant update (priority) on public.batches to authenticated;

-- A claim's tie-break: a hash of an id salted per claim (see the header). Computed once per
-- (batch, step) pair, never per row, and an integer: sorting thousands of candidate rows by an
-- md5 text doubled the claim's time.
create function public.claim_tiebreak(p_id uuid, p_salt text) returns integer
language sql immutable parallel safe
as $$ select hashtext(p_id::text || p_salt) $$;

-- Rows of steps without a provider ---------------------------------------------------------------

-- The ready rows of these pairs (jsonb array of {batch_id, step_name, step_index, client_id,
-- priority, batch_key, tenant_key}; the keys are claim_tiebreak's) that lie among each tenant's
-- first p_depth rows, with their rank in the tenant. Not locked: the caller locks what it takes,
-- skipping rows another claimer holds.
create function public.fair_ready_rows(p_pairs jsonb, p_depth integer)
returns table (id bigint, tenant_key integer, tenant_rank bigint)
language sql stable
set search_path = public, pg_temp
as $$
  select t.id, t.tenant_key, t.tenant_rank
  from (
    select b.id, b.tenant_key,
           row_number() over (partition by b.client_id
                              order by b.priority desc, b.batch_rank, b.batch_key) as tenant_rank
    from (
      select c.id, pr.batch_id, pr.client_id, pr.priority, pr.batch_key, pr.tenant_key,
             row_number() over (partition by pr.batch_id
                                order by pr.step_index desc, c.run_after, c.id) as batch_rank
      from jsonb_to_recordset(p_pairs)
        as pr(batch_id uuid, step_name text, step_index integer, client_id uuid, priority integer,
              batch_key integer, tenant_key integer)
      -- One range of workflow_states_ready_by_batch_step per pair, in its order: never all of a
      -- pair's ready rows (a million for a big batch), whatever the statistics say.
      cross join lateral (
        select ws.id, ws.run_after from workflow_states ws
        where ws.batch_id = pr.batch_id and ws.step_name = pr.step_name
          and ws.status = 'PENDING' and ws.run_after <= now()
        order by ws.run_after, ws.id
        limit p_depth
      ) c
    ) b
    where b.batch_rank <= p_depth
  ) t
  where t.tenant_rank <= p_depth
$$;

-- Picks and locks up to p_limit ready rows of steps other than p_paid_steps, round robin across
-- tenants and batches (see the header). Returns their ids.
create function public.claim_free_rows(
  p_limit integer,
  p_step_names text[],
  p_batch_ids uuid[],
  p_paid_steps text[]
) returns bigint[]
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_pairs jsonb;
  v_tenants integer;
  v_salt text := random()::text;
  v_depth integer;
  v_picked bigint[];
  v_found integer;
  v_full integer;           -- tenants with p_depth rows found: they may have more
begin
  select coalesce(jsonb_agg(jsonb_build_object(
           'batch_id', b.id, 'step_name', s.step_name, 'step_index', s.ord - 1,
           'client_id', b.client_id, 'priority', b.priority,
           'batch_key', claim_tiebreak(b.id, v_salt),
           'tenant_key', claim_tiebreak(b.client_id, v_salt))), '[]'::jsonb),
         count(distinct b.client_id)
    into v_pairs, v_tenants
  from batches b
  cross join lateral jsonb_array_elements_text(b.blueprint) with ordinality s(step_name, ord)
  where b.status in ('PENDING', 'IN_PROGRESS') and b.cancelled_at is null
    and (p_batch_ids is null or b.id = any(p_batch_ids))
    and (p_step_names is null or s.step_name = any(p_step_names))
    and not (s.step_name = any(p_paid_steps));
  if v_tenants = 0 then
    return '{}';
  end if;

  v_depth := ceil(p_limit::numeric / v_tenants)::integer;
  loop
    select coalesce(array_agg(f.id order by f.tenant_rank, f.tenant_key), '{}'),
           count(*), count(*) filter (where f.tenant_rank = v_depth)
      into v_picked, v_found, v_full
    from fair_ready_rows(v_pairs, v_depth) f;
    exit when v_found >= p_limit or v_full = 0 or v_depth >= p_limit;
    v_depth := least(p_limit, v_depth + ceil((p_limit - v_found)::numeric / v_full)::integer);
  end loop;

  return array(
    select ws.id from workflow_states ws
    where ws.id = any(v_picked[1:p_limit])
      and ws.status::text = 'PENDING' and ws.run_after <= now()
    for update of ws skip locked);
end
$$;

-- claim_steps ------------------------------------------------------------------------------------

-- As 20261130001200's, except:
--   - rows of steps without a provider come from claim_free_rows (round robin), with or without
--     paid rows ready (the walk of workflow_states_ready in global order is gone);
--   - each provider's paid rows are taken round robin too, after the budget window;
--   - the pairs carry the batch's client_id and priority.
create or replace function public.claim_steps(
  p_limit integer default 100,
  p_step_names text[] default null,
  p_batch_ids uuid[] default null,
  p_owner text default null
) returns table (
  batch_id uuid,
  item_id uuid,
  step_name text,
  attempt integer,
  modal_function_name text,
  step_type public.step_type,
  lease_expires_at timestamptz
)
language plpgsql
set search_path = public, pg_temp
set enable_sort = off
set jit = off
as $$
#variable_conflict use_column
declare
  v_paid jsonb;            -- {step_name: {"provider": name, "cost": usd per call}} of every paid step
  v_paid_steps text[];
  v_pairs jsonb := '[]';   -- (batch, paid step) pairs with ready rows, and the batch's budget
  v_ids bigint[] := '{}';
  v_got bigint[];
  v_left integer := p_limit;
  v_provider text;
  v_p providers;
  v_now timestamptz;
  v_tokens numeric;
  v_allow integer;
  v_committed jsonb := '{}';  -- {batch_id: expected cost of the paid rows claimed so far}
  v_inflight jsonb;           -- {batch_id: expected cost of its paid rows in flight, "provider": n}
  v_salt text := random()::text;
begin
  if p_limit is null or p_limit < 1 or p_limit > 50000 then
    raise exception 'claim limit must be between 1 and 50000, got %', p_limit using errcode = '22023';
  end if;
  -- A lost claim would hand its attempt number out again after a crash: fencing needs it durable.
  perform durable_commit();
  perform settle_without_provider(p_step_names, p_batch_ids);

  select coalesce(jsonb_object_agg(r.step_name, jsonb_build_object(
           'provider', p.name, 'cost', coalesce((r.config ->> 'cost_usd')::numeric, p.cost_usd, 0))),
         '{}'::jsonb),
         coalesce(array_agg(r.step_name), '{}')
    into v_paid, v_paid_steps
  from enrichment_registry r
  join providers p on p.name = step_provider(r.config);

  if cardinality(v_paid_steps) > 0 then
    select coalesce(jsonb_agg(jsonb_build_object(
             'batch_id', b.id, 'step_name', s.step_name, 'step_index', s.ord - 1,
             'client_id', b.client_id, 'priority', b.priority,
             'batch_key', claim_tiebreak(b.id, v_salt),
             'tenant_key', claim_tiebreak(b.client_id, v_salt),
             'provider', v_paid -> s.step_name ->> 'provider',
             'cost', (v_paid -> s.step_name ->> 'cost')::numeric,
             'budget', b.budget_usd, 'spent', b.spent_usd, 'paused', b.paused_reason is not null)),
           '[]'::jsonb)
      into v_pairs
    from batches b
    cross join lateral jsonb_array_elements_text(b.blueprint) with ordinality s(step_name, ord)
    -- One probe of workflow_states_ready_by_batch_step per pair (see 20261130001200).
    cross join lateral (
      select ws.run_after from workflow_states ws
      where ws.batch_id = b.id and ws.step_name = s.step_name
        and ws.status = 'PENDING' and ws.run_after <= now()
      order by ws.run_after
      limit 1
    ) ready
    where b.status in ('PENDING', 'IN_PROGRESS') and b.cancelled_at is null
      and (p_batch_ids is null or b.id = any(p_batch_ids))
      and (p_step_names is null or s.step_name = any(p_step_names))
      and s.step_name = any(v_paid_steps);
  end if;

  -- 1 and 2 (20261130001200): paid rows, provider by provider.
  for v_provider in
    select distinct pr.provider from jsonb_to_recordset(v_pairs) as pr(provider text) order by 1
  loop
    exit when v_left <= 0;
    select * into v_p from providers p where p.name = v_provider for update;
    v_now := clock_timestamp();
    v_tokens := provider_tokens(v_p, v_now);
    v_allow := least(v_left, floor(v_tokens)::integer);
    if v_allow > 0 and v_p.daily_cap is not null then
      v_allow := least(v_allow, v_p.daily_cap - provider_calls_today(v_p, v_now));
    end if;
    v_inflight := '{}';
    if v_allow > 0 and (v_p.max_concurrency is not null or exists (
          select 1 from jsonb_to_recordset(v_pairs) as pr(provider text, budget numeric)
          where pr.provider = v_provider and pr.budget is not null)) then
      select coalesce(jsonb_object_agg(x.key, x.value), '{}'::jsonb) into v_inflight
      from (
        select ws.batch_id::text as key, sum((v_paid -> ws.step_name ->> 'cost')::numeric) as value
        from workflow_states ws
        where ws.status in ('QUEUED', 'IN_PROGRESS') and ws.step_name = any(v_paid_steps)
          and awaiting_callback(ws.status, ws.attempt, ws.meta) is not true
        group by ws.batch_id
        union all
        select 'provider', count(*) from workflow_states ws
        where ws.status in ('QUEUED', 'IN_PROGRESS')
          and v_paid -> ws.step_name ->> 'provider' = v_provider
          and awaiting_callback(ws.status, ws.attempt, ws.meta) is not true
      ) x;
      if v_p.max_concurrency is not null then
        v_allow := least(v_allow, v_p.max_concurrency - (v_inflight ->> 'provider')::integer);
      end if;
    end if;
    continue when v_allow <= 0;

    v_got := array(
      select ws.id from workflow_states ws
      where ws.id = any(array(
          -- 3. across tenants, in turn
          select r.id from (
            -- 2. within a tenant: priority, then its batches in turn
            select t.id, t.tenant_key,
                   row_number() over (partition by t.client_id
                                      order by t.priority desc, t.batch_rank, t.batch_key)
                     as tenant_rank
            from (
              -- 1. within a batch, in its order, as far as its remaining budget goes
              select c.id, pr.batch_id, pr.client_id, pr.priority, pr.batch_key, pr.tenant_key,
                     pr.remaining,
                     row_number() over w as batch_rank,
                     sum(pr.cost) over w as spend
              from (
                select pr.batch_id, pr.step_name, pr.step_index, pr.client_id, pr.priority,
                       pr.batch_key, pr.tenant_key, pr.cost,
                       pr.budget - pr.spent
                         - coalesce((v_committed ->> pr.batch_id::text)::numeric, 0)
                         - coalesce((v_inflight ->> pr.batch_id::text)::numeric, 0) as remaining
                from jsonb_to_recordset(v_pairs)
                  as pr(batch_id uuid, step_name text, step_index integer, client_id uuid,
                        priority integer, batch_key integer, tenant_key integer, provider text,
                        cost numeric, budget numeric, spent numeric)
                where pr.provider = v_provider
              ) pr
              cross join lateral (
                select ws.id, ws.run_after from workflow_states ws
                where ws.batch_id = pr.batch_id and ws.step_name = pr.step_name
                  and ws.status = 'PENDING' and ws.run_after <= now()
                order by ws.run_after, ws.id
                limit v_allow
              ) c
              where pr.remaining is null or (pr.remaining > 0 and pr.remaining >= pr.cost)
              window w as (partition by pr.batch_id order by pr.step_index desc, c.run_after, c.id)
            ) t
            where t.remaining is null or t.spend <= t.remaining
          ) r
          order by r.tenant_rank, r.tenant_key
          limit v_allow))
        and ws.status::text = 'PENDING' and ws.run_after <= now()
      for update of ws skip locked);

    if cardinality(v_got) > 0 then
      update providers p
      set tokens = greatest(v_tokens - cardinality(v_got), 0), refilled_at = v_now,
          calls_today = provider_calls_today(v_p, v_now) + cardinality(v_got),
          calls_day = utc_day(v_now)
      where p.name = v_provider;
      select v_committed || coalesce(jsonb_object_agg(x.batch_id::text,
               coalesce((v_committed ->> x.batch_id::text)::numeric, 0) + x.cost), '{}'::jsonb)
        into v_committed
      from (select ws.batch_id, sum((v_paid -> ws.step_name ->> 'cost')::numeric) as cost
            from workflow_states ws where ws.id = any(v_got) group by ws.batch_id) x;
      v_ids := v_ids || v_got;
      v_left := v_left - cardinality(v_got);
    end if;
  end loop;

  -- Batches whose budget cannot pay for one more call of a step with ready rows say so. After
  -- the providers: every transition locks providers, then rows, then batches (defer_steps too).
  if v_pairs <> '[]'::jsonb then
    update batches b
    set paused_reason = budget_reached_reason(b.spent_usd, b.budget_usd), updated_at = now()
    where b.id in (select pr.batch_id
                   from jsonb_to_recordset(v_pairs)
                     as pr(batch_id uuid, cost numeric, budget numeric, spent numeric, paused boolean)
                   where pr.budget is not null and not pr.paused
                     and (pr.spent >= pr.budget or pr.spent + pr.cost > pr.budget))
      and b.paused_reason is null and b.budget_usd is not null;
  end if;

  -- 3 (20261130001200): rows of steps without a provider, round robin.
  if v_left > 0 then
    v_ids := v_ids || claim_free_rows(v_left, p_step_names, p_batch_ids, v_paid_steps);
  end if;

  return query select * from claim_rows(v_ids, p_owner);
end
$$;

revoke execute on function
  public.claim_tiebreak(uuid, text),
  public.fair_ready_rows(jsonb, integer),
  public.claim_free_rows(integer, text[], uuid[], text[])
from public, anon, authenticated;
grant execute on function
  public.claim_tiebreak(uuid, text),
  public.fair_ready_rows(jsonb, integer),
  public.claim_free_rows(integer, text[], uuid[], text[])
to service_role;
