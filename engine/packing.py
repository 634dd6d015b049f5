"""Packed seeds: K models of one architecture trained in one process as ONE wide network.

Small models leave a large GPU idle. Packing K seeds turns every Conv2d(cin, cout, groups=g) into
Conv2d(K*cin, K*cout, groups=K*g), every BatchNorm of c channels into one of K*c and every Linear into a batched
per-seed product, so one launch does K seeds' work. Seeds share no weight and no activation: seed k owns the
channel block k*C..(k+1)*C of every feature map, and each seed computes what it would alone, up to the order of
floating-point sums inside the kernels.

Layout conventions (what makes the rest generic):
- Packed input x is [B, K*C, H, W] (seed k's images in channels k*C..(k+1)*C); output logits are [B, K, classes].
- Every packed parameter and buffer is the K single-seed tensors concatenated along dim 0, under the single
  model's key, so a state dict packs by torch.cat and unpacks by chunk. The one exception is BatchNorm's 0-dim
  num_batches_tracked, which advances in lockstep and so is one count shared by all seeds.
- Between layers every activation keeps seed-major channel blocks, also after a flatten: flattening
  [B, K*C, h, w] gives [B, K*C*h*w] whose seed blocks each hold that seed's C*h*w values in the single model's
  order, which is why PackedLinear can view any 2-D input as [B, K, features]. Residual adds, ReLU, pooling and
  BatchNorm act per channel and need no change.

The step is engine.step.train_step itself, with PackedSeeds as its view of the seeds: each seed's batch packed
into one input, each seed's PGD start drawn from its own RNG stream, the methods' losses run unchanged, once per
seed, on slices of shared packed forwards (see _LockstepForwards), and each seed's own gradient norm.
"""
import contextlib
import copy
import dataclasses

import torch
import torch.nn as nn

from engine.attacks import random_start
from engine.models import Normalize

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class PackedLinear(nn.Module):
    """K independent Linear(i, o) layers: [B, K*i] -> [B, K*o]. Weight [K*o, i] and bias [K*o] are the seeds'
    weights and biases concatenated, as every packed tensor."""

    def __init__(self, num_seeds, in_features, out_features, bias, device=None, dtype=None):
        super().__init__()
        self.num_seeds, self.in_features, self.out_features = num_seeds, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_seeds * out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_seeds * out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x):
        k, o = self.num_seeds, self.out_features
        per_seed = x.reshape(x.shape[0], k, self.in_features).transpose(0, 1)  # [K, B, i]
        weight_t = self.weight.view(k, o, self.in_features).transpose(1, 2)    # [K, i, o]
        out = (torch.bmm(per_seed, weight_t) if self.bias is None
               else torch.baddbmm(self.bias.view(k, 1, o), per_seed, weight_t))  # [K, B, o]
        return out.transpose(0, 1).reshape(x.shape[0], k * o)


class PackedNormalize(nn.Module):
    """engine.models.Normalize for K seeds: mean and std are [K, C, 1, 1] (the seeds' [1, C, 1, 1] buffers
    concatenated) and broadcast over the packed channels."""

    def __init__(self, num_seeds, channels, device=None, dtype=None):
        super().__init__()
        self.register_buffer('mean', torch.zeros(num_seeds, channels, 1, 1, device=device, dtype=dtype))
        self.register_buffer('std', torch.ones(num_seeds, channels, 1, 1, device=device, dtype=dtype))

    def forward(self, x):
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


class PackedModel(nn.Module):
    """K seeds as one module: x [B, K*C, H, W] -> logits [B, K, classes]. `net` is the packed copy of the single
    architecture; its state-dict keys are the single model's."""

    def __init__(self, net, num_seeds):
        super().__init__()
        self.net, self.num_seeds = net, num_seeds

    def forward(self, x):
        out = self.net(x)
        return out.reshape(out.shape[0], self.num_seeds, -1)


def _placement(layer):
    """device and dtype of a layer's floating-point tensors, for its packed replacement."""
    some = next((t for t in layer.state_dict().values() if t.is_floating_point()), None)
    return {} if some is None else {'device': some.device, 'dtype': some.dtype}


def _packed_layer(layers):
    """The packed replacement (shapes only; pack_state fills in the values) of K equal layers, or None for a
    layer that needs none."""
    k, layer = len(layers), layers[0]
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(k * layer.in_channels, k * layer.out_channels, layer.kernel_size, stride=layer.stride,
                         padding=layer.padding, dilation=layer.dilation, groups=k * layer.groups,
                         bias=layer.bias is not None, padding_mode=layer.padding_mode, **_placement(layer))
    if isinstance(layer, _BATCH_NORMS):
        # Per-channel statistics, so seed k's channels get exactly its own batch statistics.
        return type(layer)(k * layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                           track_running_stats=layer.track_running_stats, **_placement(layer))
    if isinstance(layer, nn.Linear):
        return PackedLinear(k, layer.in_features, layer.out_features, layer.bias is not None, **_placement(layer))
    if isinstance(layer, Normalize):
        return PackedNormalize(k, layer.mean.shape[1], **_placement(layer))
    return None


def _check_packable(name, module):
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
        # One mask draw would cover all seeds: no seed would see the numbers its single run draws.
        raise ValueError(f'cannot pack {name or "the model"}: random layer {type(module).__name__}(p={module.p})')
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise ValueError(f'cannot pack {name or "the model"}: {type(module).__name__} holds weights and is not '
                         'one of Conv2d, BatchNorm1d/2d, Linear, Normalize')


def pack_models(models):
    """K models of one architecture (engine.models, optionally inside the normalize wrapper) -> PackedModel.
    The packed model starts in models[0]'s train/eval modes, on its device."""
    if not models:
        raise ValueError('pack_models needs at least one model')
    shapes = {key: t.shape for key, t in models[0].state_dict().items()}
    kinds = [(name, type(m)) for name, m in models[0].named_modules()]
    for model in models[1:]:
        if ({key: t.shape for key, t in model.state_dict().items()} != shapes
                or [(name, type(m)) for name, m in model.named_modules()] != kinds):
            raise ValueError('pack_models needs models of one architecture (same layers and shapes)')
    net = copy.deepcopy(models[0])
    modules_of_seed = [dict(m.named_modules()) for m in models]
    for name, module in list(net.named_modules()):
        replacement = _packed_layer([modules[name] for modules in modules_of_seed])
        if replacement is None:
            _check_packable(name, module)
        else:
            replacement.train(module.training)
            net.set_submodule(name, replacement)
    packed = PackedModel(net, len(models))
    pack_state(packed, [m.state_dict() for m in models])
    return packed


def _cat_seeds(tensors, what):
    if tensors[0].dim() == 0:  # num_batches_tracked (or an optimizer's step count): one value for all seeds
        if any(not torch.equal(t, tensors[0]) for t in tensors):
            raise ValueError(f'{what} differs between seeds; packed seeds must advance in lockstep')
        return tensors[0].clone()
    return torch.cat(tensors)


def _split_seeds(tensor, num_seeds):
    if tensor.dim() == 0:
        return [tensor.clone() for _ in range(num_seeds)]
    return [chunk.clone() for chunk in tensor.chunk(num_seeds)]


def pack_state(packed, states):
    """Load K single-seed model state dicts (seed order) into `packed`."""
    if len(states) != packed.num_seeds:
        raise ValueError(f'{len(states)} states for {packed.num_seeds} packed seeds')
    packed.net.load_state_dict({key: _cat_seeds([s[key] for s in states], key) for key in states[0]})


def unpack_state(packed):
    """The K single-seed model state dicts (independent copies), each loadable into the single architecture."""
    per_key = {key: _split_seeds(t, packed.num_seeds) for key, t in packed.net.state_dict().items()}
    return [{key: seeds[k] for key, seeds in per_key.items()} for k in range(packed.num_seeds)]


def pack_optimizer_state(states):
    """K single-seed optimizer state dicts (same hyperparameters) -> one for an optimizer over packed.parameters():
    parameter order is the same, since the packed model keeps the single model's parameter names."""
    groups = [[{key: v for key, v in g.items() if key != 'params'} for g in s['param_groups']] for s in states]
    if any(g != groups[0] for g in groups):
        raise ValueError('packed seeds need one optimizer configuration (lr, momentum, weight decay, ...)')
    return {'state': {i: {name: _cat_seeds([s['state'][i][name] for s in states], f'optimizer state {name}')
                          for name in slot} for i, slot in states[0]['state'].items()},
            'param_groups': copy.deepcopy(states[0]['param_groups'])}


def unpack_optimizer_state(state, num_seeds):
    """A packed optimizer's state dict -> K single-seed ones (SGD's update is elementwise, so seed k's slice of
    every buffer is exactly its own optimizer's)."""
    split = {i: {name: _split_seeds(v, num_seeds) for name, v in slot.items()} for i, slot in state['state'].items()}
    return [{'state': {i: {name: seeds[k] for name, seeds in slot.items()} for i, slot in split.items()},
             'param_groups': copy.deepcopy(state['param_groups'])} for k in range(num_seeds)]


def pack_inputs(xs):
    """[K, B, C, H, W] -> [B, K*C, H, W] (a copy)."""
    k, b, c, h, w = xs.shape
    return xs.transpose(0, 1).reshape(b, k * c, h, w)


def unpack_inputs(x, num_seeds):
    """[B, K*C, H, W] -> [K, B, C, H, W] (a view)."""
    b, kc, h, w = x.shape
    return x.view(b, num_seeds, kc // num_seeds, h, w).transpose(0, 1)


def _default_generator(device):
    if device.type == 'cuda':
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def seed_generator(device):
    """A generator on `device` holding the state of the default generator there (the stream train_step's attack
    draws from alone). Take it per seed after that seed's torch.manual_seed and model construction: it is then
    that seed's stream, drawn from by its PGD starts (PackedSeeds) and swapped in for the rest (seed_stream)."""
    device = torch.device(device)
    generator = torch.Generator(device)
    generator.set_state(_default_generator(device).get_state())
    return generator


@contextlib.contextmanager
def seed_stream(generators, k, device):
    """Draw from seed k's stream in the body (its evaluation noise, its checkpoint's RNG state): its state goes
    into the default generator, and afterwards the advanced state back into generators[k]; the outer stream is
    left as it was."""
    default = _default_generator(torch.device(device))
    outer = default.get_state()
    default.set_state(generators[k].get_state())
    try:
        yield
    finally:
        generators[k].set_state(default.get_state())
        default.set_state(outer)


class _LockstepForwards:
    """Lets engine.methods' loss functions, run once per seed, share packed forward passes.

    Each loss calls its model on its batch x or its adversarial batch x_adv only, in an order set by the method
    and epoch alone, so every seed makes the same sequence of calls. Seed 0's i-th call runs the packed model on
    the packed tensor of the same role (in the grad mode of that call); seed k's i-th call returns its slice of
    that result. The seeds' losses then hang off one graph, and BN statistics move once per call, as alone."""

    def __init__(self, packed, inputs):
        self.packed, self.inputs = packed, inputs  # role -> (packed tensor, per-seed views handed to the losses)
        self.results = []  # (role, packed logits) of each call, in call order
        self.calls = [0] * packed.num_seeds

    def seed_model(self, k):
        return lambda x: self._forward(k, x)

    def _forward(self, k, x):
        role = next((r for r, (_, views) in self.inputs.items() if views[k] is x), None)
        if role is None:
            raise RuntimeError('a packed loss called the model on a tensor other than its batch or adversarial batch')
        i, self.calls[k] = self.calls[k], self.calls[k] + 1
        if k == 0:
            self.results.append((role, self.packed(self.inputs[role][0])))
        if i >= len(self.results) or self.results[i][0] != role:
            raise RuntimeError(f'seed {k} called the model differently from seed 0; seeds must run in lockstep')
        return self.results[i][1][:, k]


def per_seed_grad_norms(packed):
    """[K]: each seed's global gradient norm (as engine.step.global_grad_norm), from its slices of the grads."""
    grads = [p.grad.reshape(packed.num_seeds, -1) for p in packed.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dim=1) for g in grads]), dim=0)


class PackedSeeds:
    """engine.step.train_step's view of K packed seeds (its `seeds` argument). The batch is seed-major: x
    [K, B, C, H, W], y and idx [K, B], soft labels a list of K tables (or None); the network takes x packed,
    [B, K*C, H, W], and gives logits [B, K, classes], so labels are arranged [B, K]. Seed k's PGD start is drawn
    from generators[k] (see seed_generator): an explicit generator, not a swap of the default generator's state,
    so a CUDA graph can capture the draws (engine.cuda_graphs registers the generators). The optimizer is one SGD
    over packed.parameters(): SGD's update is elementwise, so it is K independent ones with the same
    hyperparameters."""

    def __init__(self, num_seeds, generators):
        self.k, self.generators = num_seeds, generators

    def inputs(self, xs):
        return pack_inputs(xs)

    def labels(self, ys):
        return ys.t()

    def start(self, kind):
        def each_seeds_own(x, eps):
            starts = []
            for k, x_k in enumerate(unpack_inputs(x, self.k)):
                starts.append(random_start(x_k, eps, kind, generator=self.generators[k]))
            return torch.empty_like(x).copy_(pack_inputs(torch.stack(starts)))  # in x's memory format
        return each_seeds_own

    def losses(self, method, packed, batch):
        """[K] losses and [B, K, classes] robust logits: method.loss once per seed, on that seed's views of the
        packed batch and adversarial batch, their forwards shared in lockstep."""
        packed_inputs = {role: x for role, x in (('clean', batch.x), ('adv', batch.x_adv)) if x is not None}
        views = {role: list(unpack_inputs(x, self.k)) for role, x in packed_inputs.items()}
        forwards = _LockstepForwards(packed, {role: (packed_inputs[role], views[role]) for role in views})
        tables = batch.soft_labels or [None] * self.k
        losses, logits = zip(*(
            method.loss(forwards.seed_model(k), dataclasses.replace(
                batch, x=views['clean'][k], x_adv=views['adv'][k] if 'adv' in views else None, y=batch.y[k],
                idx=batch.idx[k], soft_labels=tables[k],
                clean_eval=None if batch.clean_eval is None else batch.clean_eval[:, k]))
            for k in range(self.k)))
        return torch.stack(losses), torch.stack(logits, dim=1)

    def grad_norms(self, packed):
        return per_seed_grad_norms(packed)
