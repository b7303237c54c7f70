"""The thin public entry point: JWT-protected queries from its own read model, admin commands forwarded to
the owning service."""
