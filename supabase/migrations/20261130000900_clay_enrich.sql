-- clay_enrich (issue 7, item 4): company enrichment by a Clay table, the first real ASYNC step.
--
-- The worker posts each item to the Clay table's webhook (shared/providers/clay.py); the table's
-- HTTP API column posts the enrichment back to the row's callback URL, and the receiver's parser
-- (shared/steps/clay_enrich.py, parse_clay_callback) turns that body into the result written here
-- by complete_steps, like any step's: {"company_name": ..., "employee_count": 1234, ...,
-- "request_id": ..., "body": {the whole callback body}}. The typed columns are derived from it, so
-- complete_steps stays generic and the table stays queryable in Studio; the full body stays in
-- result -> 'body'.
--
-- The webhook URL and its token are credentials: they live in the environment (a Modal secret),
-- named by the registry config (webhook_url_env, auth_token_env), never in the database.

create table public.clay_enrich_results (
  batch_id uuid not null,
  item_id uuid not null,
  attempt integer not null,
  result jsonb not null,
  request_id text generated always as (result ->> 'request_id') stored,
  company_name text generated always as (result ->> 'company_name') stored,
  domain text generated always as (result ->> 'domain') stored,
  linkedin_url text generated always as (result ->> 'linkedin_url') stored,
  website text generated always as (result ->> 'website') stored,
  -- Integers only when the value is one: a row written by hand (Studio) cannot break the insert.
  employee_count integer generated always as (
    case when result ->> 'employee_count' ~ '^\d{1,9}$' then (result ->> 'employee_count')::integer end
  ) stored,
  employee_range text generated always as (result ->> 'employee_range') stored,
  industry text generated always as (result ->> 'industry') stored,
  country text generated always as (result ->> 'country') stored,
  location text generated always as (result ->> 'location') stored,
  description text generated always as (result ->> 'description') stored,
  founded_year integer generated always as (
    case when result ->> 'founded_year' ~ '^\d{1,4}$' then (result ->> 'founded_year')::integer end
  ) stored,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (batch_id, item_id),
  foreign key (batch_id, item_id) references public.batch_items (batch_id, id) on delete cascade
);
create index clay_enrich_results_domain on public.clay_enrich_results (domain);

alter table public.clay_enrich_results enable row level security;
create policy clay_enrich_results_read_own_client on public.clay_enrich_results
  for select to authenticated using (public.owns_batch(batch_id));
revoke all on public.clay_enrich_results from anon, authenticated;
grant select on public.clay_enrich_results to authenticated;
grant all on public.clay_enrich_results to service_role;
