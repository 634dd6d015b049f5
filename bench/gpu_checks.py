"""GPU evidence that the fast path computes what the eager path computes (issue 4, item 2).

    python bench/gpu_checks.py --source .data/fashion-mnist --out OUT_DIR [--seeds 0-2] [--epochs 3]

1. strength: a ResNet-18 trained with the full fast path (bf16, channels-last, compile, CUDA graphs) on the real
   Fashion-MNIST (AT, eps 0.1, PGD-5); then PGD-20 robust accuracy of its last checkpoint on the whole test set
   with the attack in fp32 (TF32 off) and in bf16 autocast, twice each (two random starts, the noise floor).
   Pass: |bf16 - fp32| <= 0.5 points.
2. engines: the demo config (configs/fashion_mnist_quick.yaml: small CNN, AT) trained with training.engine eager
   and fast for several seeds each; final-checkpoint clean and PGD-20 accuracy per engine, Welch's t-test.
   Pass: the engines' PGD-20 means differ by less than the seed noise (p > 0.05).
Writes OUT_DIR/gpu_checks.json and OUT_DIR/gpu_checks.md; prints the Markdown.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from engine import checkpoint, config  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from engine.stats import summary, welch  # noqa: E402
from engine.sweep import parse_seeds  # noqa: E402
from engine.train.build import attack_budget, model_of, open_data  # noqa: E402
from engine.train.loop import train  # noqa: E402

DEMO = 'configs/fashion_mnist_quick.yaml'


def run(cli, log):
    cfg = config.load([DEMO], cli + ['--training.progress=off', '--output.overwrite=true'])
    return cfg, train(cfg, log=log)


def strength(a, log):
    cfg, run_dir = run([f'--data.source={a.source}', f'--data.dir={a.data_dir}', '--data.train_limit=0',
                        '--data.val_size=1000', '--model.arch=resnet18', '--training.engine=fast',
                        f'--training.epochs={a.epochs}', '--training.batch_size=256', '--optimizer.lr=0.1',
                        '--evaluation.every=100', '--evaluation.final_n=1000',
                        f'--output.dir={a.out}/runs', '--output.name=strength-resnet18'], log)
    device = torch.device('cuda')
    loaders, _ = open_data(cfg, device, log)
    model = model_of(cfg, loaders.image_shape[0], device)
    model.load_state_dict(checkpoint.load(os.path.join(run_dir, 'checkpoints', 'last.pt'), device)['model'])
    budget = attack_budget(cfg)  # eps and step in pixel units
    common = dict(attacks=('clean', 'pgd'), eps=budget['eps'], step_size=budget['step_size'], pgd_steps=20)
    results = {}
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for precision in ('fp32', 'bf16'):
        for seed in (0, 1):
            torch.manual_seed(seed)
            start = time.perf_counter()
            with torch.autocast('cuda', dtype=torch.bfloat16, enabled=precision == 'bf16'):
                row = evaluate(model, loaders.test, **common)
            results[f'{precision} start {seed}'] = dict(row, seconds=time.perf_counter() - start)
            log(f'strength {precision} seed {seed}: {row}')
    fp32 = [results[f'fp32 start {s}']['pgd'] for s in (0, 1)]
    bf16 = [results[f'bf16 start {s}']['pgd'] for s in (0, 1)]
    gap = abs(sum(bf16) / 2 - sum(fp32) / 2)
    return {'rows': results, 'pgd_gap_points': gap, 'pass': gap <= 0.5}


def engines(a, log):
    finals = {}
    for engine in ('eager', 'fast'):
        for seed in parse_seeds(a.seeds):
            start = time.perf_counter()
            _, run_dir = run([f'--data.source={a.source}', f'--data.dir={a.data_dir}', f'--training.engine={engine}',
                              f'--training.seed={seed}', f'--output.dir={a.out}/runs',
                              f'--output.name=engines-{engine}-s{seed}'], log)
            with open(os.path.join(run_dir, 'final.json')) as f:
                row = json.load(f)['rows']['final']
            finals.setdefault(engine, []).append(dict(seed=seed, clean=row['clean'], pgd=row['pgd'],
                                                      seconds=time.perf_counter() - start))
    pgd = {e: [r['pgd'] for r in rows] for e, rows in finals.items()}
    test = welch(pgd['fast'], pgd['eager'])
    return {'runs': finals, 'pgd': {e: summary(v) for e, v in pgd.items()}, 'welch_fast_minus_eager': test,
            'pass': test['diff'] == 0 if test['p'] is None else test['p'] > 0.05}


def markdown(meta, out):
    lines = [f"GPU checks: {meta['device']}; torch {meta['torch']}; {meta['date']}; `{meta['command']}`", '']
    if 'strength' in out:
        s = out['strength']
        lines += ['### bf16 vs fp32 PGD-20 (ResNet-18, fast-path AT on Fashion-MNIST, full test set, eps 0.1)', '',
                  '| attack precision, start | clean | PGD-20 | n | s |', '|---|---:|---:|---:|---:|']
        lines += [f"| {k} | {r['clean']:.2f} | {r['pgd']:.2f} | {r['n']} | {r['seconds']:.1f} |"
                  for k, r in s['rows'].items()]
        lines += ['', f"|bf16 - fp32| PGD-20 (means of two starts): {s['pgd_gap_points']:.2f} points; "
                  f"{'PASS' if s['pass'] else 'FAIL'} (<= 0.5)", '']
    if 'engines' in out:
        e = out['engines']
        lines += ['### eager vs fast engine, demo config (small CNN AT on Fashion-MNIST), final checkpoint', '',
                  '| engine | seed | clean | PGD-20 | run s |', '|---|---:|---:|---:|---:|']
        lines += [f"| {eng} | {r['seed']} | {r['clean']:.2f} | {r['pgd']:.2f} | {r['seconds']:.1f} |"
                  for eng, rows in e['runs'].items() for r in rows]
        w = e['welch_fast_minus_eager']
        lines += ['', 'PGD-20 mean (std): ' + ', '.join(f"{k} {v['mean']:.2f} ({v['std']:.2f})"
                                                        for k, v in e['pgd'].items()),
                  f"; Welch fast - eager: {w['diff']:+.2f} points, p = {w['p'] if w['p'] is None else round(w['p'], 3)}; "
                  f"{'PASS' if e['pass'] else 'FAIL'} (p > 0.05)", '']
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--source', default='/usr/share/datasets/fashion-mnist')
    p.add_argument('--data-dir', default='/tmp/gpu-checks-data')
    p.add_argument('--out', required=True)
    p.add_argument('--seeds', default='0-2')
    p.add_argument('--epochs', type=int, default=3, help='epochs of the strength model')
    p.add_argument('--only', choices=['strength', 'engines'])
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error('needs a CUDA GPU')
    os.makedirs(a.out, exist_ok=True)
    meta = {'device': torch.cuda.get_device_name(), 'torch': torch.__version__, 'date': time.strftime('%Y-%m-%d'),
            'command': 'python bench/gpu_checks.py ' + ' '.join(sys.argv[1:] if argv is None else argv)}
    out = {}
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    for name, check in (('strength', strength), ('engines', engines)):
        if a.only in (None, name):
            out[name] = check(a, log)
            with open(os.path.join(a.out, 'gpu_checks.json'), 'w') as f:
                json.dump({'meta': meta, **out}, f, indent=2)
    table = markdown(meta, out)
    with open(os.path.join(a.out, 'gpu_checks.md'), 'w') as f:
        f.write(table)
    print(table)
    return 0 if all(v['pass'] for v in out.values()) else 1


if __name__ == '__main__':
    sys.exit(main())
