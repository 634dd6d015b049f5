"""Golden runs: fixed tiny runs of every method, single and packed, eager and fast, in float64.

    .venv/bin/python -m tests.golden.runs            # (re)write tests/golden/golden.json from this code

Each case is `run.py sweep` of one method over seeds 0 and 1 on tiny synthetic data (2 epochs, SGLS from epoch 2,
so both of its phases run), as single eager runs, single fast runs (torch.compile and channels-last on the CPU;
no autocast in fp64) or packed eager runs (--pack 2). A run is recorded by what it writes: metrics.jsonl
(without timings), final.json's rows, and fingerprints of every tensor of checkpoints/last.pt and best.pt (sum,
L2 norm, a sum weighted by cos(0.7 i), which sees a permuted or misplaced element, and the element count) plus
a hash of the RNG state.

float64 makes the record hold on any CPU: kernels that sum in another order differ by ~1e-16, far below the 1e-9
tolerance of tests/test_golden.py, while a change of what is computed moves it by far more. Checked on the AMD
EPYC (AVX-512) that recorded it, by running the cases with other kernels: with ATen's AVX2 kernels and MKL's
AVX2 path (ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2) the eager and packed cases were bitwise equal (the compiled
ones could not run so: inductor's cached kernels gave NaN); with MKL's AVX-512 path (MKL_CBWR=AVX512) and with
one thread all cases were within 3e-11, eager and packed ones bitwise. The record was made by the code before the re-layout (see meta.git_commit); rewrite
it only for a change that is meant to change results, and say so in the commit and in meta.rerecorded (the TRADES
cases were, on 2026-12-02, for the official TRADES forward order).
"""
import datetime
import hashlib
import json
import os
import platform
import sys

import torch

METHODS = ('ce', 'at', 'trades', 'sgls', 'sgls_trades')
PATHS = {
    'eager': ['--training.engine=eager'],
    'fast': ['--training.engine=fast', '--training.compile=true', '--training.channels_last=true'],
    'packed': ['--training.engine=eager', '--pack', '2'],
}
SEEDS = (0, 1)
TINY = ['--data.dataset=synthetic', '--data.synthetic_n_train=1088', '--data.synthetic_n_test=192',
        '--data.synthetic_classes=4', '--data.synthetic_shape=3,16,16', '--data.val_size=64',
        '--model.arch=small_cnn', '--model.width=8', '--attack.eps=16', '--attack.step_size=8', '--attack.steps=2',
        '--training.epochs=2', '--training.batch_size=64', '--training.precision=fp64', '--optimizer.lr=0.1',
        '--schedule.milestones=2', '--method.sgls_start_epoch=2', '--evaluation.subset=128',
        '--evaluation.pgd_steps=2', '--evaluation.final_pgd_steps=3', '--evaluation.cw_steps=2',
        '--evaluation.fgsm=true', '--evaluation.autoattack=false', '--training.progress=off']
TIMING = ('epoch_time_s', 'images_per_s')
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden.json')
COMMAND = '.venv/bin/python -m tests.golden.runs'


def cases():
    return [f'{method}-{path}' for method in METHODS for path in PATHS]


def run_case(case, data_dir, out_dir):
    """Run one case's sweep into out_dir; returns {run name: record}."""
    from engine.sweep import main as sweep
    method, path = case.rsplit('-', 1)
    if path == 'fast':
        # Compile afresh, as in a process of its own: what other code compiled before (other shapes, dtypes,
        # strides) counts against dynamo's recompile limit (8 per function), past which it silently runs eager.
        torch._dynamo.reset()
    sweep([], TINY + PATHS[path] + [f'--data.dir={data_dir}', '--methods', method,
                                    '--seeds', ','.join(map(str, SEEDS)), '--out', str(out_dir)],
          log=lambda *_: None)
    return {f'{method}-s{seed}': record(os.path.join(out_dir, f'{method}-s{seed}')) for seed in SEEDS}


def fingerprint(t):
    t = t.detach().double().reshape(-1)
    weights = torch.cos(0.7 * torch.arange(t.numel(), dtype=torch.float64))
    return [t.sum().item(), torch.linalg.vector_norm(t).item(), (t * weights).sum().item(), t.numel()]


def tensors(state, prefix=''):
    """Every tensor of a (nested) checkpoint dict, by dotted key; the RNG state and params are left out."""
    out = {}
    for key, value in state.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            out.update(tensors(value, name + '.'))
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            out[name] = fingerprint(value)
    return out


def checkpoint_record(path):
    state = torch.load(path, map_location='cpu', weights_only=True)
    record = {'model': tensors(state['model'])}
    if 'optimizer' in state:  # momentum buffers by parameter position
        record['momentum'] = {str(i): fingerprint(s['momentum_buffer'])
                              for i, s in state['optimizer']['state'].items()}
    if state.get('soft_labels') is not None:
        record['soft_labels'] = fingerprint(state['soft_labels']['table'])
    if 'ema' in state:  # training.weight_ema: the averaged weights
        record['ema'] = tensors(state['ema'])
    if 'rng' in state:
        record['rng_sha256'] = hashlib.sha256(state['rng']['torch'].numpy().tobytes()).hexdigest()
    return record


def record(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]
    with open(os.path.join(run_dir, 'final.json')) as f:
        final = json.load(f)
    return {'metrics': metrics, 'final_rows': final['rows'],
            'last': checkpoint_record(os.path.join(run_dir, 'checkpoints', 'last.pt')),
            'best': checkpoint_record(os.path.join(run_dir, 'checkpoints', 'best.pt'))}


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.machine()


def main(argv):
    import tempfile
    out = argv[0] if argv else GOLDEN
    with tempfile.TemporaryDirectory() as tmp:
        results = {case: run_case(case, os.path.join(tmp, 'data'), os.path.join(tmp, case)) for case in cases()}
    meta = {'command': COMMAND, 'date': datetime.date.today().isoformat(), 'torch': torch.__version__,
            'python': platform.python_version(), 'cpu': cpu_name(),
            'git_commit': os.popen('git rev-parse HEAD 2>/dev/null').read().strip(), 'args': TINY}
    with open(out, 'w') as f:
        json.dump({'meta': meta, 'cases': results}, f, indent=1, sort_keys=True)
        f.write('\n')
    print(f'wrote {out}: {len(results)} cases')


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))


RTOL, ATOL = 1e-9, 1e-12


def mismatches(got, want, where=''):
    """Where two records differ: ints, strings, None and keys exactly; floats within RTOL; fingerprints
    [sum, norm, weighted sum, count] within RTOL of the bound norm * sqrt(count) on |sum| (a sum of terms that
    cancel differs by rounding relative to its terms, not to itself)."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f'{where}: keys {sorted(got) if isinstance(got, dict) else got} != {sorted(want)}']
        return [m for k in want for m in mismatches(got[k], want[k], f'{where}.{k}')]
    if isinstance(want, list) and len(want) == 4 and all(isinstance(v, (int, float)) for v in want) \
            and isinstance(want[3], int) and isinstance(got, list) and len(got) == 4:
        if got[3] != want[3]:
            return [f'{where}: {got[3]} elements, golden {want[3]}']
        scale = want[1] * want[3] ** 0.5
        bounds = (RTOL * scale + ATOL, RTOL * abs(want[1]) + ATOL, RTOL * scale + ATOL)
        return [f'{where}[{i}]: {g!r} vs golden {w!r}' for i, (g, w, b) in enumerate(zip(got, want, bounds))
                if not abs(g - w) <= b]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f'{where}: {got!r} vs golden {want!r}']
        return [m for i, (g, w) in enumerate(zip(got, want)) for m in mismatches(g, w, f'{where}[{i}]')]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return [] if abs(got - want) <= RTOL * abs(want) + ATOL else [f'{where}: {got!r} vs golden {want!r}']
    return [] if got == want and type(got) is type(want) else [f'{where}: {got!r} vs golden {want!r}']
