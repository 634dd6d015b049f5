"""Weight EMA: an exponential moving average of a model's weights, the baseline of any method (issue 14).

After every optimizer step, for every floating-point entry of the state dict (weights and BatchNorm running
statistics):   ema = decay * ema + (1 - decay) * model,   and integer entries (num_batches_tracked) are copied.
Averaging the running statistics with the weights is the common convention (e.g. Ultralytics' ModelEMA averages
every floating-point state-dict entry); the default decay 0.995 per step is issue 14's. The update is one
foreach lerp on the device, no host sync, so it runs inside the captured CUDA graph of the fast step like the
optimizer's. For packed seeds the average is elementwise, so the EMA of the packed model is the K seeds' EMAs
concatenated, and unpacks like the model (engine.packing.unpack_state).

The EMA model is an ordinary model of the run's architecture: evaluated each epoch, selected as its own best
(best-ema.pt), reported as its own rows ('ema best', 'ema final') in the final table, saved in every checkpoint
as the part 'ema'.
"""
import copy

import torch
import torch.nn as nn


class WeightEMA:
    """The average of `model` (`self.model`: same architecture, eval mode, never trained); update() after each
    optimizer step. `average`: an existing averaged model to continue (packed seeds: their EMAs packed), else a
    copy of `model`. State: the averaged model's state dict (the checkpoint part 'ema')."""

    def __init__(self, model: nn.Module, decay: float, average: nn.Module | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f'weight EMA decay must be in [0, 1), got {decay}')
        self.decay, self.source = decay, model
        self.model = (copy.deepcopy(model) if average is None else average).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self):
        """One step of the recurrence. The state dicts are read at each call (their tensors, not copies), so the
        average follows the model's tensors wherever they are (a channels-last conversion replaces them)."""
        floats, now, others = [], [], []
        for ema, current in zip(self.model.state_dict().values(), self.source.state_dict().values()):
            if ema.is_floating_point():
                floats.append(ema)
                now.append(current)
            else:
                others.append((ema, current))
        torch._foreach_lerp_(floats, now, 1.0 - self.decay)
        for ema, current in others:
            ema.copy_(current)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
