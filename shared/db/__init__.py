"""Database plumbing: the private (embedded) cluster, the migration runner, DSN resolution."""

from shared.db.connect import resolve_dsn, resolve_dsn_sync
from shared.db.embedded import EmbeddedPostgres, EmbeddedStatus, find_bin_dir
from shared.db.migrate import Migration, MigrationError, MigrationStatus, migrate, migrate_sync

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedStatus",
    "Migration",
    "MigrationError",
    "MigrationStatus",
    "find_bin_dir",
    "migrate",
    "migrate_sync",
    "resolve_dsn",
    "resolve_dsn_sync",
]
