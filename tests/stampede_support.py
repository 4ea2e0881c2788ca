"""Moved to ``tests/support/`` (kept for imports not yet migrated): import from ``tests.support``."""

from tests.support import WAIT, AsyncOnly, Boom, Clock, Gate, Joined, Mark, crowd, eventually

__all__ = ["WAIT", "AsyncOnly", "Boom", "Clock", "Gate", "Joined", "Mark", "crowd", "eventually"]
