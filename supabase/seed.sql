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

-- Exa: one search per company for its official site (shared/steps/exa_verify.py). The API key is
-- read from the variable api_key_env names (on Modal, the Exa secret), never stored here;
-- base_url_env lets a stand-in serve it (shared/providers/exa_standin.py). provider names the
-- shared rate limit and the ledger; cost_usd is what a call is recorded at when Exa's answer
-- carries no costDollars. The result is cached per client for 30 days under the normalised domain
-- and name, and an item for which normalize_domain found no domain is skipped (nothing to verify).
insert into public.enrichment_registry (step_name, type, modal_function_name, results_table, config, description)
values
  ('exa_verify', 'SYNC', 'exa_verify', 'exa_verify_results',
   '{"needs": ["normalize_domain"], "provider": "exa", "cost_usd": 0.007, "timeout_seconds": 30, "request_timeout_seconds": 10, "max_attempts": 3, "backoff_seconds": 5, "api_key_env": "EXA_API_KEY", "base_url_env": "EXA_BASE_URL", "num_results": 5, "search_type": "auto", "category": "company", "cache": {"ttl_seconds": 2592000, "key": ["normalize_domain.domain", "name"]}, "skip_unless": ["normalize_domain.domain"]}',
   'Verifies the company''s domain with an Exa search for its official site: verified, confidence, the matching result and its evidence.')
on conflict (step_name) do nothing;
