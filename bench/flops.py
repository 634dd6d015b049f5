"""The FLOP model of the benchmarks: work credited to a training step and work it really executes.

    python bench/flops.py [--arch resnet18] [--width 0] [--image-size 32] [--batch 2] [--pgd-steps 10]
                          [--out counted.json]

F = forward FLOP of one image (torch.utils.flop_counter.FlopCounterMode, batch 1, 2 FLOP per multiply-add;
convolutions and matmuls only: BatchNorm, ReLU, pooling and losses are not counted by it and are noise here).

- Credited (useful) work, the same for every row of a method: F x (2K + 3) for PGD-K AT, F x (2K + 4) for SGLS
  (model_flop_per_image): each attack step a forward and an input-gradient backward, the update a forward and a
  full backward, SGLS one more clean forward. This is the "MFU" column, 23F / 24F for PGD-10.
- Executed work (executed_flop_per_image), what the row's step runs: each attack step 2F when its backward
  computes the input gradient only (eager autograd prunes the weight gradients; compiled paths since
  engine.attacks.input_gradient_only, issue 12 item 1), 3F when it also computes every weight gradient (a compiled
  attack backward before item 1, the bench row '+cuda_graphs (attack weight grads)'); + F for the engine's no-grad
  clean-accuracy forward (not with clean_acc=False, not in the official loop); + 3F for the update's forward and
  backward, less the first layer's input gradient (C1 = its forward FLOP), which autograd never computes because
  the images do not require grad; + F for SGLS's clean forward. PGD-10 AT: 24F - C1 eager, 34F - C1 with attack
  weight gradients (the issue's "about 34 forward-equivalents").
Run as a script, it counts the executed FLOP of one real step per ladder variant on the CPU (float32, eager for
the eager rows; for the compiled rows torch.compile with a counting AOT-autograd backend, which runs the very
forward and backward graphs inductor is given under FlopCounterMode) and prints them next to the formula.
tests/test_bench.py checks the formula against those counts on a tiny model.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
import time

if __name__ == '__main__':
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see bench/train_step.py

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import engine.attacks  # noqa: E402
from engine.models import build_model  # noqa: E402

CLASSES = 10
EPS, STEP_SIZE = 8 / 255, 2 / 255
FLOP_FORMULA = ('credited FLOP per training image = F x (2K + 3) for AT, F x (2K + 4) for SGLS, where F = forward '
                'FLOP of one image (torch.utils.flop_counter.FlopCounterMode, batch 1, 2 FLOP per multiply-add) '
                'and K = PGD steps: each attack step is a forward and an input-gradient backward (~2F, no weight '
                'gradients), the update a forward and a full backward (~3F), and SGLS adds one clean forward (F). '
                "Not counted: the engine's no-grad clean-accuracy forward (F; the reference has none), so every "
                'row of a method is credited with the same useful work.')
EXECUTED_FORMULA = ('executed FLOP per training image = F x (a K + c + 3 + s) - C1: a = 2 when the attack backward '
                    'computes the input gradient only, 3 when it also computes every weight gradient (row '
                    "'+cuda_graphs (attack weight grads)'); c = 1 for the engine's clean-accuracy forward (0 for "
                    'the reference and with clean_acc=False); s = 1 for SGLS; C1 = the first layer\'s forward '
                    'FLOP, whose input gradient the update never computes (bench/flops.py; checked against '
                    'FlopCounterMode over real steps in tests/test_bench.py).')


def model_flop_per_image(forward_flop, method, pgd_steps):
    """Credited work per training image (see the module docstring)."""
    return forward_flop * (2 * pgd_steps + 3 + (method == 'sgls'))


def executed_flop_per_image(forward_flop, first_layer_flop, method, pgd_steps, *, attack_weight_grads=False,
                            clean_acc=True):
    """Executed work per training image (see the module docstring)."""
    attack_step = 3 if attack_weight_grads else 2
    return forward_flop * (attack_step * pgd_steps + int(clean_acc) + 3 + (method == 'sgls')) - first_layer_flop


class TotalsOnly:
    """Stands in for FlopCounterMode's per-module attribution (its ModuleTracker), which hooks the inputs of every
    module and so makes torch.autograd.grad on a leaf input, PGD's x_adv, fail with "A leaf node was passed to
    _will_engine_execute_node but we are currently running autograd.grad()" (pytorch/pytorch#131753, torch 2.4 to
    at least 2.14). The totals never use it: every count is filed under 'Global'."""
    parents = {'Global'}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def counter(totals_only=True):
    """FlopCounterMode; totals_only (needed where PGD's autograd.grad runs) swaps out its module tracker, a private
    attribute: plain forwards (forward_and_first_layer_flop, which the GPU benches call) do without it."""
    mode = FlopCounterMode(display=False)
    if totals_only:
        mode.mod_tracker = TotalsOnly()
    return mode


def per_op(mode):
    return {str(op).removeprefix('aten.'): n for op, n in mode.get_flop_counts().get('Global', {}).items()}


def forward_and_first_layer_flop(arch, width, image_size):
    """(F, C1): FLOP of one forward of one image, and of the first Conv2d / Linear the image meets."""
    model = build_model(arch, CLASSES, width=width).eval()
    first = []
    hooks = [m.register_forward_pre_hook(lambda m, args: first.append((m, args[0])) if not first else None)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with counter(totals_only=False) as total, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    layer, x = first[0]
    with counter(totals_only=False) as one, torch.no_grad():
        layer(x)
    return total.get_total_flops(), one.get_total_flops()


def forward_flop(arch, width, image_size):
    """F: FLOP of one forward pass of one image (convolutions and matmuls; BN, ReLU and pooling are noise)."""
    return forward_and_first_layer_flop(arch, width, image_size)[0]


@contextlib.contextmanager
def attack_weight_grads(enabled=True):
    """The attack as before issue 12 item 1: engine.attacks.pgd runs with the parameters requiring grad (its
    input_gradient_only replaced by a no-op), so a compiled attack backward computes every weight gradient, as
    the step measured on the H100 on 2026-11-25 did. Eager autograd prunes them either way. Restored on exit."""
    saved = engine.attacks.input_gradient_only
    if enabled:
        engine.attacks.input_gradient_only = lambda model: contextlib.nullcontext()
    try:
        yield
    finally:
        engine.attacks.input_gradient_only = saved


def counting_backend(totals):
    """A torch.compile backend: AOT autograd with forward and backward graphs run as traced (aot_eager), each call
    under FlopCounterMode, its per-op FLOP added into `totals`. An outer FlopCounterMode cannot count a compiled
    model: dynamo runs the frame eagerly under an active dispatch mode, which prunes what the graph would not."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, _):
        run_graph = make_boxed_func(gm.forward)

        def run(args):
            with counter() as mode:
                out = run_graph(args)
            for op, n in per_op(mode).items():
                totals[op] = totals.get(op, 0) + n
            return out
        run._boxed_call = True
        return run
    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


class EagerCounted(nn.Module):
    """A model run uncompiled next to compiled graphs (FastStep's attack_model under fused_attack, whose clean-
    accuracy forward runs eagerly): counted by FlopCounterMode when called eagerly, traced as it is when dynamo
    compiles a graph that calls it (the counting backend counts that graph)."""

    def __init__(self, inner, totals):
        super().__init__()
        self.inner, self.totals = inner, totals

    def forward(self, x):
        if torch.compiler.is_compiling():
            return self.inner(x)
        with counter() as mode:
            out = self.inner(x)
        for op, n in per_op(mode).items():
            self.totals[op] = self.totals.get(op, 0) + n
        return out


def fast_step_options():
    """The keyword options of engine.fast.FastStep at this commit (fold_bn, fused_attack, ... when there)."""
    from engine.fast import FastStep
    return set(inspect.signature(FastStep.__init__).parameters)


def accepts_clean_acc():
    from engine.step import train_step
    return 'clean_acc' in inspect.signature(train_step).parameters


def count_step(arch, width, image_size, batch, method_name, pgd_steps, *, compiled=False, attack_wgrad=False,
               clean_acc=True, fast_options=None, warmup=1):
    """{op: FLOP} of one real training step (after `warmup` steps), float32 on the CPU: engine.step.train_step
    eagerly under FlopCounterMode, or engine.fast.FastStep compiled with counting_backend. SGLS with its soft
    labels active."""
    from engine.fast import FastStep
    from engine.methods import METHODS, make_method
    from engine.soft_labels import SoftLabels
    from engine.step import make_sgd, train_step

    torch.manual_seed(0)
    model = build_model(arch, CLASSES, width=width)
    optimizer = make_sgd(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    method = make_method(method_name, **({'sgls_start_epoch': 1} if 'sgls_start_epoch' in METHODS[method_name].params
                                         else {}))
    kw = dict(method=method, epoch=1, soft_labels=SoftLabels(y, CLASSES) if method.soft_labels else None,
              attack=dict(eps=EPS, step_size=STEP_SIZE, steps=pgd_steps, bn_mode='eval'))
    if not clean_acc:
        kw['clean_acc'] = False
    totals = {}
    if compiled:
        torch._dynamo.reset()
        step = FastStep(model, torch.device('cpu'), precision='fp32', channels_last=False, compile=True,
                        backend=counting_backend(totals), **(fast_options or {}))
        eager = getattr(step, 'attack_model', None)
        if isinstance(eager, nn.Module) and not isinstance(eager, torch._dynamo.eval_frame.OptimizedModule):
            step.attack_model = EagerCounted(eager, totals)
    else:
        step = lambda opt, b, **k: train_step(model, opt, b, **k)  # noqa: E731
    batch_ = (x, y, torch.arange(batch))
    with attack_weight_grads(attack_wgrad):
        for _ in range(warmup):
            step(optimizer, batch_, **kw)
        totals.clear()
        if compiled:
            step(optimizer, batch_, **kw)
        else:
            with counter() as mode:
                step(optimizer, batch_, **kw)
            totals.update(per_op(mode))
    if compiled:
        torch._dynamo.reset()
    return totals


def variants():
    """(name, count_step keywords, executed_flop_per_image keywords) of each FLOP-distinct ladder variant that this
    commit's engine supports."""
    rows = [('eager (engine-eager .. +channels_last)', {}, {}),
            ('compiled (+compile, +cuda_graphs)', dict(compiled=True), {}),
            ('compiled, attack weight grads (+cuda_graphs (attack weight grads))',
             dict(compiled=True, attack_wgrad=True), dict(attack_weight_grads=True))]
    options = fast_step_options()
    extra = {key: True for key in ('fold_bn', 'fused_attack') if key in options}
    if extra:
        rows.append((f"compiled, {' + '.join(extra)}", dict(compiled=True, fast_options=extra), {}))
    if accepts_clean_acc():
        rows.append(('compiled, clean_acc=False (-clean_acc)', dict(compiled=True, clean_acc=False,
                                                                   fast_options=extra), dict(clean_acc=False)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='resnet18')
    parser.add_argument('--width', type=int, default=0)
    parser.add_argument('--image-size', type=int, default=32)
    parser.add_argument('--batch', type=int, default=2, help='images per counted step (FLOP are per image)')
    parser.add_argument('--pgd-steps', type=int, default=10)
    parser.add_argument('--methods', default='at,sgls')
    parser.add_argument('--out', default='')
    a = parser.parse_args(argv)
    forward, first = forward_and_first_layer_flop(a.arch, a.width, a.image_size)
    rows = []
    for method in a.methods.split(','):
        for name, count_kw, formula_kw in variants():
            start = time.perf_counter()
            counted = sum(count_step(a.arch, a.width, a.image_size, a.batch, method, a.pgd_steps, **count_kw).values())
            formula = executed_flop_per_image(forward, first, method, a.pgd_steps, **formula_kw)
            rows.append(dict(method=method, variant=name, counted_per_image=counted / a.batch, formula=formula,
                             exact=counted == formula * a.batch,
                             forward_equivalents=counted / a.batch / forward, seconds=time.perf_counter() - start))
            print(f"{method:5s} {name}: counted {counted / a.batch / 1e9:.4f} GFLOP/image "
                  f"({counted / a.batch / forward:.3f} F), formula {formula / 1e9:.4f}", file=sys.stderr, flush=True)
    meta = dict(date=time.strftime('%Y-%m-%d'), torch=torch.__version__, args=vars(a), forward_flop=forward,
                first_layer_flop=first, formula=EXECUTED_FORMULA,
                command=' '.join(['bench/flops.py', *(sys.argv[1:] if argv is None else argv)]))
    result = json.dumps({'meta': meta, 'rows': rows}, indent=2)
    if a.out:
        with open(a.out, 'w') as f:
            f.write(result + '\n')
    lines = [f'{a.arch}, PGD-{a.pgd_steps}, F = {forward / 1e9:.4g} GFLOP, C1 = {first / 1e6:.4g} MFLOP', '',
             '| method | variant | counted GFLOP/image | forward-equivalents | formula GFLOP/image |',
             '|---|---|---:|---:|---:|']
    lines += [f"| {r['method']} | {r['variant']} | {r['counted_per_image'] / 1e9:.4f} | "
              f"{r['forward_equivalents']:.3f} | {r['formula'] / 1e9:.4f} |" for r in rows]
    print('\n'.join(lines))
    return 0 if all(r['exact'] for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
