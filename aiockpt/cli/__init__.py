"""The ``aiockpt`` command line: one module per command over checkpoints at rest."""
