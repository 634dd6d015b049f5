"""One training step, as the paper's algorithm reads: attack, loss (with the SGLS update), backward, update.

The eager step is the reference. The fast step runs the same function with the model compiled, channels-last
tensors and mixed precision; tests check that it computes the same thing. Neither reads a value back to the
host: the epoch's metrics accumulate in a device tensor (EpochMeter) that the trainer reads once per epoch.
"""
import contextlib

import torch

from engine.attacks import pgd
from engine.errors import ConfigError
from engine.methods import LOSSES
from engine.precision import AUTOCAST, resolve_precision, upcast

FP16_ATTACK_LOSS_SCALE = 1024.0  # keeps fp16 input gradients from underflowing; PGD only uses their sign


def step_stats(loss, robust_correct, clean_correct, grad_norm, n):
    """A step's metrics as one [4] float64 device vector: loss x n, robust-correct, clean-correct, grad-norm."""
    return torch.stack([upcast(loss.detach()) * n, upcast(robust_correct), upcast(clean_correct),
                        upcast(grad_norm)]).double()


class EpochMeter:
    """Device-side sums of loss, robust-correct, clean-correct and grad-norm; image and step counts on the host."""

    def __init__(self, device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.images = self.steps = 0

    def add(self, loss, robust_correct, clean_correct, grad_norm, n):
        self.add_stats(step_stats(loss, robust_correct, clean_correct, grad_norm, n), n)

    def add_stats(self, stats, n):
        """stats: a step's [4] float64 vector (step_stats); a replayed CUDA graph hands its static output here."""
        self.sums += stats
        self.images += n
        self.steps += 1

    def read(self):
        """The one host sync of the epoch."""
        loss, robust, clean, grad = self.sums.tolist()
        n = max(self.images, 1)
        return {'train_loss': loss / n, 'train_robust_acc': 100 * robust / n, 'train_clean_acc': 100 * clean / n,
                'grad_norm': grad / max(self.steps, 1), 'images': self.images}


def attack_cfg_kwargs(attack):
    """Attack config in 1/255 units -> pgd() keyword arguments in pixel units."""
    return dict(eps=attack.eps / 255, step_size=attack.step_size / 255, steps=attack.steps, bn_mode=attack.bn_mode)


def global_grad_norm(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def train_step(model, optimizer, x, y, idx, *, method, attack, soft_labels, epoch, meter,
               autocast=contextlib.nullcontext, scaler=None):
    """attack -> loss -> backward -> SGD step; metrics into `meter`. `attack` is pgd() kwargs.

    autocast: a context-manager factory wrapping the forward passes (mixed precision); scaler: a GradScaler
    for fp16 (None otherwise).
    """
    with torch.no_grad(), autocast():  # train clean accuracy in eval mode: the measurement moves no BN statistics
        model.eval()
        clean_correct = (model(x).argmax(1) == y).sum()
    x_adv = None
    if method.name != 'ce':
        loss_kind, start = method.attack_loss
        with autocast():
            x_adv = pgd(model, x, y, loss=loss_kind, start=start, **attack)
    model.train()
    with autocast():
        loss, logits = LOSSES[method.name](method, model, x, x_adv, y, idx, soft_labels, epoch)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        grad_norm = global_grad_norm(model)
        optimizer.step()
    else:  # fp16: scaled backward; GradScaler skips the update on overflow (it reads one flag back per step)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = global_grad_norm(model)
        scaler.step(optimizer)
        scaler.update()
    robust_correct = (logits.detach().argmax(1) == y).sum()
    meter.add(loss, robust_correct, clean_correct, grad_norm, x.shape[0])


def make_sgd(params, *, lr, momentum, weight_decay, nesterov=False, device=None, graphed=False):
    """torch SGD; graphed=True holds the learning rate in a device tensor and uses the fused update, which
    reads it on the device: a CUDA graph replays whatever the tensor holds (set_lr fills it in place), while
    a float learning rate would be frozen into the captured kernels."""
    if graphed:
        return torch.optim.SGD(params, lr=torch.tensor(float(lr), device=device), momentum=momentum,
                               weight_decay=weight_decay, nesterov=nesterov, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def set_lr(optimizer, lr):
    """Set every group's learning rate; a tensor learning rate is filled in place (captured graphs hold it)."""
    for group in optimizer.param_groups:
        if isinstance(group['lr'], torch.Tensor):
            group['lr'].fill_(lr)
        else:
            group['lr'] = lr


class FastStep:
    """train_step with the speed-ups of training.engine=fast, each switchable for benchmarks: channels-last
    memory format, autocast at `precision`, torch.compile of the model, and (cuda_graphs, on a GPU) the whole
    step captured as CUDA graphs and replayed (engine.graphs.GraphedStep). `net` is the model to evaluate
    with, too. With cuda_graphs the optimizer must come from make_sgd(..., graphed=True)."""

    def __init__(self, model, device, *, precision='auto', channels_last=True, compile=True, cuda_graphs=False):
        self.device, self.precision = device, resolve_precision(precision, device)
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if device.type == 'cuda':  # fixed batch shapes: cuDNN's autotuner measures each convolution once
            torch.backends.cudnn.benchmark = True
        self.net = torch.compile(model) if compile else model
        dtype = AUTOCAST.get(self.precision)
        self.graphed = None
        if cuda_graphs and device.type == 'cuda':
            if dtype is torch.float16:
                raise ConfigError('training.cuda_graphs needs precision bf16 or fp32: fp16 loss scaling reads '
                                  'an overflow flag back to the host every step')
            from engine.graphs import GraphedStep
            self.graphed = GraphedStep(self._step)
        # autocast's weight-cast cache is off under graphs: a cast cached at capture would never be refreshed.
        cache = self.graphed is None
        self.autocast = ((lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=cache)) if dtype
                         else contextlib.nullcontext)
        self.scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None

    def attack_kwargs(self, attack):
        return dict(attack, loss_scale=FP16_ATTACK_LOSS_SCALE) if self.scaler is not None else attack

    def _step(self, optimizer, x, y, idx, *, attack, **kw):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        train_step(self.net, optimizer, x, y, idx, attack=self.attack_kwargs(attack), autocast=self.autocast,
                   scaler=self.scaler, **kw)

    def __call__(self, optimizer, x, y, idx, **kw):
        (self.graphed or self._step)(optimizer, x, y, idx, **kw)
