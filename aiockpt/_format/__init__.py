"""The on-disk format: the manifest and the one registry of tags (docs/FORMAT.md)."""
