-- Built-in steps. Idempotent: a step already registered (and perhaps tuned) is left as it is.
insert into public.enrichment_registry (step_name, type, modal_function_name, results_table, config, description)
values
  ('step_a', 'SYNC', 'step_a', 'step_a_results',
   '{"sleep_ms": 50, "timeout_seconds": 60, "max_attempts": 3, "backoff_seconds": 1}',
   'Tracer-bullet shell: sleeps config.sleep_ms, then completes. config.fail_every makes attempts fail.'),
  ('step_b', 'SYNC', 'step_b', 'step_b_results',
   '{"sleep_ms": 50, "timeout_seconds": 60, "max_attempts": 3, "backoff_seconds": 1}',
   'Tracer-bullet shell: sleeps config.sleep_ms, then completes. config.fail_every makes attempts fail.'),
  ('normalize_domain', 'SYNC', 'normalize_domain', 'normalize_domain_results',
   '{"timeout_seconds": 60, "max_attempts": 2, "backoff_seconds": 1}',
   'Registrable domain from the website, domain, URL or email fields (offline public suffix list).'),
  ('clean_company_name', 'SYNC', 'clean_company_name', 'clean_company_name_results',
   '{"timeout_seconds": 60, "max_attempts": 2, "backoff_seconds": 1}',
   'Company name without legal suffixes and noise, casing repaired.')
on conflict (step_name) do nothing;

-- ASYNC: answered later by callback (see shared/providers/emulator.py for step_async's provider).
insert into public.enrichment_registry (step_name, type, modal_function_name, results_table, config, description)
values
  ('step_async', 'ASYNC', 'step_async', 'step_async_results',
   '{"delay_ms": 50, "timeout_seconds": 30, "callback_timeout_seconds": 60, "max_attempts": 3, "backoff_seconds": 1}',
   'ASYNC shell: a local provider emulator calls back over HTTP after config.delay_ms; fail_every, drop_every and duplicate_every inject faults.')
on conflict (step_name) do nothing;

-- Clay: the item goes to a Clay table's webhook, the table's HTTP API column calls back (see
-- shared/steps/clay_enrich.py for the body it should post). The webhook URL and token are read from
-- the environment variables the config names (on Modal, the Clay secret), never stored here.
-- Few attempts, spaced out: a refused post (429, 5xx) costs nothing, but an attempt whose callback
-- never came was a row Clay billed for.
insert into public.enrichment_registry (step_name, type, modal_function_name, results_table, config, description)
values
  ('clay_enrich', 'ASYNC', 'clay_enrich', 'clay_enrich_results',
   '{"needs": ["normalize_domain"], "timeout_seconds": 30, "request_timeout_seconds": 15, "callback_timeout_seconds": 3600, "max_attempts": 3, "backoff_seconds": 30, "webhook_url_env": "CLAY_WEBHOOK_URL", "auth_token_env": "CLAY_WEBHOOK_TOKEN", "auth_token_required": false}',
   'Company enrichment by a Clay table: posts name, domain and LinkedIn URL to its webhook; its HTTP API column calls back with the result.')
on conflict (step_name) do nothing;
