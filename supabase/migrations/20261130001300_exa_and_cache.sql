-- Paid providers done right (issue 8, items 1, 4 and 5): exa_verify's results, the result cache
-- and conditions.
--
-- 1. exa_verify_results: the results of exa_verify (shared/steps/exa_verify.py), one Exa search
--    per company. complete_steps writes the result object like any step's; the typed columns are
--    derived from it, so the table stays queryable in Studio and complete_steps stays generic.

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
