"""training.engine=fast: engine.step.train_step with the speed-ups, each switchable for benchmarks.

channels-last memory format, autocast at `precision` (bf16 / fp16; fp16 with an enabled GradScaler), a
torch.compile'd model, and (cuda_graphs, on a GPU) the whole step captured as CUDA graphs and replayed
(engine.cuda_graphs). Options for the forwards that do not train (issue 12; off by default until measured on a
GPU, bench/RESULTS.md): fold_bn runs the attack and the clean-accuracy forward on engine.fold_bn's view of the
model (eval-mode BN folded into the conv before it); fused_attack compiles the attack's objective (model and loss)
as one graph and its update and projection as another. The model may be one network or K packed seeds
(engine.packing.PackedModel, with seeds=PackedSeeds passed to the step). tests/test_fast_step.py and
tests/test_fold_bn.py check that it computes what the eager step computes.
"""
import contextlib

import torch

from engine.attacks import UPDATES, attack_objective
from engine.errors import ConfigError
from engine.fold_bn import fold_bn as fold_bn_view
from engine.precision import AUTOCAST, resolve_precision
from engine.step import SINGLE, train_step

FP16_ATTACK_LOSS_SCALE = 1024.0  # keeps fp16 input gradients from underflowing; PGD only uses their sign


class FastStep:
    """step(optimizer, batch, **train_step keywords) -> statistics. `eval_net` is the model to evaluate with.
    With cuda_graphs the optimizer must come from engine.step.make_sgd(..., graphed=True), and `generators` are
    the explicit generators the step draws from besides the default one (packed seeds' PackedSeeds generators)."""

    def __init__(self, model, device, *, precision='auto', channels_last=True, compile=True, cuda_graphs=False,
                 log=None, backend='inductor', fold_bn=False, fused_attack=False, generators=()):
        self.device, self.precision = device, resolve_precision(precision, device)
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if device.type == 'cuda':  # fixed batch shapes: cuDNN's autotuner measures each convolution once
            torch.backends.cudnn.benchmark = True
        maybe_compile = (lambda f: torch.compile(f, backend=backend)) if compile else (lambda f: f)
        self.net = maybe_compile(model)  # backend: tests record graphs
        # The forwards that do not train: the attack's, the clean-accuracy one and the per-epoch evaluation.
        attack_model, folded = fold_bn_view(model) if fold_bn else (model, 0)
        if fold_bn and log:
            log(f'fold_bn: {folded} eval-mode BatchNorms folded into their convolutions for the attack and the '
                'evaluation forwards')
        self.eval_net = maybe_compile(attack_model) if folded else self.net
        self.attack_model, self.attack_kernels = self.eval_net, {}
        if fused_attack and compile:  # the model is compiled inside the objective: one graph with the loss
            self.attack_model = attack_model
            objective = maybe_compile(attack_objective)
            # One update kernel per norm (attack.norm), the one the attack's norm needs: torch.compile traces lazily,
            # so the unused one costs nothing.
            self.attack_kernels = {norm: dict(objective=objective, update=maybe_compile(update))
                                   for norm, update in UPDATES.items()}
        dtype = AUTOCAST.get(self.precision)
        self.graphed = None
        if cuda_graphs and device.type == 'cuda':
            if dtype is torch.float16:
                raise ConfigError('training.cuda_graphs needs precision bf16 or fp32: fp16 loss scaling reads '
                                  'an overflow flag back to the host every step')
            from engine.cuda_graphs import GraphedStep
            self.graphed = GraphedStep(self._step, log=log, generators=generators)
        # autocast's weight-cast cache is off under graphs: a cast cached at capture would never be refreshed.
        cache = self.graphed is None
        self.autocast = ((lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=cache)) if dtype
                         else contextlib.nullcontext)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    def _step(self, optimizer, batch, *, attack, seeds=SINGLE, **kw):
        attack = dict(attack, **self.attack_kernels.get(attack.get('norm', 'linf'), {}))
        if self.scaler.is_enabled():
            attack['loss_scale'] = FP16_ATTACK_LOSS_SCALE
        if self.channels_last:
            seeds = ChannelsLast(seeds)
        return train_step(self.net, optimizer, batch, attack=attack, autocast=self.autocast, scaler=self.scaler,
                          seeds=seeds, attack_model=self.attack_model, eval_model=self.eval_net, **kw)

    def __call__(self, optimizer, batch, **kw):
        return (self.graphed or self._step)(optimizer, batch, **kw)


class ChannelsLast:
    """A step's view of its seeds (engine.step.SingleSeed, engine.packing.PackedSeeds) whose network input is
    channels-last: the packed [B, K*C, H, W] input is made after packing, from the seed-major batch."""

    def __init__(self, seeds):
        self.seeds, self.k = seeds, seeds.k

    def inputs(self, x):
        return self.seeds.inputs(x).contiguous(memory_format=torch.channels_last)

    def __getattr__(self, name):  # labels, start, losses, grad_norms: the seeds' own
        return getattr(self.seeds, name)
