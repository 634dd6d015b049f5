"""Epochs: schedule, training step, evaluation cadence, checkpoints and resume, the final table.

Data flows one way: betons -> loaders -> step -> metrics -> writers. The trainer reads the device once per
epoch (the meter) and once per evaluation.
"""
import contextlib
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from engine import checkpoint, config as config_mod
from engine.data.convert import NUM_CLASSES, SyntheticSpec, convert
from engine.data.loaders import make_loaders
from engine.errors import UserError
from engine.evaluate import evaluate, format_table
from engine.methods import Method, corrupt_labels
from engine.models import build_model
from engine.precision import param_dtype, resolve_precision
from engine.soft_labels import SoftLabels
from engine.step import EpochMeter, FastStep, attack_cfg_kwargs, make_sgd, set_lr, train_step
from writers.run_files import MetricsLog, write_final, write_json_atomic, write_text_atomic

DATASET_STATS = {  # per-channel mean/std for the optional in-model normalization
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'fashion-mnist': ((0.2860,), (0.3530,)),
}
DEFAULT_AUGMENT = {'fashion-mnist': 'none'}  # CIFAR and synthetic: crop + flip, as the official code
# Keys that may change between a run and its resumption without changing what is computed so far.
RESUMABLE_CHANGES = ('training.resume', 'training.stop_after', 'training.progress', 'training.epochs',
                     'training.device', 'data.dir', 'data.source', 'data.download', 'data.force', 'output.dir',
                     'output.overwrite', 'output.tensorboard', 'evaluation.')


def resolve_device(name):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"training.device={name!r} but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def lr_at(cfg, epoch):
    """Learning rate of 1-based `epoch`: piecewise (x gamma from each milestone on) or cosine to 0."""
    lr = cfg.optimizer.lr
    if cfg.schedule.kind == 'cosine':
        return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.training.epochs))
    milestones = [int(m) for m in cfg.schedule.milestones.split(',') if m.strip()]
    return lr * cfg.schedule.gamma ** sum(epoch >= m for m in milestones)


def synthetic_spec(d):
    return SyntheticSpec(d.synthetic_n_train, d.synthetic_n_test, d.synthetic_classes,
                         tuple(int(s) for s in d.synthetic_shape.split(',')), d.synthetic_seed)


def num_classes_of(d):
    return d.synthetic_classes if d.dataset == 'synthetic' else NUM_CLASSES[d.dataset]


def convert_data(cfg, log=print):
    d = cfg.data
    return convert(d.dataset, d.dir, source=d.source, download=d.download, force=d.force,
                   synthetic=synthetic_spec(d), log=log)


def labels_by_index(beton_path):
    """The label of every training image, ordered by its beton index (soft-label init, label noise)."""
    from ffcv.reader import Reader
    reader = Reader(beton_path)
    meta = reader.metadata
    label = meta[f"f{reader.field_names.index('label')}"]  # IntField metadata: the value itself
    index = meta[f"f{reader.field_names.index('index')}"]
    labels = np.empty(len(index), dtype=np.int64)
    labels[index] = label
    return torch.from_numpy(labels)


def open_data(cfg, device, log=print):
    d = cfg.data
    train_path, test_path = convert_data(cfg, log)
    augment = DEFAULT_AUGMENT.get(d.dataset, 'crop_flip') if d.augment == 'auto' else d.augment
    loaders = make_loaders(train_path, test_path, kind=d.loader, batch_size=cfg.training.batch_size,
                           eval_batch_size=cfg.evaluation.batch_size, device=device, seed=cfg.training.seed,
                           val_size=d.val_size, split_seed=d.split_seed, train_limit=d.train_limit,
                           crop_padding=d.crop_padding if 'crop' in augment else 0, flip='flip' in augment,
                           num_workers=d.num_workers, dtype=dtype_of(cfg, device))
    return loaders, train_path


def dtype_of(cfg, device):
    return param_dtype(resolve_precision(cfg.training.precision, device, cfg.training.engine))


def build(cfg, in_channels, device):
    m, d = cfg.model, cfg.data
    stats = DATASET_STATS.get(d.dataset, ((0.5,) * in_channels, (0.25,) * in_channels))
    mean = tuple(float(v) for v in m.mean.split(',')) if m.mean else stats[0]
    std = tuple(float(v) for v in m.std.split(',')) if m.std else stats[1]
    model = build_model(m.arch, num_classes_of(d), in_channels=in_channels, width=m.width,
                        normalize=m.normalize, mean=mean, std=std)
    return model.to(device, dtype_of(cfg, device))


def run_dir_of(cfg):
    c = cfg
    name = c.output.name or f'{c.data.dataset}-{c.model.arch}-{c.method.name}-s{c.training.seed}'
    return os.path.join(c.output.dir, name)


def prepare_run_dir(cfg, params, log):
    """Refuse to mix two runs in one folder; on resume, refuse a config that would change the results."""
    run_dir = run_dir_of(cfg)
    last = os.path.join(run_dir, 'checkpoints', 'last.pt')
    existing = os.path.join(run_dir, 'params.json')
    if os.path.exists(existing) and cfg.output.overwrite:
        log(f'{run_dir}: overwrite=true, starting afresh')
        shutil.rmtree(run_dir)
    elif os.path.exists(existing) and not cfg.training.resume:
        raise UserError(f'{run_dir}: a run is already there; --training.resume=true continues it, '
                        '--output.overwrite=true starts afresh, --output.name=... picks another folder')
    elif os.path.exists(existing):
        with open(existing) as f:
            old = json.load(f)
        changed = [k for k in params if old.get(k) != params[k] and not k.startswith(RESUMABLE_CHANGES)]
        if changed:
            raise UserError(f'{run_dir}: cannot resume with a different config: '
                            + ', '.join(f'{k} {old.get(k)!r} -> {params[k]!r}' for k in changed))
    os.makedirs(run_dir, exist_ok=True)
    write_json_atomic(os.path.join(run_dir, 'params.json'), params)
    return run_dir, (last if cfg.training.resume and os.path.exists(last) else None)


def progress_bar(cfg, loader, epoch, total=None):
    on = cfg.training.progress == 'on' or (cfg.training.progress == 'auto' and sys.stderr.isatty())
    return tqdm(loader, total=total or len(loader), desc=f'epoch {epoch}', disable=not on, leave=False,
                file=sys.stderr, unit='batch', dynamic_ncols=True)


def show_progress(bar, i, meters, t0):
    """Every 20 steps of a visible bar: mean training loss so far (over the meters: packed seeds) and images/s
    (all meters). A host read, so only then."""
    if not bar.disable and i % 20 == 19:
        images = sum(m.images for m in meters)
        bar.set_postfix(loss=f'{sum(m.sums[0].item() for m in meters) / images:.4f}',
                        img_s=f'{images / (time.perf_counter() - t0):.0f}')


def evaluate_epoch(cfg, model, loaders):
    """Per-epoch clean and PGD accuracy on the test subset and on the validation split."""
    a = cfg.attack
    common = dict(attacks=('clean', 'pgd'), eps=a.eps / 255, step_size=a.step_size / 255,
                  pgd_steps=cfg.evaluation.pgd_steps)
    out = {}
    test = evaluate(model, loaders.test, max_examples=cfg.evaluation.subset, **common)
    out.update(test_clean_acc=test['clean'], test_pgd_acc=test['pgd'])
    if loaders.val is not None:
        val = evaluate(model, loaders.val, **common)
        out.update(val_clean_acc=val['clean'], val_pgd_acc=val['pgd'])
    return out


def uses_graphs(cfg, device):
    return cfg.training.engine == 'fast' and cfg.training.cuda_graphs and device.type == 'cuda'


def make_step(cfg, model, device, log):
    """(step function, model to evaluate with, autocast) for training.engine. The final table always uses the
    eager fp32 model, so the reported numbers never depend on the speed-ups."""
    t = cfg.training
    if t.engine == 'eager':
        return (lambda optimizer, *batch, **kw: train_step(model, optimizer, *batch, **kw)), model, \
            contextlib.nullcontext
    fast = FastStep(model, device, precision=t.precision, channels_last=t.channels_last, compile=t.compile,
                    cuda_graphs=t.cuda_graphs)
    if fast.graphed is not None:
        fast.graphed.log = log
    log(f'fast engine: precision {fast.precision}, channels_last {t.channels_last}, compile {t.compile}, '
        f'cuda_graphs {fast.graphed is not None}')
    return fast, fast.net, fast.autocast


class Run:
    """One run's state and the bookkeeping around its training steps: folder, data, model, optimizer, labels and
    soft labels, metrics log, best-so-far record. train() drives one Run; engine.packed_trainer drives several
    whose steps run packed. Built in the order that fixes the run's random stream: seed, data, model; restore()
    then loads a checkpoint to resume from, RNG state included."""

    def __init__(self, cfg, device, log=print, graphed=False):
        self.cfg, self.device, self.log = cfg, device, log
        self.params = config_mod.flat(cfg)
        self.run_dir, self.resume_from = prepare_run_dir(cfg, self.params, log)
        torch.manual_seed(cfg.training.seed)
        self.loaders, train_path = open_data(cfg, device, log)
        self.model = build(cfg, self.loaders.image_shape[0], device)
        o, m = cfg.optimizer, cfg.method
        self.optimizer = make_sgd(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                  weight_decay=o.weight_decay, nesterov=o.nesterov, device=device, graphed=graphed)
        self.method, self.attack = Method.from_cfg(m), attack_cfg_kwargs(cfg.attack)
        n_cls = num_classes_of(cfg.data)
        self.labels = corrupt_labels(labels_by_index(train_path), n_cls, m.label_noise, m.noise_rate,
                                     m.noise_seed).to(device)
        self.soft_labels = SoftLabels(self.labels, n_cls, dtype_of(cfg, device)) if self.method.name.startswith('sgls') else None
        self.metrics = MetricsLog(self.run_dir, tensorboard=cfg.output.tensorboard)
        self.best, self.start, self.epochs_this_run = {'val_pgd_acc': -1.0, 'epoch': 0}, 1, 0

    def restore(self):
        """Resume from the last checkpoint when there is one to resume from; then say what will run."""
        cfg, log = self.cfg, self.log
        if self.resume_from:
            state = checkpoint.load(self.resume_from, self.device)
            self.model.load_state_dict(state['model'])
            self.optimizer.load_state_dict(state['optimizer'])
            if self.soft_labels is not None:
                self.soft_labels.load_state_dict(state['soft_labels'])
            checkpoint.set_rng_state(state['rng'])
            self.best, self.start = state['best'], state['epoch'] + 1
            self.metrics.truncate_after(state['epoch'])
            log(f'{self.run_dir}: resuming after epoch {state["epoch"]}')
        else:
            self.metrics.truncate_after(0)
        log(f'{self.run_dir}: {self.method.name} {cfg.model.arch} on {cfg.data.dataset} '
            f'({len(self.loaders.train_indices)} train images, {self.loaders.num_train_total} in the beton), '
            f'{cfg.training.epochs} epochs, device {self.device}')

    def begin_epoch(self, epoch):
        lr = lr_at(self.cfg, epoch)
        set_lr(self.optimizer, lr)
        self.loaders.train.set_epoch(epoch)
        return lr

    def end_epoch(self, epoch, lr, meter, seconds, net, autocast):
        """Record, evaluate, checkpoint and log a finished epoch; True when training.stop_after says stop here."""
        cfg, device = self.cfg, self.device
        record = meter.read()
        if self.method.name == 'ce':
            record['train_robust_acc'] = None  # standard training has no training adversarial examples
        record = {'epoch': epoch, 'lr': lr, **record, 'epoch_time_s': seconds,
                  'images_per_s': record['images'] / seconds}
        if self.soft_labels is not None:  # 1.0 while the table is one-hot; falls as SGLS softens it
            rows = self.soft_labels.table[torch.as_tensor(self.loaders.train_indices, device=device)]
            record['soft_label_max_mean'] = rows.max(1).values.mean().item()
        if epoch % cfg.evaluation.every == 0 or epoch == cfg.training.epochs:
            with autocast():
                record.update(evaluate_epoch(cfg, net, self.loaders))
            if record.get('train_robust_acc') is not None:
                record['robust_gap'] = record['train_robust_acc'] - record['test_pgd_acc']
            selector = record.get('val_pgd_acc', record['test_pgd_acc'])  # test only when there is no val split
            if selector > self.best['val_pgd_acc']:
                self.best = {'val_pgd_acc': selector, 'epoch': epoch}
                checkpoint.save(os.path.join(self.run_dir, 'checkpoints', 'best.pt'), model=self.model,
                                params=self.params, epoch=epoch, with_rng=False)
        checkpoint.save(os.path.join(self.run_dir, 'checkpoints', 'last.pt'), model=self.model, params=self.params,
                        epoch=epoch, optimizer=self.optimizer, soft_labels=self.soft_labels, best=self.best)
        self.metrics.append(record)
        self.log(epoch_line(record))
        self.epochs_this_run += 1
        stop_after = cfg.training.stop_after
        if stop_after and self.epochs_this_run >= stop_after and epoch < cfg.training.epochs:
            self.log(f'{self.run_dir}: stopped after {self.epochs_this_run} epochs (training.stop_after); '
                     'resume to continue')
            return True
        return False

    def finish(self):
        final_table(self.cfg, self.model, self.loaders, self.run_dir, self.params, self.best, self.device, self.log)


def train(cfg, log=print):
    """Train one run to the end (or to training.stop_after epochs); returns its folder."""
    device = resolve_device(cfg.training.device)
    run = Run(cfg, device, log, graphed=uses_graphs(cfg, device))
    step, net, autocast = make_step(cfg, run.model, device, log)
    run.restore()
    try:
        for epoch in range(run.start, cfg.training.epochs + 1):
            lr = run.begin_epoch(epoch)
            meter = EpochMeter(device)
            t0 = time.perf_counter()
            bar = progress_bar(cfg, run.loaders.train, epoch)
            for i, (x, _, idx) in enumerate(bar):
                y = run.labels[idx]  # the (possibly noise-corrupted) label of each image, by index
                step(run.optimizer, x, y, idx, method=run.method, attack=run.attack, soft_labels=run.soft_labels,
                     epoch=epoch, meter=meter)
                show_progress(bar, i, [meter], t0)
                if i == 0 and run.epochs_this_run == 0 and cfg.training.engine == 'fast':
                    meter.sums.sum().item()  # once per run: wait for the first step, which includes compilation
                    log(f'first fast step (compilation included): {time.perf_counter() - t0:.1f}s')
            if run.end_epoch(epoch, lr, meter, time.perf_counter() - t0, net, autocast):
                return run.run_dir
        run.finish()
        return run.run_dir
    finally:
        run.metrics.close()


def epoch_line(r):
    def f(key, fmt='{:.2f}'):
        return fmt.format(r[key]) if r.get(key) is not None else '-'
    return (f"epoch {r['epoch']:>3} lr {r['lr']:.4g} loss {f('train_loss', '{:.4f}')} "
            f"train clean/rob {f('train_clean_acc')}/{f('train_robust_acc')} "
            f"test clean/pgd {f('test_clean_acc')}/{f('test_pgd_acc')} val pgd {f('val_pgd_acc')} "
            f"|g| {f('grad_norm', '{:.3f}')} {f('epoch_time_s', '{:.1f}')}s {f('images_per_s', '{:.0f}')} img/s")


def final_settings(cfg, n):
    e, a = cfg.evaluation, cfg.attack
    settings = {'eps': a.eps / 255, 'step_size': a.step_size / 255, 'pgd_steps': e.final_pgd_steps, 'n': n}
    if e.cw_steps:
        settings['cw_steps'] = e.cw_steps
    if e.autoattack:
        settings.update(autoattack_version=e.autoattack_version, autoattack_n=min(e.autoattack_n or n, n))
    return settings


def evaluate_final(cfg, model, loader):
    """One row of the final table: clean, FGSM, PGD-20, CW-inf, AutoAttack and the per-example worst case."""
    e, a = cfg.evaluation, cfg.attack
    attacks = ['clean'] + ['fgsm'] * e.fgsm + ['pgd'] + ['cw'] * (e.cw_steps > 0)
    same_n = e.autoattack and e.autoattack_n in (0, e.final_n)
    common = dict(eps=a.eps / 255, step_size=a.step_size / 255, pgd_steps=e.final_pgd_steps,
                  cw_steps=max(e.cw_steps, 1), autoattack_version=e.autoattack_version)
    row = evaluate(model, loader, attacks=tuple(attacks + ['autoattack'] * same_n), max_examples=e.final_n,
                   **common)
    if e.autoattack and not same_n:  # AutoAttack on its own (smaller) subset; 'worst' then excludes it
        row['autoattack'] = evaluate(model, loader, attacks=('autoattack',), max_examples=e.autoattack_n,
                                     **common)['autoattack']
    return row


def final_table(cfg, model, loaders, run_dir, params, best, device, log):
    rows = {}
    if best['epoch'] > 0:
        best_model = build(cfg, loaders.image_shape[0], device)
        best_model.load_state_dict(checkpoint.load(os.path.join(run_dir, 'checkpoints', 'best.pt'),
                                                   device)['model'])
        rows['best'] = {'epoch': best['epoch'], **evaluate_final(cfg, best_model, loaders.test)}
    rows['final'] = {'epoch': cfg.training.epochs, **evaluate_final(cfg, model, loaders.test)}
    settings = final_settings(cfg, rows['final']['n'])
    settings['best_selected_on'] = 'validation PGD' if loaders.val is not None else 'test PGD (no validation split)'
    table = format_table(rows, settings)
    write_final(run_dir, {'rows': rows, 'settings': settings, 'method': cfg.method.name,
                          'seed': cfg.training.seed}, table)
    log(f'{run_dir}/final.md:\n{table}')


def eval_checkpoint(path, cli_args=(), log=print):
    """`run.py eval --checkpoint PATH`: the final-table evaluation of a saved model, with its own config."""
    state = checkpoint.load(path)
    cfg = config_mod.load(cli_args=cli_args, base=state['params'])
    device = resolve_device(cfg.training.device)
    loaders, _ = open_data(cfg, device, log)
    model = build(cfg, loaders.image_shape[0], device)
    model.load_state_dict(state['model'])
    row = {'epoch': state['epoch'], **evaluate_final(cfg, model, loaders.test)}
    settings = final_settings(cfg, row['n'])
    table = format_table({os.path.basename(path): row}, settings)
    stem = os.path.splitext(path)[0]
    write_json_atomic(stem + '-eval.json', {'checkpoint': path, 'row': row, 'settings': settings})
    write_text_atomic(stem + '-eval.md', table + '\n')
    log(f'{stem}-eval.md:\n{table}')
    return row
