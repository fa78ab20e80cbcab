"""Writing the moeconv format (v1; ``spec/FORMAT.md``).  Reading lives in ``moeconv_numpy``."""

from .writer import DEFAULT_MAX_SHARD_BYTES, PARTIAL_DIR, ShardedWriter

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "PARTIAL_DIR", "ShardedWriter"]
