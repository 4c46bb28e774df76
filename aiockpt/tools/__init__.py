"""Measuring tools: ``aiockpt bench``, ``aiockpt diagnose`` and the machine probes."""
