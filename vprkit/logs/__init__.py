"""Logs: run logs and summaries (runlog), TensorBoard beside them, and the figures and summaries
analyze_metrics.py draws from them (plots, run_summary, run_figures). No torch."""
