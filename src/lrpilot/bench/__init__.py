"""The bench: tasks, runs, results store, scoring and report."""
