"""The ``enrich`` command line."""
