"""Provider clients, one module per provider (like a driver per database)."""
