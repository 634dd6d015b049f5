"""training.engine=fast: engine.step.train_step with the speed-ups, each switchable for benchmarks.

channels-last memory format, autocast at `precision` (bf16 / fp16; fp16 with an enabled GradScaler), a
torch.compile'd model, and (cuda_graphs, on a GPU) the whole step captured as CUDA graphs and replayed
(engine.cuda_graphs). tests/test_fast_step.py checks that it computes what the eager step computes.
"""
import contextlib

import torch

from engine.errors import ConfigError
from engine.precision import AUTOCAST, resolve_precision
from engine.step import train_step

FP16_ATTACK_LOSS_SCALE = 1024.0  # keeps fp16 input gradients from underflowing; PGD only uses their sign


class FastStep:
    """step(optimizer, batch, **train_step keywords) -> statistics. `net` is the model to evaluate with, too.
    With cuda_graphs the optimizer must come from engine.step.make_sgd(..., graphed=True)."""

    def __init__(self, model, device, *, precision='auto', channels_last=True, compile=True, cuda_graphs=False,
                 log=None, backend='inductor'):
        self.device, self.precision = device, resolve_precision(precision, device)
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if device.type == 'cuda':  # fixed batch shapes: cuDNN's autotuner measures each convolution once
            torch.backends.cudnn.benchmark = True
        self.net = torch.compile(model, backend=backend) if compile else model  # backend: tests record graphs
        dtype = AUTOCAST.get(self.precision)
        self.graphed = None
        if cuda_graphs and device.type == 'cuda':
            if dtype is torch.float16:
                raise ConfigError('training.cuda_graphs needs precision bf16 or fp32: fp16 loss scaling reads '
                                  'an overflow flag back to the host every step')
            from engine.cuda_graphs import GraphedStep
            self.graphed = GraphedStep(self._step, log=log)
        # autocast's weight-cast cache is off under graphs: a cast cached at capture would never be refreshed.
        cache = self.graphed is None
        self.autocast = ((lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=cache)) if dtype
                         else contextlib.nullcontext)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    def _step(self, optimizer, batch, *, attack, **kw):
        x, y, idx = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.scaler.is_enabled():
            attack = dict(attack, loss_scale=FP16_ATTACK_LOSS_SCALE)
        return train_step(self.net, optimizer, (x, y, idx), attack=attack, autocast=self.autocast,
                          scaler=self.scaler, **kw)

    def __call__(self, optimizer, batch, **kw):
        return (self.graphed or self._step)(optimizer, batch, **kw)
