"""Benchmark orchestrator: Hydra milestone grids run as Ray tasks, tracked in MLflow.

Run: python -m orchestrator +milestone=m10
"""

INTERRUPTED_STATUS = 130  # the exit status of a sweep stopped by Ctrl-C (128 + SIGINT)
TERMINATED_STATUS = 143  # the exit status of a sweep stopped by SIGTERM (128 + SIGTERM)
