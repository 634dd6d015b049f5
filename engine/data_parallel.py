"""One run trained by every rank of a torchrun group, each on its slice of each global batch (run.py train
under torchrun; engine.distributed makes the group).

What makes N ranks compute what one process computes on the same global batch (tests/test_distributed.py
checks it in float64):
- data: every rank builds the same loader and takes the rank-th of N equal slices of each global batch
  (engine.data.loaders: shard), so the ranks' batches i together are the one-process batch i, augmentation
  included; training.batch_size stays the global batch.
- attack noise: every rank draws the whole global batch's start noise from the shared seeded stream and keeps its
  slice (ShardedSeed.start), so each image starts where it would in one process and every rank's random stream
  stays the one-process stream (the per-epoch evaluation, run by every rank, then draws the same noise too).
- gradients: the losses are means over the local batch, so the mean of the ranks' gradients is the gradient of
  the mean over the global batch. It is taken by hand, one all-reduce of all gradients (sum / N) after backward
  (ShardedSeed.grad_norms), not by DistributedDataParallel: PGD and the clean-accuracy and SGLS forwards call
  the model many times per step, and DDP's forward hooks and reducer expect one forward per backward. Weights
  and optimizer states then stay bitwise equal on every rank.
- soft labels (SGLS): each rank's updated rows are gathered with their indices and written on every rank
  (engine.soft_labels), so every rank holds the same table.
- epoch statistics: summed over the ranks (the gradient norm, the same on every rank, is kept).
- BatchNorm: per rank by default (each normalizes by its local batch's statistics; rank 0's running statistics
  are copied to every rank at the end of each epoch, so the model evaluated, saved and resumed is one model);
  distributed.sync_bn=true normalizes by the global batch's statistics (SyncBatchNorm here, also on CPUs, where
  torch's own refuses), which is what one process computes.
Rank 0 alone writes the run folder (engine.train.run_state); every rank restores from its last.pt.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

from engine.attacks import NORMAL_START_STD
from engine.errors import ConfigError
from engine.step import SingleSeed, global_grad_norm


def check_data_parallel(cfg, world):
    """ConfigError for what a data-parallel run of `world` ranks cannot train as the config asks."""
    t = cfg.training
    if t.batch_size % world:
        raise ConfigError(f'training.batch_size={t.batch_size} is the global batch, split evenly over the ranks '
                          f'(each takes batch_size / ranks): it does not split over {world} ranks')
    if t.engine == 'fast' and t.precision == 'fp16':
        raise ConfigError("training.precision=fp16 under torchrun: each rank's loss scaler would skip steps on its "
                          'own; use bf16 or fp32')
    if t.engine == 'fast' and t.cuda_graphs and t.device != 'cpu' and torch.cuda.is_available():
        raise ConfigError('training.cuda_graphs under torchrun: a captured step cannot hold the gradient all-reduce '
                          'between the ranks; set --training.cuda_graphs=false')
    if t.engine == 'fast' and t.fold_bn and cfg.distributed.sync_bn:
        raise ConfigError('training.fold_bn with distributed.sync_bn: the folding traces BatchNorm2d modules, '
                          'which SyncBatchNorm is not; turn one of them off')
    if cfg.data.force:
        raise ConfigError('data.force=true under torchrun: every rank would rewrite the betons; convert first '
                          '(python run.py convert ... --data.force=true), then start the ranks')


class DataParallel:
    """This rank's part in the run: the collectives of its step, epoch and soft labels."""

    def __init__(self, group):
        self.group, self.rank, self.world = group, group.rank, group.world
        self.writes = self.rank == 0  # rank 0 alone writes the run folder
        self.seeds = ShardedSeed(self)

    def average_gradients(self, model):
        """Every parameter's gradient replaced by its mean over the ranks (one all-reduce of them all)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(self.world)
        for grad, mean in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(mean)

    def sum_epoch(self, sums, images):
        """An epoch's step statistics ([K, 4], engine.step.STATS) and image count, summed over the ranks; the
        gradient-norm column, already the same on every rank, stays as it is."""
        both = torch.cat([sums[:, :3].flatten(), sums.new_tensor([images])])
        dist.all_reduce(both)
        total = sums.clone()
        total[:, :3] = both[:-1].view(-1, 3)
        return total, int(both[-1].item())

    def share_buffers(self, model):
        """Rank 0's buffers (BatchNorm running statistics) on every rank."""
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)

    def gather_rows(self, idx, rows):
        """Every rank's (indices, rows) of a soft-label update, concatenated in rank order (the global batch's)."""
        out = []
        for local in (idx, rows):
            parts = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(parts, local.contiguous())
            out.append(torch.cat(parts))
        return tuple(out)


class ShardedSeed(SingleSeed):
    """engine.step.train_step's view of one model trained by all ranks (its `seeds` argument): the attack
    starts from this rank's slice of the global batch's noise, and the gradients are averaged over the ranks
    where the step first reads them, for their norm (after backward, before the update)."""

    def __init__(self, parallel):
        self.parallel = parallel

    def start(self, kind):
        if kind == 'none':
            return kind
        rank, world = self.parallel.rank, self.parallel.world

        def this_ranks_slice(x, eps):
            """engine.attacks.random_start of the global batch, drawn as one process draws it; this rank's part."""
            n = x.shape[0]
            noise = torch.empty((n * world, *x.shape[1:]), dtype=x.dtype, device=x.device)
            noise = (noise.uniform_(-eps, eps) if kind == 'uniform' else noise.normal_())[rank * n:(rank + 1) * n]
            return (x + noise).clamp(0, 1) if kind == 'uniform' else x + NORMAL_START_STD * noise
        return this_ranks_slice

    def grad_norms(self, model):
        self.parallel.average_gradients(model)
        return global_grad_norm(model)[None]


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: each rank's addend receives the sum of every rank's upstream gradient,
    so each rank's backward is its part of the gradient of the sum of all ranks' losses."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


@torch.compiler.disable  # a collective: torch.compile runs it as a call, between two compiled graphs
def sum_over_ranks(t):
    return _SumOverRanks.apply(t)


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch (all ranks' slices): mean, then
    the mean squared deviation from it, each one all-reduce; the running statistics move as BatchNorm's do (the
    unbiased variance, the momentum). Eval mode is BatchNorm2d's, with no collective. Works on CPUs and GPUs;
    the state dict is BatchNorm2d's, so its checkpoints load into the plain model."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in float32 at least (autocast)
        xs = x.to(dtype)
        n = xs.numel() // xs.shape[1] * dist.get_world_size()
        mean = sum_over_ranks(xs.sum((0, 2, 3))) / n
        centered = xs - mean.view(1, -1, 1, 1)
        squares = sum_over_ranks((centered * centered).sum((0, 2, 3)))
        var = squares / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * squares.detach() / (n - 1))
        out = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)


def sync_batchnorm(module):
    """module with each BatchNorm2d replaced, in place, by a SyncBatchNorm holding its parameters and buffers
    (before the optimizer is made from the parameters)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            like = next(t for t in (child.weight, child.running_mean, torch.empty(0)) if t is not None)
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats, device=like.device, dtype=like.dtype)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            sync_batchnorm(child)
    return module
