"""Scaling training out: planning (plan.py) and cloud launchers (sagemaker.py)."""
