"""Integrations with training frameworks; each module needs its framework (the extra of the same name)."""
