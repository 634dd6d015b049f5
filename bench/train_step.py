"""Training-step throughput: the official SGLS training loop vs the engine with each speed-up added in turn.

    python bench/train_step.py [--device cpu|cuda] [--tiny] [--archs resnet18,wrn34_10] [--batches 128,512]
                               [--methods at,sgls] [--steps N] [--warmup N] [--out results.json] [--md results.md]

For every arch x batch x method, in one process on one device, on the same synthetic CIFAR-shaped data:
  reference       the official loop (devicerxx/SGLS main_adv.py + losses/loss.py), written out below: torchvision
                  DataLoader with PIL transforms, fp32 NCHW eager, eval-mode PGD, per-batch .item() of loss and
                  accuracy, loss.backward(retain_graph=True), cudnn.benchmark on (as main_adv.py sets it)
  engine-eager    engine.step.train_step with the kind='gpu' loader, fp32 NCHW (training.engine=eager)
  +bf16           engine.fast.FastStep, bf16 autocast (CUDA only: see BF16_CPU_NOTE)
  +channels_last  ... and channels-last tensors
  +compile        ... and torch.compile of the model
  +cuda_graphs (attack weight grads)
                  ... and the whole step captured as CUDA graphs (engine.cuda_graphs; CUDA only), with the attack
                  as before issue 12 item 1: parameters requiring grad, so the compiled attack backward computes
                  every weight gradient (bench.flops.attack_weight_grads patches engine.attacks for this row only)
  +cuda_graphs    the same with the attack as it is (input gradient only, engine.attacks.input_gradient_only)
  +fold_bn        ... and FastStep(fold_bn=True): eval-mode BN folded into its conv for the attack and clean forwards
  +fused_attack   ... and FastStep(fused_attack=True): attack objective (model + loss) and PGD update compiled
  -clean_acc      ... and step(..., clean_acc=False): no per-step clean-accuracy forward
A row whose option this commit's FastStep lacks is n/a. MFU is credited work (23F / 24F for PGD-10 AT / SGLS),
"MFU executed" the work the row's step runs (bench/flops.py: EXECUTED_FORMULA, checked in tests/test_bench.py).
Each row runs --warmup untimed steps (their time, compilation included, is reported as warm-up seconds), then
--steps timed steps measured with time.perf_counter, with torch.cuda.synchronize before each clock read on CUDA.
SGLS runs with its soft labels active (start epoch passed), its more expensive phase. The data set is sized so
that no step crosses an epoch end (the official DataLoader restarts its workers every epoch).
--tiny is a CPU smoke test of every code path (small_cnn, 16x16, batch 32, PGD-2, 1 + 3 steps), not a benchmark.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import sys
import time
import traceback

if __name__ == '__main__':
    # Set before torch starts OpenMP: on a small shared CPU, OpenMP's default busy-waiting threads (torch's and
    # those of inductor's compiled kernels) steal cores from each other; on 2 cores this made the compiled SGLS
    # step ~35x slower (2 s instead of 56 ms per tiny step). Passive waiting changes nothing on a GPU run.
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from bench.flops import (EXECUTED_FORMULA, FLOP_FORMULA, attack_weight_grads,  # noqa: E402, F401 (forward_flop: tests)
                         executed_flop_per_image, fast_step_options, forward_and_first_layer_flop, forward_flop,
                         model_flop_per_image)
from bench.loaders import InMemoryPIL, cpu_model  # noqa: E402
from engine.data.convert import convert  # noqa: E402
from engine.data.loaders import make_loaders, read_beton  # noqa: E402
from engine.data.sources import SyntheticSpec  # noqa: E402
from engine.fast import FastStep  # noqa: E402
from engine.methods import METHODS, make_method  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.soft_labels import SoftLabels  # noqa: E402
from engine.step import make_sgd, train_step  # noqa: E402

CLASSES = 10
EPS, STEP_SIZE = 8 / 255, 2 / 255
PROFILES = {  # what each unset option means; --tiny picks the second
    'full': dict(device='cuda', archs='resnet18,wrn34_10', batches='128,512', methods='at,sgls', steps=20, warmup=5,
                 pgd_steps=10, width=0, image_size=32, workers=4),
    'tiny': dict(device='cpu', archs='small_cnn', batches='32', methods='at,sgls', steps=3, warmup=1, pgd_steps=2,
                 width=8, image_size=16, workers=2),
}
# Each row changes the options of the row above it (FastStep keywords, plus attack_weight_grads and clean_acc).
LADDER = (
    ('engine-eager', {}),
    ('+bf16', dict(precision='bf16')),
    ('+channels_last', dict(channels_last=True)),
    ('+compile', dict(compile=True)),
    ('+cuda_graphs (attack weight grads)', dict(cuda_graphs=True, attack_weight_grads=True)),
    ('+cuda_graphs', dict(attack_weight_grads=False)),
    ('+fold_bn', dict(fold_bn=True)),
    ('+fused_attack', dict(fused_attack=True)),
    ('-clean_acc', dict(clean_acc=False)),
)
BASE = dict(precision='fp32', channels_last=False, compile=False, cuda_graphs=False, attack_weight_grads=False,
            fold_bn=False, fused_attack=False, clean_acc=True)


def cumulative(ladder, options):
    """((name, the row's options: the row above's with its change applied), ...)"""
    rows = []
    for name, change in ladder:
        options = {**options, **change}
        rows.append((name, options))
    return tuple(rows)


CONFIGS = cumulative(LADDER, BASE)
NEW_OPTIONS = ('fold_bn', 'fused_attack')  # FastStep keywords of issue 12 (n/a where this commit lacks them)
BF16_CPU_NOTE = ('not measured on CPU, so the later CPU rows stay fp32: without bf16 matrix units bf16 autocast times '
                 'an emulation (ResNet-18, batch 32, forward + backward: 27.3 s in bf16 vs 1.6 s in fp32 on the '
                 'AVX2-only AMD EPYC of bench/RESULTS.md)')
CUDA_GRAPHS_CPU_NOTE = 'CUDA graphs exist on CUDA only'
# Dense bf16 tensor-core peaks from the datasheets (TFLOP/s); the first name contained in the device name wins.
PEAK_BF16_TFLOPS = (('H100 PCIe', 756.0), ('H100 NVL', 835.0), ('H100', 989.0), ('H200', 989.0), ('A100', 312.0))


def bench_method(name):
    """The method `name` as every row runs it: SGLS with its soft labels on from epoch 1 (the rows run epoch 1)."""
    return make_method(name, **({'sgls_start_epoch': 1} if 'sgls_start_epoch' in METHODS[name].params else {}))


def peak_tflops(device, override):
    if override:
        return override, 'given with --peak-tflops'
    if device.type != 'cuda':
        return None, 'CPU: MFU n/a'
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f'{name}: dense bf16 datasheet peak (no sparsity), also used for the fp32 rows'
    return None, f'{name}: peak unknown, pass --peak-tflops'


def peak_memory_mib(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(step, batches, warmup, steps, device):
    """(warm-up seconds, timed seconds, peak memory MiB) of step(*batch) over `warmup` then `steps` batches."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    start = time.perf_counter()
    for _ in range(warmup):
        step(*next(batches))
    sync()
    warm = time.perf_counter() - start
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)  # the timed steps' peak, with everything still allocated
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    sync()
    return warm, time.perf_counter() - start, peak_memory_mib(device)


def fresh_model(arch, width, device, graphed=False):
    torch.manual_seed(0)  # every row starts from the same weights
    model = build_model(arch, CLASSES, width=width).to(device)
    optimizer = make_sgd(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, device=device,
                         graphed=graphed)  # as engine.train.run_state.Run: a device-tensor lr under CUDA graphs
    return model, optimizer


class IndexedPIL(InMemoryPIL):
    """The official CIFAR10 dataset class also returns each image's index: SGLS addresses its soft labels by it."""

    def __getitem__(self, i):
        return (*super().__getitem__(i), i)


class OfficialLoss:
    """losses/loss.py AT and SGLS (past its start epoch), as written there: eval-mode PGD from a uniform start,
    then the train-mode loss; SGLS adds a clean forward (with a graph, hence the official retain_graph=True) and
    the soft-label EMA towards 0.2 p(x) + 0.8 p(x_adv)."""

    def __init__(self, method, labels, device, pgd_steps, momentum=0.9):
        self.soft_labels = F.one_hot(labels, CLASSES).float().to(device) if method == 'sgls' else None
        self.pgd_steps, self.momentum = pgd_steps, momentum

    def __call__(self, x, y, index, model, optimizer):
        model.eval()
        x_adv = (x.detach() + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
        for _ in range(self.pgd_steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss = F.cross_entropy(model(x_adv), y)
            grad = torch.autograd.grad(loss, [x_adv])[0]
            x_adv = x_adv.detach() + STEP_SIZE * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
        model.train()
        optimizer.zero_grad()
        logits = model(x_adv)
        if self.soft_labels is None:
            return logits, F.cross_entropy(logits, y)
        prob = F.softmax(logits.detach(), dim=1)
        clean_prob = F.softmax(model(x).detach(), dim=1)
        self.soft_labels[index] = (self.momentum * self.soft_labels[index]
                                   + (1 - self.momentum) * (0.2 * clean_prob + 0.8 * prob))
        return logits, torch.sum(-F.log_softmax(logits, dim=1) * self.soft_labels[index], dim=1).mean()


def run_reference(a, arch, batch, method, images, labels, device):
    """main_adv.py's train() over its DataLoader; returns (measure(...), mean training loss)."""
    from torchvision import transforms
    transform = transforms.Compose([transforms.RandomCrop(images.shape[1], padding=4),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    loader = torch.utils.data.DataLoader(IndexedPIL(images, labels, transform), batch_size=batch, shuffle=True,
                                         num_workers=a.workers, pin_memory=device.type == 'cuda')
    model, optimizer = fresh_model(arch, a.width, device)
    criterion = OfficialLoss(method, torch.from_numpy(labels), device, a.pgd_steps)
    losses = []

    def step(x, y, index):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad()
        logits, loss = criterion(x, y, index, model, optimizer)
        loss.backward(retain_graph=True)
        optimizer.step()
        prec1 = (logits.float().argmax(1) == y).float().mean() * 100
        losses.append(loss.float().item())  # AverageMeter.update(loss.item()): a host sync per batch
        prec1.item()

    model.train()
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        return measure(step, iter(loader), a.warmup, a.steps, device), float(np.mean(losses))
    finally:
        torch.backends.cudnn.benchmark = benchmark


def epochs(loader):
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def run_engine(a, arch, batch, method, config, betons, labels, device):
    """The epoch loop's body (engine/train/loop.py, SingleStepper) for one config, given as (name, options);
    returns (measure(...), mean training loss)."""
    name, o = config
    loader = make_loaders(*betons, kind='gpu', batch_size=batch, val_size=0, device=device).train
    model, optimizer = fresh_model(arch, a.width, device, graphed=o['cuda_graphs'] and device.type == 'cuda')
    if name == 'engine-eager':
        step = lambda opt, batch_, **kw: train_step(model, opt, batch_, **kw)  # noqa: E731, as SingleStepper
    else:
        step = FastStep(model, device, precision=o['precision'], channels_last=o['channels_last'],
                        compile=o['compile'], cuda_graphs=o['cuda_graphs'],
                        **{key: True for key in NEW_OPTIONS if o[key]})  # only those set: older FastSteps run too
    trained = bench_method(method)
    soft_labels = SoftLabels(torch.from_numpy(labels).to(device), CLASSES) if trained.soft_labels else None
    attack = dict(eps=EPS, step_size=STEP_SIZE, steps=a.pgd_steps, bn_mode='eval')  # as build.attack_budget
    common = dict(method=trained, attack=attack, soft_labels=soft_labels, epoch=1,
                  **({} if o['clean_acc'] else {'clean_acc': False}))
    # The steps' statistics summed on the device and read once at the end, as the loop's EpochMeter.
    total, images = torch.zeros(1, 4, dtype=torch.float64, device=device), 0

    def one_step(x, y, idx):
        nonlocal total, images
        total += step(optimizer, (x, y, idx), **common)  # a graphed step's statistics are refilled by each replay
        images += y.shape[0]

    with attack_weight_grads(o['attack_weight_grads']):  # warm-up included: it compiles and captures the graphs
        timing = measure(one_step, epochs(loader), a.warmup, a.steps, device)
    return timing, total[0, 0].item() / images  # column 0: loss x n (engine.step.STATS)


def plan(device):
    """(name, (name, options) or None, why not measured) per row, reference first. On CPU the rows after +bf16 stay
    fp32 and those after +cuda_graphs run without graphs."""
    rows, options = [('reference', None, '')], fast_step_options()
    for name, o in CONFIGS:
        missing = [key for key in NEW_OPTIONS if o[key] and key not in options]
        if device.type == 'cpu' and name == '+bf16':
            rows.append((name, None, BF16_CPU_NOTE))
        elif device.type == 'cpu' and name.startswith('+cuda_graphs'):
            rows.append((name, None, CUDA_GRAPHS_CPU_NOTE))
        elif missing:
            rows.append((name, None, f"engine.fast.FastStep has no {', '.join(missing)} option at this commit"))
        else:
            cpu = dict(precision='fp32', cuda_graphs=False) if device.type == 'cpu' else {}
            rows.append((name, (name, {**o, **cpu}), ''))
    return rows


def release(device):
    """Drop the last row's compiled graphs (they hold its model) and cached memory before the next row."""
    torch._dynamo.reset()
    torch.backends.cudnn.benchmark = False  # FastStep turns the autotuner on; each row starts from the default
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def add_ratios(rows):
    reference = {(r['arch'], r['batch'], r['method']): r['images_per_s'] for r in rows if r['config'] == 'reference'}
    for r in rows:
        base = reference.get((r['arch'], r['batch'], r['method']))
        r['ratio_to_reference'] = r['images_per_s'] / base if r['images_per_s'] and base else None


def fmt(value, spec):
    return '-' if value is None else format(value, spec)


def markdown(meta, rows):
    args = meta['args']
    lines = [f"Device: {meta['device_name']}; torch {meta['torch']}; {meta['date']}; PGD-{args['pgd_steps']}; "
             f"steps per row: {args['warmup']} warm-up + {args['steps']} timed.", '',
             '| arch | batch | method | config | precision | images/s | ms/step | warm-up s | GFLOP/image | TFLOP/s '
             f"| MFU | executed GFLOP/image | MFU executed | {meta['memory_kind']} MiB | x reference |",
             '|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        status = {'ok': '', 'n/a': ' (n/a)', 'error': ' (error)'}[r['status']]
        mfu, mfu_x = (None if r[key] is None else 100 * r[key] for key in ('mfu', 'mfu_executed'))
        lines.append(
            f"| {r['arch']} | {r['batch']} | {r['method']} | {r['config']}{status} | {r['precision'] or '-'} | "
            f"{fmt(r['images_per_s'], ',.0f')} | {fmt(r['ms_per_step'], '.1f')} | {fmt(r['warmup_s'], '.1f')} | "
            f"{r['gflop_per_image']:.4g} | {fmt(r['tflops'], '.3g')} | {fmt(mfu, '.1f')}{'%' * (mfu is not None)} | "
            f"{r['executed_gflop_per_image']:.4g} | {fmt(mfu_x, '.1f')}{'%' * (mfu_x is not None)} | "
            f"{fmt(r['peak_mem_mib'], ',.0f')} | {fmt(r['ratio_to_reference'], '.2f')} |")
    notes = {r['config']: r['note'] for r in rows if r['status'] == 'n/a'}  # one reason per config
    notes.update({f"{r['arch']} {r['batch']} {r['method']} {r['config']}": r['note'] for r in rows
                  if r['status'] == 'error'})
    lines += [''] + [f'- {name}: {note}' for name, note in notes.items()]
    lines += [f"- FLOP (MFU): {meta['flop_formula']}", f"- Executed FLOP (MFU executed): {meta['executed_formula']}",
              "- Forward GMACs per image: "
              + ', '.join(f'{k} {v / 2e9:.4g}' for k, v in meta['forward_flop'].items()),
              f"- MFU peak: {meta['peak_tflops'] or 'n/a'} TFLOP/s ({meta['peak_source']})",
              f"- Memory: {meta['memory_note']}"]
    return '\n'.join(lines) + '\n'


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tiny', action='store_true', help='CPU smoke test of every code path (CI)')
    parser.add_argument('--device', choices=['cpu', 'cuda'])
    parser.add_argument('--archs', help='comma-separated engine.models archs')
    parser.add_argument('--batches', help='comma-separated batch sizes')
    parser.add_argument('--methods', help='comma-separated, of at and sgls')
    parser.add_argument('--configs', help='comma-separated rows to run (default: all), e.g. reference,+cuda_graphs')
    parser.add_argument('--steps', type=int, help='timed steps per row')
    parser.add_argument('--warmup', type=int, help='untimed steps per row before them (compilation included)')
    parser.add_argument('--pgd-steps', type=int, help='K, the training attack steps')
    parser.add_argument('--width', type=int, help='model width (0 = the arch default)')
    parser.add_argument('--image-size', type=int, help='side of the synthetic square images')
    parser.add_argument('--workers', type=int, help="the reference DataLoader's num_workers (official: 4)")
    parser.add_argument('--peak-tflops', type=float, default=0.0, help='peak for MFU instead of the datasheet')
    parser.add_argument('--data-dir', default='.data/bench', help='where the synthetic betons are written')
    parser.add_argument('--out', default='', help='write the results as JSON here')
    parser.add_argument('--md', default='', help='write the Markdown table here')
    a = parser.parse_args(argv)
    for key, value in PROFILES['tiny' if a.tiny else 'full'].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.archs, a.methods = a.archs.split(','), a.methods.split(',')
    a.batches = [int(b) for b in a.batches.split(',')]
    unknown = set(a.configs.split(',') if a.configs else ()) - {'reference', *dict(CONFIGS)}
    if unknown:
        parser.error(f"--configs {', '.join(sorted(unknown))}: unknown; rows: reference, {', '.join(dict(CONFIGS))}")
    if set(a.methods) - {'at', 'sgls'}:
        parser.error(f'--methods {",".join(a.methods)}: choose among at, sgls')
    if a.device == 'cuda' and not torch.cuda.is_available():
        parser.error('no CUDA device here: pass --device cpu, or --tiny for the CPU smoke test')
    if a.steps < 1 or a.warmup < 1:
        parser.error('--steps and --warmup must be >= 1 (the first step compiles and starts loader workers)')
    return a


def write_outputs(a, meta, rows):
    add_ratios(rows)
    table = markdown(meta, rows)
    if a.out:
        with open(a.out, 'w') as f:
            json.dump({'meta': meta, 'rows': rows}, f, indent=2)
    if a.md:
        with open(a.md, 'w') as f:
            f.write(table)
    return table


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    # Big enough that every loader serves warmup + steps batches of the largest size within one epoch.
    spec = SyntheticSpec(n_train=max(a.batches) * (a.warmup + a.steps), n_test=64, classes=CLASSES,
                         shape=(3, a.image_size, a.image_size), seed=0)
    betons = convert('synthetic', a.data_dir, synthetic=spec, log=lambda message: None)
    images, labels = read_beton(betons[0])
    peak, peak_source = peak_tflops(device, a.peak_tflops)
    flop, first_layer = {}, {}
    for arch in a.archs:
        flop[arch], first_layer[arch] = forward_and_first_layer_flop(arch, a.width, a.image_size)
    meta = {'date': time.strftime('%Y-%m-%d'), 'device': a.device,
            'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_model(),
            'torch': torch.__version__, 'python': sys.version.split()[0],
            'command': ' '.join([os.path.basename(sys.executable)] + (sys.argv if argv is None else
                                                                         ['bench/train_step.py', *argv])),
            'args': vars(a), 'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY'), 'forward_flop': flop,
            'first_layer_flop': first_layer, 'flop_formula': FLOP_FORMULA, 'executed_formula': EXECUTED_FORMULA,
            'peak_tflops': peak, 'peak_source': peak_source,
            'memory_kind': 'peak CUDA allocated' if device.type == 'cuda' else 'max RSS',
            'memory_note': ('torch.cuda.max_memory_allocated over the timed steps' if device.type == 'cuda' else
                            "the process's max RSS so far (getrusage): monotone over the run, not per row; the "
                            "reference's DataLoader worker processes are not included")}
    rows = []
    for arch, batch, method in itertools.product(a.archs, a.batches, a.methods):
        gflop = model_flop_per_image(flop[arch], method, a.pgd_steps) / 1e9
        for name, config, note in plan(device):
            if a.configs and name not in a.configs.split(','):
                continue
            o = dict(CONFIGS)[name] if name != 'reference' else dict(BASE, clean_acc=False)  # the official loop
            executed = executed_flop_per_image(flop[arch], first_layer[arch], method, a.pgd_steps,
                                               attack_weight_grads=o['attack_weight_grads'] and o['compile'],
                                               clean_acc=o['clean_acc']) / 1e9
            row = dict(arch=arch, batch=batch, method=method, config=name, status='n/a', note=note,
                       precision=config[1]['precision'] if config else ('fp32' if name == 'reference' else None),
                       images_per_s=None, ms_per_step=None, warmup_s=None, loss=None, gflop_per_image=gflop,
                       executed_gflop_per_image=executed, tflops=None, mfu=None, mfu_executed=None,
                       peak_mem_mib=None)
            if name == 'reference' or config:
                print(f'{arch} batch {batch} {method} {name} ...', file=sys.stderr, flush=True)
                try:
                    if name == 'reference':
                        timing, loss = run_reference(a, arch, batch, method, images, labels, device)
                    else:
                        timing, loss = run_engine(a, arch, batch, method, config, betons, labels, device)
                except Exception as e:  # keep the other rows of a long GPU run (e.g. one config out of memory)
                    traceback.print_exc()
                    row.update(status='error', note=f'{type(e).__name__}: {e}'[:300])
                else:
                    warm, seconds, memory = timing
                    images_per_s = batch * a.steps / seconds
                    row.update(status='ok', images_per_s=images_per_s, ms_per_step=1000 * seconds / a.steps,
                               warmup_s=warm, loss=loss, tflops=images_per_s * gflop / 1000,
                               mfu=images_per_s * gflop / 1000 / peak if peak else None, peak_mem_mib=memory,
                               mfu_executed=images_per_s * executed / 1000 / peak if peak else None)
                finally:
                    release(device)
            rows.append(row)
            write_outputs(a, meta, rows)  # after every row: a killed run keeps what it measured
    print(write_outputs(a, meta, rows))
    return 1 if any(r['status'] == 'error' for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())
