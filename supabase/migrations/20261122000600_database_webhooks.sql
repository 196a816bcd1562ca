-- Wake-ups over HTTP: the Database Webhook (pg_net) that tells Prefect Cloud a state changed.
--
-- On Supabase, every statement on workflow_states that makes rows ready or finishes them also POSTs
-- a small JSON body to the Prefect Cloud webhook, which turns it into the event
-- `enrichment.state.changed` that triggers the conductor deployment (prefect.yaml,
-- deploy/prefect_webhook_template.json.j2). The same wake-up trigger that sends pg_notify
-- (notify_state_change, 20261122000300_wakeups.sql) hands its payload to state_webhook_notify()
-- below whenever net.http_post exists. On plain PostgreSQL (the embedded default, CI) there is no
-- `net` schema, and wake-ups stay pg_notify only.
--
-- Configuration, read at run time (never written in a migration):
--   * the URL: Vault secret `prefect_webhook_url` (vault.decrypted_secrets) when the vault schema
--     exists, else public.enrichment_settings key `prefect_webhook_url`. No URL: nothing is sent,
--     nothing is recorded, nothing fails.
--   * optional Vault secret `prefect_webhook_token`: sent as `Authorization: Bearer <token>` (Prefect
--     Cloud webhooks tied to a service account).
--   * enrichment_settings keys: `webhook_debounce_seconds` (default 2), `webhook_source` (the id in the
--     event's resource, default current_database(); deploy.sh sets the project ref, since every
--     Supabase database is called `postgres`), `webhook_timeout_ms` (default 5000).
--
-- Debounce: at most one request per window, at most one per statement, and never blocking.
--   The single row of enrichment_webhook_debounce holds when the last request was queued. A statement
--   whose window is open (an unlocked read says so) only records its change in
--   enrichment_webhook_pending (an insert: inserts never wait on each other). Otherwise it tries to
--   become the sender with `select ... for update skip locked` on that row: if another transaction
--   holds it (a sender that has not committed yet), it records its change instead of waiting. The
--   sender re-checks the window on the locked (latest committed) row, takes every pending change
--   (delete ... returning), merges them with its own into one body, queues one request and moves
--   last_sent_at. A plain `update ... where last_sent_at < now() - window` guard was not used: a
--   second transaction running it while the first sender is still open waits for that row lock until
--   the sender commits, which is exactly the blocking to avoid. The cost of SKIP LOCKED is that a
--   long transaction which became the sender keeps the row until it commits; others keep recording,
--   nobody waits, and the first send after that carries everything.
--   The trailing edge is kept: a change recorded as pending goes out with the next state change after
--   the window, or with the pg_cron job below (every 5 s) when the cron schema exists, whichever comes
--   first. pg_net and Prefect events are best effort (no retries, possible duplicates): the
--   conductor's one-minute schedule is the final safety net, and the conductor is idempotent.
-- pg_net queues the request in the transaction and sends it only after commit, like pg_notify: a
-- rolled-back change sends nothing (and puts the pending changes it took back).
--
-- Tests (tests/test_webhooks.py) create a fake `net.http_post` with pg_net's signature that records
-- calls, then apply this migration (or call public.enable_state_webhooks() afterwards).

-- Where pg_net or pg_cron can be installed (Supabase, `supabase start`) but are not yet, install
-- them, as enabling Database Webhooks in Supabase Studio would. Nowhere else does anything happen.
do $$
begin
  if to_regnamespace('net') is null
     and exists (select 1 from pg_available_extensions where name = 'pg_net') then
    begin
      create schema if not exists extensions;
      create extension if not exists pg_net with schema extensions;
    exception when others then
      raise warning 'pg_net is available but could not be installed (%): wake-ups stay pg_notify only',
        sqlerrm;
    end;
  end if;
  if to_regnamespace('cron') is null
     and exists (select 1 from pg_available_extensions where name = 'pg_cron') then
    begin
      -- pg_cron must be preloaded and lives in one database (cron.database_name): where it is not,
      -- this fails and the trailing edge is flushed by the next state change only.
      create extension if not exists pg_cron with schema pg_catalog;
    exception when others then
      raise notice 'pg_cron is available but could not be installed here (%)', sqlerrm;
    end;
  end if;
end
$$;

-- Settings -----------------------------------------------------------------------------------------

create table public.enrichment_settings (
  key text primary key
    constraint enrichment_settings_key_format check (key ~ '^[a-z][a-z0-9_]{0,62}$'),
  value text,
  updated_at timestamptz not null default now()
);
comment on table public.enrichment_settings is
  'Operational settings read at run time (webhook_debounce_seconds, webhook_source, '
  'webhook_timeout_ms; prefect_webhook_url only where Supabase Vault is missing). Not exposed to '
  'anon or authenticated.';

-- The debounce row (exactly one) and the changes recorded while a window was open.
create table public.enrichment_webhook_debounce (
  id boolean primary key default true constraint enrichment_webhook_debounce_one_row check (id),
  last_sent_at timestamptz,
  last_request_id bigint,
  sent_count bigint not null default 0
);
insert into public.enrichment_webhook_debounce (id) values (true);

create table public.enrichment_webhook_pending (
  id bigint generated always as identity primary key,
  created_at timestamptz not null default clock_timestamp(),
  -- {"op", "batch_ids", "more_batches", "ready", "finished"}: one statement's change.
  change jsonb not null
);

alter table public.enrichment_settings enable row level security;
alter table public.enrichment_webhook_debounce enable row level security;
alter table public.enrichment_webhook_pending enable row level security;
-- Supabase's default privileges grant new public tables to the API roles: take that back. Only the
-- owner (through the security definer functions below) reads the URL or touches the debounce state;
-- the service role may tune the settings.
revoke all on public.enrichment_settings, public.enrichment_webhook_debounce,
  public.enrichment_webhook_pending from public, anon, authenticated, service_role;
grant select, insert, update, delete on public.enrichment_settings to service_role;

-- A setting as text ('' counts as unset).
create function public.enrichment_setting(p_key text) returns text
language sql stable
security definer
set search_path = public, pg_temp
as $$ select nullif(btrim(value), '') from enrichment_settings where key = p_key $$;

-- A non-negative number setting, or p_default when it is unset or not a number (never an error: a
-- typo in a setting must not fail a state change).
create function public.enrichment_setting_number(p_key text, p_default numeric) returns numeric
language sql stable
security definer
set search_path = public, pg_temp
as $$
  select coalesce(
    (select case when s ~ '^[0-9]+(\.[0-9]+)?$' then s::numeric end
     from (select public.enrichment_setting(p_key) as s) x),
    p_default)
$$;

-- A secret: from Supabase Vault when the vault schema exists and holds it, else from the settings
-- table (plain PostgreSQL, or a value not moved to Vault yet).
create function public.enrichment_secret(p_name text) returns text
language plpgsql stable
security definer
set search_path = public, pg_temp
as $$
declare
  v_value text;
begin
  if to_regclass('vault.decrypted_secrets') is not null then
    -- Dynamic: the vault schema may appear after this function was created (or never).
    execute 'select decrypted_secret from vault.decrypted_secrets where name = $1 limit 1'
      into v_value using p_name;
    v_value := nullif(btrim(v_value), '');
  end if;
  return coalesce(v_value, public.enrichment_setting(p_name));
end
$$;

-- The pg_net call ---------------------------------------------------------------------------------

-- The only place that calls pg_net, so it can be wrapped or faked. Named arguments, pg_net's
-- signature: net.http_post(url text, body jsonb, params jsonb, headers jsonb,
-- timeout_milliseconds int) returns bigint (the request id). Referenced only when called, so this
-- function exists (unused) where pg_net does not.
create function public.state_webhook_post(
  p_url text, p_body jsonb, p_headers jsonb, p_timeout_ms integer
) returns bigint
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  return net.http_post(
    url := p_url,
    body := p_body,
    params := '{}'::jsonb,
    headers := p_headers,
    timeout_milliseconds := p_timeout_ms);
end
$$;

-- Sends what is pending plus p_change (may be null: a flush) when the window has passed and no other
-- transaction is sending. Returns the request id, or null when nothing was sent (then p_change is
-- recorded as pending, unless it is null). Never raises: a failed send keeps everything pending.
create function public.state_webhook_send(p_url text, p_window interval, p_change jsonb)
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
        delete from enrichment_webhook_pending p returning p.id, p.created_at, p.change
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

-- One statement's change: send it now (leading edge) or record it (window open, or someone else is
-- sending). Returns the request id when one was queued.
create function public.state_webhook_notify(p_change jsonb) returns bigint
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_url text;
  v_window interval;
  v_last timestamptz;
begin
  v_url := public.enrichment_secret('prefect_webhook_url');
  if v_url is null then
    return null;
  end if;
  v_window := make_interval(secs => public.enrichment_setting_number('webhook_debounce_seconds', 2));
  -- Unlocked read: while the window is open, record without touching the debounce row at all.
  select d.last_sent_at into v_last from enrichment_webhook_debounce d where d.id;
  if v_last is not null and clock_timestamp() < v_last + v_window then
    insert into enrichment_webhook_pending (change) values (p_change);
    return null;
  end if;
  return public.state_webhook_send(v_url, v_window, p_change);
end
$$;

-- The trailing edge: send what is pending once its window has passed (pg_cron calls this every few
-- seconds; anyone may call it). Also drops changes pending for over an hour (a webhook that kept
-- failing): by then the conductor's scheduled sweep has long covered them. Returns the request id.
create function public.flush_state_webhook() returns bigint
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
    delete from enrichment_webhook_pending;  -- the URL was removed: nothing will ever send them
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

-- Wiring ------------------------------------------------------------------------------------------

-- Reports whether the wake-up trigger posts the webhook (it does when pg_net's net.http_post
-- exists), and creates the pg_cron flush job when pg_cron's cron.schedule exists. Idempotent: run by this migration, and again by deploy.sh (or by
-- hand) after enabling pg_net or pg_cron later. Returns what it did.
create function public.enable_state_webhooks() returns text
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_done text[] := '{}';
  v_cron_version int[];
begin
  -- The posting itself is done by notify_state_change(), the wake-up trigger every statement on
  -- workflow_states already fires (20261122000300_wakeups.sql), as soon as net.http_post exists.
  if to_regprocedure('net.http_post(text, jsonb, jsonb, jsonb, integer)') is not null then
    v_done := v_done || 'database webhook'::text;
  else
    v_done := v_done || 'no net.http_post: pg_notify only'::text;
  end if;

  if to_regprocedure('cron.schedule(text, text, text)') is not null then
    select string_to_array(split_part(extversion, '-', 1), '.')::int[] into v_cron_version
    from pg_extension where extname = 'pg_cron';
    -- Sub-minute schedules need pg_cron 1.5 or later; an older one flushes every minute.
    -- cron.schedule() with an existing job name replaces that job.
    perform cron.schedule(
      'enrichment-webhook-flush',
      case when v_cron_version is null or v_cron_version >= array[1, 5] then '5 seconds'
           else '* * * * *' end,
      'select public.flush_state_webhook()');
    -- pg_cron keeps a row per run in cron.job_run_details and never cleans it: keep a day of ours.
    perform cron.schedule(
      'enrichment-webhook-flush-cleanup',
      '17 * * * *',
      $cmd$delete from cron.job_run_details
           where jobid in (select jobid from cron.job where jobname = 'enrichment-webhook-flush')
             and end_time < now() - interval '1 day'$cmd$);
    v_done := v_done || 'pg_cron flush job'::text;
  end if;
  return array_to_string(v_done, ', ');
end
$$;

-- {configured, window_seconds, last_sent_at, sent_count, pending, webhook}: for deploy checks and
-- debugging. Never shows the URL.
create function public.state_webhook_status() returns jsonb
language sql stable
security definer
set search_path = public, pg_temp
as $$
  select jsonb_build_object(
    'configured', public.enrichment_secret('prefect_webhook_url') is not null,
    'window_seconds', public.enrichment_setting_number('webhook_debounce_seconds', 2),
    'source', coalesce(public.enrichment_setting('webhook_source'), current_database()),
    'last_sent_at', (select last_sent_at from enrichment_webhook_debounce where id),
    'sent_count', (select sent_count from enrichment_webhook_debounce where id),
    'pending', (select count(*) from enrichment_webhook_pending),
    'webhook', to_regprocedure('net.http_post(text, jsonb, jsonb, jsonb, integer)') is not null)
$$;

revoke execute on function public.enrichment_setting(text),
  public.enrichment_setting_number(text, numeric), public.enrichment_secret(text),
  public.state_webhook_post(text, jsonb, jsonb, integer),
  public.state_webhook_send(text, interval, jsonb), public.state_webhook_notify(jsonb),
  public.flush_state_webhook(), public.enable_state_webhooks(),
  public.state_webhook_status()
  from public, anon, authenticated, service_role;
grant execute on function public.flush_state_webhook(), public.state_webhook_status() to service_role;

select public.enable_state_webhooks();
