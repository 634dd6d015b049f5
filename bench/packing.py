"""Packed-seed training throughput: K seeds as one packed model vs the same K seeds trained one after another.

    python bench/packing.py [--device cpu|cuda] [--arch resnet18] [--width W] [--batch 128] [--ks 1,2,4,8]
                            [--method at|sgls] [--steps N] [--warmup N] [--pgd-steps N] [--tiny] [--out results.json]

For each K, in one process on one device, on the same synthetic CIFAR-shaped batches (each seed its own):
  packed   engine.step.train_step with seeds=engine.packing.PackedSeeds on pack_models of K models (K x batch
           images per step)
  singles  engine.step.train_step on each of the same K models in turn, as many steps each (the same total work)
Both are the eager fp32 step (packed seeds train with the eager step, not the compiled bf16 engine.fast.FastStep),
with cudnn.benchmark on for both. Each side runs --warmup untimed steps per model, then --steps timed steps, with
torch.cuda.synchronize before each clock read on CUDA. Throughput is per-seed images/s summed over the K seeds;
speed-up = packed / singles. Prints the Markdown table, and the JSON (to --out if given, else to stdout).
--tiny is a CPU smoke test (width 8, 16x16, batch 32, PGD-2, ks 1,2,4, 1 + 3 steps), not a benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == '__main__':
    # Before torch starts OpenMP: busy-waiting OpenMP threads steal cores from each other on a small shared CPU
    # (see bench/train_step.py); passive waiting changes nothing on a GPU run.
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from bench.loaders import cpu_model  # noqa: E402
from engine.methods import METHODS, make_method  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.packing import PackedSeeds, pack_models, rng_state  # noqa: E402
from engine.soft_labels import SoftLabels  # noqa: E402
from engine.step import train_step  # noqa: E402

CLASSES = 10
EPS, STEP_SIZE = 8 / 255, 2 / 255
PROFILES = {  # what each unset option means; --tiny picks the second
    'full': dict(device='cuda', arch='resnet18', width=0, image_size=32, batch=128, ks='1,2,4,8', steps=20, warmup=3,
                 pgd_steps=10),
    'tiny': dict(device='cpu', arch='resnet18', width=8, image_size=16, batch=32, ks='1,2,4', steps=3, warmup=1,
                 pgd_steps=2),
}


def seeds_setup(a, k, device):
    """K models (seeds 0..K-1, built as engine.train.loop.train_packed does: each seed's stream taken after its
    torch.manual_seed and model construction), data, soft-label tables and streams."""
    models, streams = [], []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model(a.arch, CLASSES, width=a.width).to(device))
        streams.append(rng_state(device))
    g = torch.Generator(device=device).manual_seed(1234)
    xs = torch.rand(k, a.batch, 3, a.image_size, a.image_size, generator=g, device=device)
    ys = torch.randint(0, CLASSES, (k, a.batch), generator=g, device=device)
    idxs = torch.arange(a.batch, device=device).repeat(k, 1)
    soft_labels = [SoftLabels(y, CLASSES) for y in ys] if a.method == 'sgls' else None
    return models, streams, xs, ys, idxs, soft_labels


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def timed(step, warmup, steps, device):
    """Seconds of `steps` calls of step() after `warmup` untimed ones."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start


def summed(total, step):
    """A step() that adds each step's [K, 4] statistics into `total` on the device, as the epoch loop does."""
    def run():
        total.add_(step())
    return run


def run_packed(a, k, device, common):
    models, streams, xs, ys, idxs, soft_labels = seeds_setup(a, k, device)
    packed = pack_models(models)
    optimizer, seeds = sgd(packed.parameters()), PackedSeeds(k, streams)
    total = torch.zeros(k, 4, dtype=torch.float64, device=device)
    return timed(summed(total, lambda: train_step(packed, optimizer, (xs, ys, idxs), soft_labels=soft_labels,
                                                  seeds=seeds, **common)), a.warmup, a.steps, device)


def run_singles(a, k, device, common):
    models, _, xs, ys, idxs, soft_labels = seeds_setup(a, k, device)
    seconds = 0.0
    for s, model in enumerate(models):
        optimizer, total = sgd(model.parameters()), torch.zeros(1, 4, dtype=torch.float64, device=device)
        table = soft_labels[s] if soft_labels else None
        seconds += timed(summed(total, lambda: train_step(model, optimizer, (xs[s], ys[s], idxs[s]),
                                                          soft_labels=table, **common)), a.warmup, a.steps, device)
    return seconds


def markdown(meta, rows):
    a = meta['args']
    lines = [f"Device: {meta['device_name']}; torch {meta['torch']}; {meta['date']}; {a['arch']} (width "
             f"{a['width'] or 'default'}), {a['image_size']}x{a['image_size']}, batch {a['batch']} per seed, "
             f"{a['method']} PGD-{a['pgd_steps']}, eager fp32; {a['warmup']} warm-up + {a['steps']} timed steps "
             'per model.', '',
             '| K | packed images/s (all seeds) | packed ms/step | K singles in turn images/s | speed-up |'
             + (' packed peak MiB |' if meta['device'] == 'cuda' else ''),
             '|---:|---:|---:|---:|---:|' + ('---:|' if meta['device'] == 'cuda' else '')]
    for r in rows:
        lines.append(f"| {r['k']} | {r['packed_images_per_s']:,.0f} | {r['packed_ms_per_step']:.1f} | "
                     f"{r['singles_images_per_s']:,.0f} | {r['speedup']:.2f} |"
                     + (f" {r['packed_peak_mem_mib']:,.0f} |" if meta['device'] == 'cuda' else ''))
    return '\n'.join(lines) + '\n'


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tiny', action='store_true', help='CPU smoke test, not a benchmark')
    parser.add_argument('--device', choices=['cpu', 'cuda'])
    parser.add_argument('--arch', choices=['resnet18', 'preact_resnet18', 'wrn34_10', 'small_cnn'])
    parser.add_argument('--width', type=int, help='model width (0 = the arch default)')
    parser.add_argument('--image-size', type=int, help='side of the synthetic square images')
    parser.add_argument('--batch', type=int, help='images per step per seed')
    parser.add_argument('--ks', help='comma-separated numbers of packed seeds')
    parser.add_argument('--method', default='at', choices=['at', 'sgls'], help='sgls: soft labels active')
    parser.add_argument('--steps', type=int, help='timed steps per model')
    parser.add_argument('--warmup', type=int, help='untimed steps per model before them')
    parser.add_argument('--pgd-steps', type=int, help='training attack steps')
    parser.add_argument('--out', default='', help='write the JSON here instead of stdout')
    a = parser.parse_args(argv)
    for key, value in PROFILES['tiny' if a.tiny else 'full'].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.ks = [int(k) for k in a.ks.split(',')]
    if a.device == 'cuda' and not torch.cuda.is_available():
        parser.error('no CUDA device here: pass --device cpu, or --tiny for the CPU smoke test')
    if a.steps < 1 or a.warmup < 0 or min(a.ks) < 1:
        parser.error('--steps and every K must be >= 1, --warmup >= 0')
    return a


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = True  # both sides: grouped and plain convolutions each get their best kernel
    sgls_on = {'sgls_start_epoch': 1} if 'sgls_start_epoch' in METHODS[a.method].params else {}  # soft labels on
    common = dict(method=make_method(a.method, **sgls_on), epoch=1,
                  attack=dict(eps=EPS, step_size=STEP_SIZE, steps=a.pgd_steps, bn_mode='eval'))
    meta = {'date': time.strftime('%Y-%m-%d'), 'device': a.device,
            'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_model(),
            'torch': torch.__version__, 'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY'),
            'command': ' '.join(['bench/packing.py', *(sys.argv[1:] if argv is None else argv)]), 'args': vars(a)}
    rows = []
    for k in a.ks:
        print(f'K={k} ...', file=sys.stderr, flush=True)
        images = k * a.batch * a.steps
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        packed_s = run_packed(a, k, device, common)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == 'cuda' else None
        singles_s = run_singles(a, k, device, common)
        rows.append({'k': k, 'packed_images_per_s': images / packed_s, 'packed_ms_per_step': 1000 * packed_s / a.steps,
                     'singles_images_per_s': images / singles_s, 'speedup': singles_s / packed_s,
                     'packed_peak_mem_mib': peak})
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    result = json.dumps({'meta': meta, 'rows': rows}, indent=2)
    if a.out:
        with open(a.out, 'w') as f:
            f.write(result + '\n')
    else:
        print(result)
    print(markdown(meta, rows))


if __name__ == '__main__':
    main()
