-- Row level security, as on Supabase: a signed-in user (role `authenticated`, client id in its JWT)
-- sees only its own client's rows; `anon` sees nothing; `service_role` (workers, conductor) and the
-- database owner bypass RLS. Users create and read batches; only the service role moves states.

alter table public.batches enable row level security;
alter table public.batch_items enable row level security;
alter table public.workflow_states enable row level security;
alter table public.enrichment_registry enable row level security;
alter table public.step_a_results enable row level security;
alter table public.step_b_results enable row level security;
alter table public.normalize_domain_results enable row level security;
alter table public.clean_company_name_results enable row level security;

-- Whether the signed-in user may see a batch. security definer so the policies of tables keyed by
-- batch_id need not re-evaluate the batches policy row by row.
create function public.owns_batch(p_batch_id uuid) returns boolean
language sql stable
security definer
set search_path = public, pg_temp
as $$
  select exists (select 1 from batches b where b.id = p_batch_id and b.client_id = request_client_id())
$$;

create policy batches_own_client on public.batches
  for all to authenticated
  using (client_id = public.request_client_id())
  with check (client_id = public.request_client_id());

create policy batch_items_own_client on public.batch_items
  for all to authenticated
  using (public.owns_batch(batch_id))
  with check (public.owns_batch(batch_id));

create policy workflow_states_read_own_client on public.workflow_states
  for select to authenticated using (public.owns_batch(batch_id));

create policy enrichment_registry_read on public.enrichment_registry
  for select to authenticated using (true);

create policy step_a_results_read_own_client on public.step_a_results
  for select to authenticated using (public.owns_batch(batch_id));
create policy step_b_results_read_own_client on public.step_b_results
  for select to authenticated using (public.owns_batch(batch_id));
create policy normalize_domain_results_read_own_client on public.normalize_domain_results
  for select to authenticated using (public.owns_batch(batch_id));
create policy clean_company_name_results_read_own_client on public.clean_company_name_results
  for select to authenticated using (public.owns_batch(batch_id));

-- Table privileges. Supabase grants everything to anon and authenticated by default and relies on
-- RLS; we grant only what each role needs, so a missing policy can never open a table.
revoke all on all tables in schema public from anon, authenticated;
grant select, insert, delete on public.batches to authenticated;
grant update (name, meta) on public.batches to authenticated;
grant select, insert, delete on public.batch_items to authenticated;
grant select on public.workflow_states, public.enrichment_registry, public.step_a_results,
  public.step_b_results, public.normalize_domain_results, public.clean_company_name_results
  to authenticated;
grant all on all tables in schema public to service_role;
grant usage, select on all sequences in schema public to service_role;

-- Tables and sequences created later (a new step's results table) get what Supabase's default
-- privileges give the service role; anon and authenticated get nothing until a migration grants it
-- with a policy (on Supabase they get everything by default: revoke there, as above).
alter default privileges in schema public grant all on tables to service_role;
alter default privileges in schema public grant usage, select on sequences to service_role;
alter default privileges in schema public revoke execute on functions from public;
alter default privileges in schema public grant execute on functions to service_role;

-- Function privileges: PostgreSQL (and Supabase's default privileges) let everyone execute new
-- functions. Workers' transitions are for the service role only.
revoke execute on all functions in schema public from public, anon, authenticated;
grant execute on all functions in schema public to service_role;
grant execute on function public.request_client_id(), public.owns_batch(uuid),
  public.create_batch(jsonb, jsonb, uuid, text), public.batch_progress(uuid),
  public.validate_blueprint(jsonb), public.require_batch(uuid)
  to authenticated;
