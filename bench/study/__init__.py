"""Helpers of bench/study_lr_robustness.py: the service it drives, its data, its jobs and its report."""
