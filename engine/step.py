"""One training step, as the paper's algorithm reads: attack, loss (with the SGLS update), backward, update.

One skeleton for one model or K packed seeds (engine.packing): what differs is the `seeds` view, which says how a
batch becomes the network's input, where PGD starts, how the loss is split into each seed's, and each seed's
gradient norm. The eager step is the reference; engine.fast runs the same function with a compiled model,
channels-last tensors and mixed precision. The step reads nothing back to the host: it returns its statistics
as a device tensor, which the epoch loop sums and reads once per epoch.
"""
import contextlib

import torch

from engine.attacks import eval_mode, pgd
from engine.methods import LossInputs
from engine.precision import upcast

STATS = ('loss x n', 'robust correct', 'clean correct', 'grad norm')  # the columns of a step's statistics
DISABLED_SCALER = torch.amp.GradScaler('cpu', enabled=False)  # fp32 / bf16 / fp64: scale, unscale_, update are no-ops


def global_grad_norm(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class SingleSeed:
    """The step's view of one model: the batch is the network's input; one loss, one gradient norm."""
    k = 1

    def inputs(self, x):
        return x

    def labels(self, y):
        return y

    def start(self, kind):
        return kind

    def losses(self, method, model, batch: LossInputs):
        loss, logits = method.loss(model, batch)
        return loss[None], logits

    def grad_norms(self, model):
        return global_grad_norm(model)[None]


SINGLE = SingleSeed()


def correct(logits, y):
    """[K]: correct predictions per seed; logits [B, C] or [B, K, C], labels y [B] or [B, K]."""
    return (logits.argmax(-1) == y).reshape(y.shape[0], -1).sum(0)


def train_step(model, optimizer, batch, *, method, attack, soft_labels, epoch, seeds=SINGLE,
               autocast=contextlib.nullcontext, scaler=DISABLED_SCALER, attack_model=None, eval_model=None,
               clean_acc=True, teacher=None, ema=None):
    """attack -> loss -> backward -> SGD step on batch = (x, y, idx); returns the step's statistics, a [K, 4]
    float64 device tensor (columns STATS; K = seeds.k, 1 for one model).

    attack: pgd() keyword arguments (norm, eps, step_size, steps, bn_mode; loss_scale for fp16); soft_labels: the run's
    table (a list of K for packed seeds) or None; autocast: a context-manager factory wrapping the forward passes;
    scaler: a GradScaler, enabled for fp16 only. attack_model and eval_model: the models the attack and the
    clean-accuracy forward run (the fast engine's compiled or folded views of `model`; default `model`); the loss
    always trains `model`. clean_acc False skips the clean-accuracy forward (its statistic is then 0; a method
    that uses_clean_eval still gets its logits). teacher: a distilling method's frozen teacher (a callable model in
    eval mode), handed to its attack target and its loss. ema: an
    engine.weight_ema.WeightEMA of `model`, updated after the optimizer step.
    """
    x, y, idx = batch
    net_x, net_y = seeds.inputs(x), seeds.labels(y)
    attack_model = model if attack_model is None else attack_model
    eval_model = model if eval_model is None else eval_model
    clean_correct = torch.zeros(seeds.k, dtype=torch.long, device=y.device)
    clean_logits = None
    if clean_acc or method.uses_clean_eval:
        with torch.no_grad(), autocast(), eval_mode(eval_model):  # the measurement moves no BN statistics
            clean_logits = eval_model(net_x)
        if clean_acc:
            clean_correct = correct(clean_logits, net_y)
    model.train()
    x_adv = None
    if method.attack is not None:
        with autocast():
            x_adv = pgd(attack_model, net_x, net_y, loss=method.attack.loss, start=seeds.start(method.attack.start),
                        p_clean=method.attack_target(teacher, net_x), **attack)
    with autocast():
        losses, logits = seeds.losses(method, model, LossInputs(
            net_x, y, idx, epoch, x_adv, soft_labels, teacher, clean_logits if method.uses_clean_eval else None))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses.sum()).backward()  # d(sum)/d(loss_k) = 1: each packed seed's gradients are its own
    scaler.unscale_(optimizer)
    grad_norms = seeds.grad_norms(model)
    scaler.step(optimizer)  # fp16: skipped on overflow (the scaler reads one flag back per step)
    scaler.update()
    method.after_step(model)
    if ema is not None:
        ema.update()
    loss_x_n = upcast(losses.detach()) * y.shape[-1]  # in the loss's dtype, then summed in float64 by the loop
    return torch.stack([loss_x_n.double(), correct(logits.detach(), net_y).double(), clean_correct.double(),
                        grad_norms.double()], dim=1)


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
