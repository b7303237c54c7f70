"""SQL that more than one service's migrations include (shared.db.read_migration)."""
