"""The Prefect conductor: a stateless flow that claims ready rows and dispatches them to workers."""
