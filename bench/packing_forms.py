"""How to pack K seeds' convolutions: ResNet-18's convolution shapes timed in four forms (issue 12, item 4).

    python bench/packing_forms.py [--device cuda|cpu] [--batch 128] [--ks 2,4,8] [--width 64] [--image-size 32]
                                  [--repeats 5] [--iters 10] [--tiny] [--out forms.json] [--md forms.md]

The shapes are read from engine.models' resnet18 (a forward hook on every Conv2d: the 3x3 stem, the 3x3 convs of
each stage, the strided 3x3 and 1x1 shortcut convs that open stages 2-4), each with how often it occurs in one
forward. For each shape and K, three passes: forward, input gradient (dgrad) and weight gradient (wgrad), the
last two as torch.ops.aten.convolution_backward with output_mask (True, False, False) and (False, True, False),
in bf16 channels-last on CUDA (--tiny: float32 on the CPU), in four forms:
  separate  K convolutions of batch B in turn on one stream (K seeds' layers one after another)
  streams   the same K convolutions, each on its own CUDA stream (CUDA only; n/a on the CPU)
  grouped   one grouped convolution: K*Cin -> K*Cout channels, groups=K, batch B (engine.packing's form)
  dense     one convolution at batch K*B with one seed's weights: the same FLOP as one GEMM, the bound
Timing: CUDA events around --iters calls, median of --repeats, after warm-up calls (cudnn.benchmark on, so each
form gets cuDNN's best algorithm); the CPU uses time.perf_counter. Reported per call (all K seeds), per layer and
summed over the network weighted by each shape's count, for a forward, a dgrad, a wgrad, and one PGD-10 AT step's
convolution work (the attack's 10 forwards + 10 dgrads, the clean-accuracy forward, the update's forward, dgrad
and wgrad: 12 forwards, 11 dgrads, 1 wgrad). --tiny (CPU, width 8, 16x16, batch 2, K 2 and 4) is a smoke test;
it also checks in float64 that the grouped form computes exactly what K separate convolutions compute
(check_grouped), which tests/test_bench.py asserts.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

if __name__ == '__main__':
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see bench/train_step.py

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from bench.machine import cpu_model  # noqa: E402
from engine.models import build_model  # noqa: E402

FORMS = ('separate', 'streams', 'grouped', 'dense')
PASSES = ('forward', 'dgrad', 'wgrad')
STEP_WEIGHTS = {'forward': 12, 'dgrad': 11, 'wgrad': 1}  # one PGD-10 AT step (see the docstring)
PROFILES = {
    'full': dict(device='cuda', batch=128, ks='2,4,8', width=64, image_size=32, repeats=5, iters=10, warmup=3),
    'tiny': dict(device='cpu', batch=2, ks='2,4', width=8, image_size=16, repeats=1, iters=1, warmup=1),
}
Shape = collections.namedtuple('Shape', 'cin cout kernel stride padding size')  # size: input height = width


def resnet18_shapes(width, image_size):
    """{Shape: occurrences in one forward}, in the order the forward meets them."""
    model = build_model('resnet18', 10, width=width).eval()
    shapes = collections.Counter()

    def hook(conv, args):
        shapes[Shape(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                     args[0].shape[-1])] += 1
    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    return dict(shapes)


def out_size(s):
    return (s.size + 2 * s.padding - s.kernel) // s.stride + 1


def conv_flop(s, batch):
    """2 x multiply-adds of one forward of the shape at `batch` (a dgrad or a wgrad costs the same)."""
    return 2 * batch * s.cin * s.cout * s.kernel ** 2 * out_size(s) ** 2


def conv(x, w, s, groups):
    return F.conv2d(x, w, stride=s.stride, padding=s.padding, groups=groups)


def backward(grad, x, w, s, groups, mask):
    return torch.ops.aten.convolution_backward(grad, x, w, None, [s.stride] * 2, [s.padding] * 2, [1, 1], False,
                                               [0, 0], groups, mask)


def pass_fn(which, x, w, grad, s, groups):
    """A call running one pass of one convolution."""
    if which == 'forward':
        return lambda: conv(x, w, s, groups)
    mask = [True, False, False] if which == 'dgrad' else [False, True, False]
    return lambda: backward(grad, x, w, s, groups, mask)


def tensors(s, k, batch, form, dtype, device, memory_format, generator=None):
    """[(x, w, grad of the output, groups)]: K of them for separate / streams, one for grouped / dense."""
    def rand(*shape):
        t = torch.randn(*shape, dtype=dtype, device=device, generator=generator)
        return t.contiguous(memory_format=memory_format) if t.dim() == 4 else t
    o = out_size(s)
    if form in ('separate', 'streams'):
        return [(rand(batch, s.cin, s.size, s.size), rand(s.cout, s.cin, s.kernel, s.kernel),
                 rand(batch, s.cout, o, o), 1) for _ in range(k)]
    if form == 'grouped':
        return [(rand(batch, k * s.cin, s.size, s.size), rand(k * s.cout, s.cin, s.kernel, s.kernel),
                 rand(batch, k * s.cout, o, o), k)]
    return [(rand(k * batch, s.cin, s.size, s.size), rand(s.cout, s.cin, s.kernel, s.kernel),
             rand(k * batch, s.cout, o, o), 1)]


class Timer:
    """Milliseconds per call of fn: median over `repeats` of `iters` calls, after `warmup` calls."""

    def __init__(self, device, repeats, iters, warmup):
        self.device, self.repeats, self.iters, self.warmup = device, repeats, iters, warmup

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.repeats):
            if self.device.type == 'cuda':
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(self.iters):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / self.iters)
            else:
                start = time.perf_counter()
                for _ in range(self.iters):
                    fn()
                samples.append(1000 * (time.perf_counter() - start) / self.iters)
        return statistics.median(samples)


def form_call(form, which, items, s, streams):
    """One call of the form: all K seeds' pass."""
    calls = [pass_fn(which, x, w, g, s, groups) for x, w, g, groups in items]
    if form != 'streams':
        return lambda: [c() for c in calls]
    main = torch.cuda.current_stream()

    def on_streams():
        for c, stream in zip(calls, streams):
            stream.wait_stream(main)  # inputs ready; the events around the call are on the main stream
            with torch.cuda.stream(stream):
                c()
        for stream in streams[:len(calls)]:
            main.wait_stream(stream)
    return on_streams


def check_grouped(k=3, batch=2, width=4, image_size=8, dtype=torch.float64):
    """max |grouped - separate| over forward, dgrad and wgrad, for every ResNet-18 shape at this size, with the
    grouped tensors packed from the K seeds' own (seed-major channel blocks, as engine.packing); and, as a control
    that the comparison sees seed order, the same with the seeds' weights packed in reverse order."""
    g = torch.Generator().manual_seed(0)
    worst, reversed_worst = 0.0, float('inf')
    for s in resnet18_shapes(width, image_size):
        items = tensors(s, k, batch, 'separate', dtype, 'cpu', torch.contiguous_format, g)
        xs, ws, grads = ([item[i] for item in items] for i in range(3))
        x, grad = torch.cat(xs, 1), torch.cat(grads, 1)  # [B, K*C, H, W]: seed k owns channels k*C..(k+1)*C
        diffs, reversed_diffs = [], []
        for w, out in ((torch.cat(ws), diffs), (torch.cat(ws[::-1]), reversed_diffs)):
            y = conv(x, w, s, k)
            (dx, _, _), (_, dw, _) = (backward(grad, x, w, s, k, m) for m in ([True, False, False],
                                                                              [False, True, False]))
            for k_ in range(k):
                sep_dx = backward(grads[k_], xs[k_], ws[k_], s, 1, [True, False, False])[0]
                sep_dw = backward(grads[k_], xs[k_], ws[k_], s, 1, [False, True, False])[1]
                out += [(y.chunk(k, 1)[k_] - conv(xs[k_], ws[k_], s, 1)).abs().max().item(),
                        (dx.chunk(k, 1)[k_] - sep_dx).abs().max().item(),
                        (dw.chunk(k, 0)[k_] - sep_dw).abs().max().item()]
        worst, reversed_worst = max(worst, max(diffs)), min(reversed_worst, max(reversed_diffs))
    return {'k': k, 'dtype': str(dtype), 'max_abs_diff': worst, 'reversed_seed_order_max_abs_diff': reversed_worst}


def markdown(meta, rows, totals):
    a = meta['args']
    lines = [f"Device: {meta['device_name']}; torch {meta['torch']}; {meta['date']}; ResNet-18 (width {a['width']}) "
             f"convolutions at batch {a['batch']} per seed, {a['image_size']}x{a['image_size']} input, {meta['dtype']} "
             f"{meta['memory_format']}; median of {a['repeats']} x {a['iters']} calls.", '',
             '### Whole network (each shape x its count per forward), ms per call for all K seeds', '',
             '| K | form | forward | dgrad | wgrad | PGD-10 AT step (12 fwd + 11 dgrad + 1 wgrad) | x separate '
             '| dense (bound) / form |', '|---:|---|---:|---:|---:|---:|---:|---:|']
    for t in totals:
        lines.append(f"| {t['k']} | {t['form']} | " + ' | '.join(
            '-' if t[p] is None else f'{t[p]:.3f}' for p in (*PASSES, 'step')) + ' | '
            + ' | '.join('-' if t[key] is None else f'{t[key]:.2f}' for key in ('speedup', 'bound_fraction')) + ' |')
    lines += ['', '### Per shape: ms per call (forward / dgrad / wgrad) and TFLOP/s of the three together', '',
              '| shape (Cin->Cout, k, stride, input) | count | K | ' + ' | '.join(FORMS) + ' |',
              '|---|---:|---:|' + '---|' * len(FORMS)]
    by_key = {(r['shape'], r['k'], r['form']): r for r in rows}
    for shape, k in dict.fromkeys((r['shape'], r['k']) for r in rows):
        cells = []
        for form in FORMS:
            r = by_key.get((shape, k, form))
            cells.append('n/a' if r is None or r['forward_ms'] is None else
                         f"{r['forward_ms']:.3f} / {r['dgrad_ms']:.3f} / {r['wgrad_ms']:.3f} ({r['tflops']:.3g})")
        lines.append(f"| {shape} | {by_key[shape, k, 'separate']['count']} | {k} | " + ' | '.join(cells) + ' |')
    if meta.get('check'):
        c = meta['check']
        lines += ['', f"Check (float64, K = {c['k']}): max |grouped - separate| = {c['max_abs_diff']:.3g} over "
                  f"forward, dgrad and wgrad of every shape; with the seeds' weights packed in reverse order "
                  f"{c['reversed_seed_order_max_abs_diff']:.3g} (the comparison sees a wrong packing)."]
    return '\n'.join(lines) + '\n'


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tiny', action='store_true', help='CPU smoke test and float64 check, not a benchmark')
    parser.add_argument('--device', choices=['cpu', 'cuda'])
    parser.add_argument('--batch', type=int, help='images per seed')
    parser.add_argument('--ks', help='comma-separated numbers of seeds')
    parser.add_argument('--width', type=int, help='ResNet-18 base width (64 = the real one)')
    parser.add_argument('--image-size', type=int)
    parser.add_argument('--repeats', type=int)
    parser.add_argument('--iters', type=int, help='calls per timed sample')
    parser.add_argument('--warmup', type=int, help='untimed calls before the samples of each form and pass')
    parser.add_argument('--out', default='', help='write the JSON here')
    parser.add_argument('--md', default='', help='write the Markdown here')
    a = parser.parse_args(argv)
    for key, value in PROFILES['tiny' if a.tiny else 'full'].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.ks = [int(k) for k in a.ks.split(',')]
    if a.device == 'cuda' and not torch.cuda.is_available():
        parser.error('no CUDA device here: pass --device cpu, or --tiny for the CPU smoke test')
    if min(a.ks) < 1 or a.batch < 1 or a.repeats < 1 or a.iters < 1:
        parser.error('--ks, --batch, --repeats and --iters must be >= 1')
    return a


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == 'cuda'
    torch.backends.cudnn.benchmark = True
    dtype, memory_format = torch.bfloat16 if cuda else torch.float32, torch.channels_last  # CPU: no bf16 units
    timer = Timer(device, a.repeats, a.iters, a.warmup)
    shapes = resnet18_shapes(a.width, a.image_size)
    streams = [torch.cuda.Stream(device) for _ in range(max(a.ks))] if cuda else []
    meta = {'date': time.strftime('%Y-%m-%d'), 'device': a.device, 'torch': torch.__version__,
            'device_name': torch.cuda.get_device_name(device) if cuda else cpu_model(), 'cpu': cpu_model(),
            'dtype': str(dtype).removeprefix('torch.'), 'memory_format': 'channels-last', 'args': vars(a),
            'command': ' '.join(['bench/packing_forms.py', *(sys.argv[1:] if argv is None else argv)]),
            'shapes': {f'{s.cin}->{s.cout} {s.kernel}x{s.kernel} s{s.stride} @{s.size}': n for s, n in shapes.items()},
            'check': check_grouped() if a.tiny else None}
    rows = []
    for s, count in shapes.items():
        name = f'{s.cin}->{s.cout} {s.kernel}x{s.kernel} s{s.stride} @{s.size}'
        for k in a.ks:
            print(f'{name} K={k} ...', file=sys.stderr, flush=True)
            for form in FORMS:
                row = dict(shape=name, count=count, k=k, form=form, forward_ms=None, dgrad_ms=None, wgrad_ms=None,
                           tflops=None, note='')
                if form == 'streams' and not cuda:
                    row['note'] = 'CUDA streams exist on CUDA only'
                else:
                    items = tensors(s, k, a.batch, form, dtype, device, memory_format)
                    for which in PASSES:
                        row[f'{which}_ms'] = timer(form_call(form, which, items, s, streams))
                    row['tflops'] = 3 * k * conv_flop(s, a.batch) / (sum(row[f'{p}_ms'] for p in PASSES) * 1e9)
                    del items
                rows.append(row)
    totals = []
    for k in a.ks:
        for form in FORMS:
            mine = [r for r in rows if r['k'] == k and r['form'] == form]
            t = {'k': k, 'form': form}
            for p in PASSES:
                t[p] = None if any(r[f'{p}_ms'] is None for r in mine) else sum(r['count'] * r[f'{p}_ms'] for r in mine)
            t['step'] = None if t['forward'] is None else sum(STEP_WEIGHTS[p] * t[p] for p in PASSES)
            totals.append(t)
        base = {t['form']: t['step'] for t in totals if t['k'] == k}
        for t in totals:
            if t['k'] == k:
                t['speedup'] = base['separate'] / t['step'] if t['step'] else None
                t['bound_fraction'] = base['dense'] / t['step'] if t['step'] else None
    table = markdown(meta, rows, totals)
    if a.out:
        with open(a.out, 'w') as f:
            json.dump({'meta': meta, 'rows': rows, 'totals': totals}, f, indent=2)
    if a.md:
        with open(a.md, 'w') as f:
            f.write(table)
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
