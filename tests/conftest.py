"""Test-session set-up. The suite runs as two pytest-xdist workers (`pytest -n 2`, the README's test command) on
the 2-core CI machine: each worker, and every process it starts, computes on one thread, so that the two never
fight over the cores (small CPU kernels gain little from a second thread, and oversubscribed OpenMP threads that
spin-wait lose much). Set before torch is imported by any test module; a value already in the environment wins."""
import os

if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    import torch

    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
