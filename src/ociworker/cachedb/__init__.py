"""The persistent cache index (SQLite): cache key -> result."""
