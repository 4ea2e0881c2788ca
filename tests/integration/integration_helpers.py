"""Moved to ``tests/support/`` (kept for imports not yet migrated): import from ``tests.support``."""

from tests.support import named_clients, named_url, other_clients, ready

__all__ = ["named_clients", "named_url", "other_clients", "ready"]
