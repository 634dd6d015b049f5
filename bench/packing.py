"""Packed-seed training throughput: K seeds as one packed model vs the same seeds trained one after another.

    python bench/packing.py [--device cpu|cuda] [--engine eager|fast] [--arch resnet18] [--width W] [--batch 128]
                            [--ks 1,2,4,8] [--method at|sgls] [--steps N] [--warmup N] [--pgd-steps N] [--tiny]
                            [--fold-bn] [--fused-attack] [--no-clean-acc] [--out results.json] [--md results.md]

For each K, in one process on one device, on the same synthetic CIFAR-shaped batches (each seed its own):
  packed   K models packed into one (engine.packing.pack_models; K x batch images per step), stepped with
           seeds=engine.packing.PackedSeeds (each seed's PGD start from its own generator)
  singles  the same seeds' models trained one after another, as many steps each (the same total work)
--engine eager (default): both sides engine.step.train_step, fp32; singles: each of the K models in turn.
--engine fast: both sides engine.fast.FastStep as training.engine=fast runs them (bf16 on CUDA, fp32 on CPU;
channels-last; torch.compile; CUDA graphs on CUDA, with the seeds' generators registered; --fold-bn,
--fused-attack, --no-clean-acc pass FastStep's options of issue 12). Singles: ONE fast model (seed 0) timed once;
K runs of it in turn take K times as long (the same model, data shape and step each time), so its throughput is
the same for every K and each K is not charged K compilations.
cudnn.benchmark is on for both sides. Each side runs --warmup untimed steps per model (fast: at least 5, so that
the timed steps replay captured graphs), then --steps timed steps, with torch.cuda.synchronize before each clock
read on CUDA. Throughput is per-seed images/s summed over the K seeds; speed-up = packed / singles. The mean
training loss of seed 0 is recorded on both sides (the same seed, data and start: they agree up to rounding).
Prints the Markdown table and writes the JSON to --out (else prints it), after every K.
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
from engine.packing import PackedSeeds, pack_models, seed_generator  # noqa: E402
from engine.soft_labels import SoftLabels  # noqa: E402
from engine.step import make_sgd, train_step  # noqa: E402

CLASSES = 10
EPS, STEP_SIZE = 8 / 255, 2 / 255
PROFILES = {  # what each unset option means; --tiny picks the second
    'full': dict(device='cuda', arch='resnet18', width=0, image_size=32, batch=128, ks='1,2,4,8', steps=20, warmup=3,
                 pgd_steps=10),  # --engine fast: warm-up at least FAST_WARMUP
    'tiny': dict(device='cpu', arch='resnet18', width=8, image_size=16, batch=32, ks='1,2,4', steps=3, warmup=1,
                 pgd_steps=2),
}
FAST_WARMUP = 5  # engine.cuda_graphs: 3 plain steps, the 4th captures (and replays); the 5th a plain replay


def seeds_setup(a, k, device):
    """K models (seeds 0..K-1, built as engine.train.loop.train_packed does: each seed's stream taken after its
    torch.manual_seed and model construction), data, soft-label tables and streams."""
    models, streams = [], []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model(a.arch, CLASSES, width=a.width).to(device))
        streams.append(seed_generator(device))
    xs, ys = [], []
    for seed in range(k):  # seed s's batch is the same whatever K, so seed 0's loss can be compared across sides
        g = torch.Generator(device=device).manual_seed(1234 + seed)
        xs.append(torch.rand(a.batch, 3, a.image_size, a.image_size, generator=g, device=device))
        ys.append(torch.randint(0, CLASSES, (a.batch,), generator=g, device=device))
    xs, ys = torch.stack(xs), torch.stack(ys)
    idxs = torch.arange(a.batch, device=device).repeat(k, 1)
    soft_labels = [SoftLabels(y, CLASSES) for y in ys] if a.method == 'sgls' else None
    return models, streams, xs, ys, idxs, soft_labels


def sgd(params, a, device):
    """As engine.train: with CUDA graphs the learning rate is a device tensor and the update fused."""
    return make_sgd(params, lr=0.1, momentum=0.9, weight_decay=5e-4, device=device, graphed=graphed(a, device))


def graphed(a, device):
    return a.engine == 'fast' and device.type == 'cuda'


def make_step(a, model, device, generators=()):
    """step(optimizer, batch, **train_step keywords): the eager step, or FastStep as training.engine=fast."""
    if a.engine == 'eager':
        return lambda optimizer, batch, **kw: train_step(model, optimizer, batch, **kw)
    from engine.fast import FastStep
    return FastStep(model, device, precision='auto', channels_last=True, compile=True, cuda_graphs=graphed(a, device),
                    generators=generators, **{key: True for key in ('fold_bn', 'fused_attack') if getattr(a, key)})


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


def release():
    """Drop the compiled graphs of the last side (they hold its models) before the next."""
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_packed(a, k, device, common):
    """(seconds of the timed steps, seed 0's mean training loss over all steps)."""
    models, streams, xs, ys, idxs, soft_labels = seeds_setup(a, k, device)
    packed = pack_models(models)
    optimizer, seeds = sgd(packed.parameters(), a, device), PackedSeeds(k, streams)
    step = make_step(a, packed, device, generators=streams)
    total = torch.zeros(k, 4, dtype=torch.float64, device=device)
    seconds = timed(summed(total, lambda: step(optimizer, (xs, ys, idxs), soft_labels=soft_labels, seeds=seeds,
                                               **common)), a.warmup, a.steps, device)
    release()
    return seconds, total[0, 0].item() / (a.batch * (a.warmup + a.steps))


def run_singles(a, k, device, common):
    """(seconds of the timed steps of the K models in turn, seed 0's mean training loss)."""
    models, streams, xs, ys, idxs, soft_labels = seeds_setup(a, k, device)
    seconds, loss = 0.0, None
    for s, model in enumerate(models):
        # Seed s's attack noise from its own stream (the state its packed run starts from), as its single run would.
        (torch.cuda.set_rng_state if device.type == 'cuda' else torch.set_rng_state)(streams[s].get_state())
        optimizer, total = sgd(model.parameters(), a, device), torch.zeros(1, 4, dtype=torch.float64, device=device)
        table, step = soft_labels[s] if soft_labels else None, make_step(a, model, device)
        seconds += timed(summed(total, lambda: step(optimizer, (xs[s], ys[s], idxs[s]), soft_labels=table,
                                                    **common)), a.warmup, a.steps, device)
        loss = loss if s else total[0, 0].item() / (a.batch * (a.warmup + a.steps))
        release()
    return seconds, loss


def markdown(meta, rows):
    a = meta['args']
    singles = 'K singles in turn' if a['engine'] == 'eager' else 'one fast model x K in turn'
    lines = [f"Device: {meta['device_name']}; torch {meta['torch']}; {meta['date']}; {a['arch']} (width "
             f"{a['width'] or 'default'}), {a['image_size']}x{a['image_size']}, batch {a['batch']} per seed, "
             f"{a['method']} PGD-{a['pgd_steps']}, engine {a['engine']} ({meta['step']}); {a['warmup']} warm-up + "
             f"{a['steps']} timed steps per model.", '',
             f'| K | packed images/s (all seeds) | packed ms/step | {singles} images/s | speed-up | seed 0 loss '
             'packed / single |' + (' packed peak MiB |' if meta['device'] == 'cuda' else ''),
             '|---:|---:|---:|---:|---:|---|' + ('---:|' if meta['device'] == 'cuda' else '')]
    for r in rows:
        lines.append(f"| {r['k']} | {r['packed_images_per_s']:,.0f} | {r['packed_ms_per_step']:.1f} | "
                     f"{r['singles_images_per_s']:,.0f} | {r['speedup']:.2f} | {r['packed_loss_seed0']:.4f} / "
                     f"{r['single_loss_seed0']:.4f} |"
                     + (f" {r['packed_peak_mem_mib']:,.0f} |" if meta['device'] == 'cuda' else ''))
    return '\n'.join(lines) + '\n'


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tiny', action='store_true', help='CPU smoke test, not a benchmark')
    parser.add_argument('--device', choices=['cpu', 'cuda'])
    parser.add_argument('--engine', default='eager', choices=['eager', 'fast'], help='the step of both sides')
    parser.add_argument('--fold-bn', action='store_true', help='fast: FastStep(fold_bn=True)')
    parser.add_argument('--fused-attack', action='store_true', help='fast: FastStep(fused_attack=True)')
    parser.add_argument('--no-clean-acc', action='store_true', help='step(..., clean_acc=False)')
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
    parser.add_argument('--md', default='', help='also write the Markdown table here')
    a = parser.parse_args(argv)
    warmup_given = a.warmup is not None
    for key, value in PROFILES['tiny' if a.tiny else 'full'].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.engine == 'fast' and not warmup_given and not a.tiny:
        a.warmup = max(a.warmup, FAST_WARMUP)
    if a.engine == 'eager' and (a.fold_bn or a.fused_attack):
        parser.error('--fold-bn and --fused-attack are options of --engine fast')
    a.ks = [int(k) for k in a.ks.split(',')]
    if a.device == 'cuda' and not torch.cuda.is_available():
        parser.error('no CUDA device here: pass --device cpu, or --tiny for the CPU smoke test')
    if a.steps < 1 or a.warmup < 0 or min(a.ks) < 1:
        parser.error('--steps and every K must be >= 1, --warmup >= 0')
    return a


def step_description(a, device):
    if a.engine == 'eager':
        return 'engine.step.train_step, fp32'
    from engine.precision import resolve_precision
    options = [key for key in ('fold_bn', 'fused_attack') if getattr(a, key)] + ['clean_acc=False'] * a.no_clean_acc
    return (f"engine.fast.FastStep: {resolve_precision('auto', device)}, channels-last, compiled"
            + (', CUDA graphs' if graphed(a, device) else '') + ''.join(f', {o}' for o in options))


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = True  # both sides: grouped and plain convolutions each get their best kernel
    sgls_on = {'sgls_start_epoch': 1} if 'sgls_start_epoch' in METHODS[a.method].params else {}  # soft labels on
    common = dict(method=make_method(a.method, **sgls_on), epoch=1,
                  attack=dict(eps=EPS, step_size=STEP_SIZE, steps=a.pgd_steps, bn_mode='eval'),
                  **({'clean_acc': False} if a.no_clean_acc else {}))
    meta = {'date': time.strftime('%Y-%m-%d'), 'device': a.device,
            'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_model(),
            'torch': torch.__version__, 'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY'),
            'command': ' '.join(['bench/packing.py', *(sys.argv[1:] if argv is None else argv)]), 'args': vars(a),
            'step': step_description(a, device),
            'singles': ('each of the K models in turn' if a.engine == 'eager' else
                        'one fast model (seed 0) timed once; K runs in turn = K x its time')}
    one_fast = None
    if a.engine == 'fast':
        print('one fast model ...', file=sys.stderr, flush=True)
        one_fast = run_singles(a, 1, device, common)
    rows = []
    for k in a.ks:
        print(f'K={k} ...', file=sys.stderr, flush=True)
        images = k * a.batch * a.steps
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        packed_s, packed_loss = run_packed(a, k, device, common)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == 'cuda' else None
        if one_fast is None:
            singles_s, single_loss = run_singles(a, k, device, common)
        else:
            singles_s, single_loss = k * one_fast[0], one_fast[1]
        rows.append({'k': k, 'packed_images_per_s': images / packed_s, 'packed_ms_per_step': 1000 * packed_s / a.steps,
                     'singles_images_per_s': images / singles_s, 'speedup': singles_s / packed_s,
                     'packed_peak_mem_mib': peak, 'packed_loss_seed0': packed_loss, 'single_loss_seed0': single_loss})
        result = json.dumps({'meta': meta, 'rows': rows}, indent=2)
        if a.out:  # after every K: a run stopped by its time limit keeps what it measured
            with open(a.out, 'w') as f:
                f.write(result + '\n')
        if a.md:
            with open(a.md, 'w') as f:
                f.write(markdown(meta, rows))
    if not a.out:
        print(result)
    print(markdown(meta, rows))


if __name__ == '__main__':
    main()
