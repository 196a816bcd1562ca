"""Step handler modules for tests, loaded through ``ENRICH_STEP_MODULES`` (e.g. by ``enrich serve``
running as a subprocess with the repository root on ``PYTHONPATH``)."""
