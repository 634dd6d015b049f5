"""One training step, as the paper's algorithm reads: attack, loss (with the SGLS update), backward, update.

The eager step is the reference. The fast step runs the same function with the model compiled, channels-last
tensors and mixed precision; tests check that it computes the same thing. Neither reads a value back to the
host: the epoch's metrics accumulate in a device tensor (EpochMeter) that the trainer reads once per epoch.
"""
import contextlib

import torch

from engine.attacks import pgd
from engine.methods import LOSSES

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
FP16_ATTACK_LOSS_SCALE = 1024.0  # keeps fp16 input gradients from underflowing; PGD only uses their sign


class EpochMeter:
    """Device-side sums of loss, robust-correct, clean-correct and grad-norm; image and step counts on the host."""

    def __init__(self, device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.images = self.steps = 0

    def add(self, loss, robust_correct, clean_correct, grad_norm, n):
        self.sums += torch.stack([loss.detach().float() * n, robust_correct.float(), clean_correct.float(),
                                  grad_norm.float()]).double()
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


def resolve_precision(name, device):
    if name == 'auto':
        return 'bf16' if device.type == 'cuda' else 'fp32'
    return name


class FastStep:
    """train_step with the speed-ups of training.engine=fast, each switchable for benchmarks:
    channels-last memory format, autocast at `precision`, torch.compile of the model (mode 'reduce-overhead',
    i.e. CUDA graphs, when cuda_graphs and on a GPU). `net` is the model to evaluate with, too."""

    def __init__(self, model, device, *, precision='auto', channels_last=True, compile=True, cuda_graphs=True):
        self.device, self.precision = device, resolve_precision(precision, device)
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        mode = 'reduce-overhead' if cuda_graphs and device.type == 'cuda' else None
        self.net = torch.compile(model, mode=mode) if compile else model
        dtype = PRECISIONS[self.precision]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None

    def attack_kwargs(self, attack):
        return dict(attack, loss_scale=FP16_ATTACK_LOSS_SCALE) if self.scaler is not None else attack

    def __call__(self, optimizer, x, y, idx, *, attack, **kw):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        train_step(self.net, optimizer, x, y, idx, attack=self.attack_kwargs(attack), autocast=self.autocast,
                   scaler=self.scaler, **kw)
