-- A step that cannot run here is refused when a batch names it, not after its rows fail.
--
-- A registry step whose config has "unavailable": "<reason>" cannot start a new batch: the insert
-- fails with the reason (Supabase Studio shows it; enrich prints it). deploy.sh sets it on
-- clay_enrich when no Clay webhook URL was deployed to the workers (the URL lives in a Modal
-- secret the database never sees), and removes it once one is. Batches already running are left
-- alone: their rows fail or retry as the step's own errors say.

create function public.registry_check_unavailable() returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
begin
  if new.config ? 'unavailable' and jsonb_typeof(new.config -> 'unavailable') <> 'string' then
    raise exception 'config.unavailable of step "%" must be a reason (a string), got %',
      new.step_name, new.config -> 'unavailable'
      using errcode = '22023';
  end if;
  return new;
end
$$;

create trigger enrichment_registry_check_unavailable
  before insert or update of config on public.enrichment_registry
  for each row execute function public.registry_check_unavailable();

create function public.batches_check_available() returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_step text;
  v_reason text;
begin
  -- batches_check_blueprint fired first (triggers fire in name order): the shape is valid.
  select r.step_name, r.config ->> 'unavailable' into v_step, v_reason
  from jsonb_array_elements_text(new.blueprint) s(step_name)
  join enrichment_registry r using (step_name)
  where r.config ? 'unavailable'
  limit 1;
  if v_step is not null then
    raise exception 'blueprint step "%" is unavailable: %', v_step, v_reason
      using errcode = '22023', hint = 'fix the deployment (see deploy.sh), then create the batch';
  end if;
  return new;
end
$$;

create trigger batches_check_steps_available
  before insert on public.batches
  for each row execute function public.batches_check_available();
