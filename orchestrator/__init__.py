"""Benchmark orchestrator: Hydra milestone grids run as Ray tasks, tracked in MLflow.

Run: python -m orchestrator +milestone=m10
"""
