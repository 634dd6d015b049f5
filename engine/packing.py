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

packed_train_step is engine.step.train_step for each seed on its own batch, with each seed's attack noise drawn
from its own RNG stream; engine.methods' loss functions run unchanged, once per seed, on slices of shared packed
forwards (see _LockstepForwards).
"""
import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

# The single-seed PGD's own random start, objective and BN-mode handling, so the packed attack cannot drift from
# it; only the random start differs (one draw per seed from that seed's stream), which engine.attacks.pgd does
# not take from its caller.
from engine.attacks import _attack_loss, _bn_context, _random_start
from engine.methods import LOSSES
from engine.models import Normalize
from engine.precision import upcast

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


def rng_state(device):
    """The state of the default generator that draws random tensors on `device` (the stream train_step's attack
    draws from). Take it per seed after that seed's torch.manual_seed and model construction."""
    return _default_generator(torch.device(device)).get_state()


@contextlib.contextmanager
def seed_stream(rng_states, k, device):
    """Draw from seed k's stream in the body: its state goes into the default generator, and afterwards the
    advanced state back into rng_states[k]; the outer stream is left as it was."""
    generator = _default_generator(device)
    outer = generator.get_state()
    generator.set_state(rng_states[k])
    try:
        yield
    finally:
        rng_states[k] = generator.get_state()
        generator.set_state(outer)


def packed_pgd(packed, xs, ys, *, eps, step_size, steps, loss='ce', start='uniform', bn_mode='eval', rng_states):
    """engine.attacks.pgd for each seed on its own batch (xs [K, B, C, H, W], ys [K, B]) -> packed x_adv
    [B, K*C, H, W]. Seed k's random start comes from rng_states[k] (advanced in place). The objective is the sum
    over seeds of each seed's summed attack loss; seeds share nothing, so each seed's input gradient is its own."""
    k, b = ys.shape
    x = pack_inputs(xs)
    flat_y = ys.t().reshape(b * k)  # row b*K + k of the flattened packed logits is seed k's image b
    with _bn_context(packed, bn_mode):
        p_clean = None
        if loss == 'kl':  # before the start, as pgd: with bn_mode 'train' this forward moves the BN statistics
            with torch.no_grad():
                p_clean = F.softmax(upcast(packed(x)), dim=2).reshape(b * k, -1)
        starts = []
        for seed in range(k):
            with seed_stream(rng_states, seed, xs.device):
                starts.append(_random_start(xs[seed], eps, start))
        x_adv = pack_inputs(torch.stack(starts))
        lower, upper = x - eps, x + eps
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                objective = _attack_loss(packed(x_adv).reshape(b * k, -1), flat_y, loss, p_clean)
            (grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, lower), upper).clamp(0, 1)
    return x_adv.detach()


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


def packed_train_step(packed, optimizer, xs, ys, idxs, *, method, attack, soft_labels, epoch, meters, rng_states):
    """engine.step.train_step (eager, fp32) for K seeds at once: xs [K, B, C, H, W], ys and idxs [K, B], seed k's
    soft-label table soft_labels[k] (or soft_labels None for methods without one), its meter meters[k] and its
    attack RNG state rng_states[k] (see rng_state; advanced in place). `optimizer` is over packed.parameters():
    SGD's update is elementwise, so one SGD is K independent ones with the same hyperparameters."""
    k = packed.num_seeds
    x = pack_inputs(xs)
    with torch.no_grad():  # train clean accuracy in eval mode, as train_step
        packed.eval()
        clean_correct = (packed(x).argmax(2) == ys.t()).sum(0)
    inputs = {'clean': (x, list(xs))}
    if method.name != 'ce':
        loss_kind, start = method.attack_loss
        x_adv = packed_pgd(packed, xs, ys, loss=loss_kind, start=start, rng_states=rng_states, **attack)
        inputs['adv'] = (x_adv, list(unpack_inputs(x_adv, k)))
    packed.train()
    forwards = _LockstepForwards(packed, inputs)
    tables = soft_labels if soft_labels is not None else [None] * k
    losses, logits = zip(*(
        LOSSES[method.name](method, forwards.seed_model(s), inputs['clean'][1][s],
                            inputs['adv'][1][s] if 'adv' in inputs else None, ys[s], idxs[s], tables[s], epoch)
        for s in range(k)))
    optimizer.zero_grad(set_to_none=True)
    torch.stack(losses).sum().backward()  # d(sum)/d(loss_k) = 1: each seed's gradients are its own
    grad_norms = per_seed_grad_norms(packed)
    optimizer.step()
    for s in range(k):
        robust_correct = (logits[s].detach().argmax(1) == ys[s]).sum()
        meters[s].add(losses[s], robust_correct, clean_correct[s], grad_norms[s], xs.shape[1])
