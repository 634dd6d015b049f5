"""Orchestration of training: parts from the config (build), one run's state and folder (run_state), the epoch
loop for one run or packed seeds (loop), the final table and the eval command (final)."""
