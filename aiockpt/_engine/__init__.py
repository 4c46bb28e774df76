"""The pipeline: capture, staging memory, copy and write tasks, commit, restore."""
