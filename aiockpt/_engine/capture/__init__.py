"""Capture's first half: state_dicts to a tensor table and a JSON skeleton."""
