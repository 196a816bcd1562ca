"""Common code of the enrichment orchestrator: settings, the State API, steps and CLI support.

This package never imports ``flows`` (Prefect) or ``modal_app`` (Modal): those stay at the edges.
"""
