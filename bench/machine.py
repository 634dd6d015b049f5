"""What machine a benchmark ran on, without the heavy imports (ffcv, numba) of the benchmarks themselves."""
import os
import platform


def cpu_model():
    """The CPU's model name and the cores visible, from /proc/cpuinfo (else platform.processor())."""
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    except OSError:
        names = []
    return f'{names[0]} ({os.cpu_count()} cores visible)' if names else platform.processor()
