"""One training step, as the paper's algorithm reads: attack, loss (with the SGLS update), backward, update.

The eager step is the reference that any faster path must equal. It never reads a value back to the host:
the epoch's metrics accumulate in a device tensor (EpochMeter) that the trainer reads once per epoch.
"""
import torch

from engine.attacks import pgd
from engine.methods import LOSSES


class EpochMeter:
    """Device-side sums of loss, robust-correct, clean-correct and grad-norm; image and step counts on the host."""

    def __init__(self, device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.images = self.steps = 0

    def add(self, loss, robust_correct, clean_correct, grad_norm, n):
        self.sums += torch.stack([loss.detach() * n, robust_correct, clean_correct, grad_norm]).double()
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


def train_step(model, optimizer, x, y, idx, *, method, attack, soft_labels, epoch, meter):
    """attack -> loss -> backward -> SGD step; metrics into `meter`. `attack` is pgd() kwargs."""
    with torch.no_grad():  # train clean accuracy: eval mode, so the measurement itself moves no BN statistics
        model.eval()
        clean_correct = (model(x).argmax(1) == y).sum()
    if method.name == 'ce':
        x_adv = None
    else:
        loss_kind, start = method.attack_loss
        x_adv = pgd(model, x, y, loss=loss_kind, start=start, **attack)
    model.train()
    loss, logits = LOSSES[method.name](method, model, x, x_adv, y, idx, soft_labels, epoch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = global_grad_norm(model)
    optimizer.step()
    robust_correct = (logits.detach().argmax(1) == y).sum()
    meter.add(loss, robust_correct, clean_correct, grad_norm, x.shape[0])
