"""Number formats: which dtype a run's weights and data have, what autocast runs in, and the loss dtype.

training.precision: fp32 (the reference), fp64 (weights, data, losses and soft labels in float64: for equality
tests of two code paths that must hold on any CPU, where float32 rounding differs between kernels), bf16 / fp16
(float32 weights, forwards under autocast; fast engine). auto = bf16 on a GPU, fp32 on a CPU.
"""
import torch

PRECISIONS = ('auto', 'fp32', 'fp64', 'bf16', 'fp16')
AUTOCAST = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def resolve_precision(name, device, engine='fast'):
    """'auto' -> bf16 on a GPU with the fast engine, else fp32; the eager engine runs fp32 or fp64 only."""
    if engine == 'eager':
        return 'fp64' if name == 'fp64' else 'fp32'
    if name == 'auto':
        return 'bf16' if torch.device(device).type == 'cuda' else 'fp32'
    return name


def param_dtype(precision):
    """dtype of weights, data and soft labels: float64 for fp64, float32 otherwise (autocast casts the rest)."""
    return torch.float64 if precision == 'fp64' else torch.float32


def upcast(t):
    """Losses and probabilities in at least float32: half-precision logits are widened, float64 ones kept."""
    return t if t.dtype == torch.float64 else t.float()
