"""One run's state: its folder (and the rules that keep two runs out of one), its parts, resume, and the
bookkeeping that closes each epoch (metrics, evaluation, divergence check, best and last checkpoints).

The epoch loop (engine.train.loop) drives one Run, or K Runs whose steps run packed; it never touches a file. The
caller owns the run folder (writers.run_lock.RunLock) before it builds a Run, and everything that can fail on bad
input (data, labels, model) is built before the Run writes anything there. In a data-parallel run every rank
builds the Run and trains (engine.data_parallel); rank 0 alone prepares and writes the folder.
"""
import json
import math
import os
import shutil

import torch

from engine import checkpoint, config as config_mod
from engine.checkpoint import DataIdentity, Progress, RandomState
from engine.data.loaders import labels_by_index
from engine.data_parallel import sync_batchnorm
from engine.distributed import by_writer
from engine.errors import RunFailed, UserError
from engine.evaluate import evaluate
from engine.methods import corrupt_labels
from engine.provenance import provenance
from engine.step import make_sgd
from engine.teacher import load_teacher
from engine.train.build import attack_budget, dtype_of, method_of, model_of, num_classes_of, open_data
from engine.train.final import final_table
from engine.weight_ema import WeightEMA
from writers.atomic import remove_stale_temps
from writers.run_files import (RUN_FILES, ConsoleLog, MetricsLog, append_provenance, read_failed, write_failed,
                               write_params)
from writers.run_lock import LOCK_NAME
from writers.tables import epoch_line

# Keys that may change between a run and its resumption without changing what it computes: where it runs and
# writes, how it shows progress, and what the final table (which states its settings) measures. training.epochs
# only under a schedule that does not depend on it (refused_changes).
RESUMABLE_CHANGES = ('training.resume', 'training.stop_after', 'training.progress', 'training.device', 'data.dir',
                     'data.source', 'data.download', 'data.force', 'data.num_workers', 'output.dir', 'output.name',
                     'output.overwrite', 'output.tensorboard', 'evaluation.final_n', 'evaluation.final_pgd_steps',
                     'evaluation.cw_steps', 'evaluation.fgsm', 'evaluation.autoattack', 'evaluation.autoattack_n',
                     'evaluation.autoattack_version', 'evaluation.batch_size', 'evaluation.presets', 'evaluation.seed')
# The folders of RUN_FILES: the engine writes every file in them (per-epoch scalars, per-example results, run.py eval
# of the run's checkpoints), so overwrite removes them whole.
ENGINE_FOLDERS = ('tensorboard', 'examples', 'eval')
# A run has started once one of these exists: its folder then holds results that a new run must not mix into.
STARTED = ('checkpoints/last.pt', 'checkpoints/pending.pt', 'final.json', 'failed.json')
CHECKPOINT_FILES = ('last.pt', 'best.pt', 'best-ema.pt', 'pending.pt', 'last-eval.json', 'last-eval.md',
                    'best-eval.json', 'best-eval.md', 'best-ema-eval.json', 'best-ema-eval.md')


def run_dir_of(cfg):
    c = cfg
    name = c.output.name or f'{c.data.dataset}-{c.model.arch}-{c.method.name}-s{c.training.seed}'
    return os.path.join(c.output.dir, name)


def _typed(key, value, where):
    try:
        return config_mod.check_value(key, value, where)
    except UserError:
        return value  # not a valid value today: compared as saved, so certainly a change


def refused_changes(old_params, params):
    """(key, old, new) of every change that would alter what the run computed or will compute. Values are
    compared typed (a list saved as '100,150' equals [100, 150]); a key the old run did not know had its default.
    training.epochs may grow or shrink under the piecewise schedule when every epoch so far was evaluated as it
    would be in a run planned that long."""
    old = {key: _typed(key, old_params.get(key, config_mod.KEYS[key].default), 'saved params') for key in params}
    new = {key: config_mod.check_value(key, value, 'params') for key, value in params.items()}
    epochs = 'training.epochs'
    changed = [(k, old[k], new[k]) for k in params
               if not k.startswith(RESUMABLE_CHANGES) and k != epochs and old[k] != new[k]]
    if old[epochs] != new[epochs] and (new['schedule.kind'] != 'piecewise' or (
            old[epochs] % new['evaluation.every'] and new['evaluation.every'] > 1)):
        changed.append((epochs, old[epochs], new[epochs]))
    return changed


def describe_changes(changed):
    return ', '.join(f'{k} {old!r} -> {new!r}' for k, old, new in changed)


def clear_run(run_dir, log):
    """--output.overwrite=true: remove what this engine wrote into run_dir, which must be a run of this engine;
    anything else there stays (and is named)."""
    try:
        with open(os.path.join(run_dir, 'params.json'), encoding='utf-8') as f:
            params = json.load(f)
        ours = isinstance(params, dict) and 'method.name' in params
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise UserError(f'{run_dir}: not a run folder of this engine (no readable params.json); overwrite removes '
                        'only runs; pick another --output.name')
    checkpoints = os.path.join(run_dir, 'checkpoints')
    for name in CHECKPOINT_FILES if os.path.isdir(checkpoints) else ():
        if os.path.isfile(os.path.join(checkpoints, name)):
            os.remove(os.path.join(checkpoints, name))
    for name in RUN_FILES:
        path = os.path.join(run_dir, name)
        if name in ENGINE_FOLDERS and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.isfile(path) or os.path.islink(path):
            os.remove(path)
    left = sorted(set(os.listdir(run_dir)) - {LOCK_NAME, 'checkpoints'})
    if os.path.isdir(checkpoints):
        left += [f'checkpoints/{name}' for name in sorted(os.listdir(checkpoints))]
        if not os.listdir(checkpoints):
            os.rmdir(checkpoints)
    log(f'{run_dir}: overwrite=true, starting afresh' + (f' (left there, not written by the engine: '
                                                          f'{", ".join(left)})' if left else ''))


def prepare_run_dir(run_dir, cfg, params, log):
    """Called with the folder owned: refuse to mix two runs in one folder and to resume what changes the
    results; clear it for overwrite. Returns the checkpoint to resume from, or None."""
    for folder in (run_dir, os.path.join(run_dir, 'checkpoints')):  # what killed writers of this run left
        remove_stale_temps(folder, log)
    last = os.path.join(run_dir, 'checkpoints', 'last.pt')
    started = [name for name in STARTED if os.path.exists(os.path.join(run_dir, name))]
    failed = read_failed(run_dir)
    foreign = sorted(set(os.listdir(run_dir)) - {LOCK_NAME, *RUN_FILES})
    if not os.path.exists(os.path.join(run_dir, 'params.json')) and foreign:
        raise UserError(f'{run_dir}: exists and is not a run folder of this engine (holds {", ".join(foreign[:5])}); '
                        'pick another --output.name or --output.dir')
    if cfg.output.overwrite and os.path.exists(os.path.join(run_dir, 'params.json')):
        clear_run(run_dir, log)
        started, failed = [], None
    elif started and not cfg.training.resume:
        raise UserError(f'{run_dir}: a run is already there; --training.resume=true continues it, '
                        '--output.overwrite=true starts afresh, --output.name=... picks another folder')
    elif failed is not None:
        raise UserError(f"{run_dir}: this run failed at epoch {failed.get('epoch')} ({failed.get('reason')}: "
                        f"{failed.get('value')}; failed.json); --output.overwrite=true starts it afresh")
    elif started:
        with open(os.path.join(run_dir, 'params.json'), encoding='utf-8') as f:
            changed = refused_changes(json.load(f), params)
        if changed:
            raise UserError(f'{run_dir}: cannot resume with a different config: {describe_changes(changed)}')
    elif os.path.exists(os.path.join(run_dir, 'params.json')):
        log(f'{run_dir}: an earlier start never finished an epoch; starting afresh')
    write_params(run_dir, params)
    return last if started and os.path.exists(last) else None


def evaluate_epoch(cfg, model, loaders):
    """Per-epoch clean and PGD accuracy on the test subset and on the validation split."""
    budget = attack_budget(cfg)
    common = dict(attacks=('clean', 'pgd'), eps=budget['eps'], step_size=budget['step_size'],
                  pgd_steps=cfg.evaluation.pgd_steps)
    out = {}
    test = evaluate(model, loaders.test, max_examples=cfg.evaluation.subset, **common)
    out.update(test_clean_acc=test['clean'], test_pgd_acc=test['pgd'])
    if loaders.val is not None:
        val = evaluate(model, loaders.val, **common)
        out.update(val_clean_acc=val['clean'], val_pgd_acc=val['pgd'])
    return out


class Run:
    """One run: config, folder, data, model, optimizer, method, labels and soft labels, metrics log, and its
    checkpoint parts. Built in the order that fixes the run's random stream: seed, data, model; then (all input
    checked) the folder is prepared; restore() loads a checkpoint to resume from, RNG state included. The caller
    owns the folder (RunLock) and calls close(). parallel: this rank's engine.data_parallel.DataParallel in a
    data-parallel run (then only its rank 0 `writes`), else None."""

    def __init__(self, cfg, device, log=print, graphed=False, parallel=None):
        self.cfg, self.device, self.parallel = cfg, device, parallel
        self.writes = parallel is None or parallel.writes
        self.params = config_mod.flat(cfg)
        self.run_dir = run_dir_of(cfg)
        torch.manual_seed(cfg.training.seed)
        self.loaders, (train_path, test_path) = open_data(cfg, device, log)
        self.model = model_of(cfg, self.loaders.image_shape[0], device)
        if parallel is not None:
            self.loaders.train.shard(parallel.rank, parallel.world)
            if cfg.distributed.sync_bn:
                sync_batchnorm(self.model)
        o, m = cfg.optimizer, cfg.method
        self.optimizer = make_sgd(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                  weight_decay=o.weight_decay, nesterov=o.nesterov, device=device, graphed=graphed)
        self.method, self.attack = method_of(cfg), attack_budget(cfg)
        n_cls = num_classes_of(cfg)
        train_labels = labels_by_index(train_path)
        self.labels = corrupt_labels(train_labels, n_cls, m.label_noise, m.noise_rate, m.noise_seed).to(device)
        self.soft_labels = (self.method.table_class(self.labels, n_cls, dtype_of(cfg, device), ranks=parallel)
                            if self.method.soft_labels else None)
        self.teacher = teacher_of(cfg, self.method, self.loaders.image_shape[0], device)
        t = cfg.training
        self.ema = WeightEMA(self.model, t.weight_ema_decay) if t.weight_ema else None
        self.progress = Progress()
        self.parts = {'model': self.model, 'optimizer': self.optimizer, 'rng': RandomState(),
                      'progress': self.progress, 'data': DataIdentity(train_labels, labels_by_index(test_path))}
        for name, part in (('soft_labels', self.soft_labels), ('ema', self.ema),
                           ('teacher', None if self.teacher is None else self.teacher.reference())):
            if part is not None:
                self.parts[name] = part
        # Everything above checks the input; only now is anything written into the folder.
        self.resume_from = by_writer(parallel, lambda: prepare_run_dir(self.run_dir, cfg, self.params, log))
        self.log = ConsoleLog(self.run_dir, log) if self.writes else log
        self.metrics = MetricsLog(self.run_dir, tensorboard=cfg.output.tensorboard) if self.writes else None
        self.epochs_this_run = 0
        self.grouped = False  # packed: checkpoints go through pending.pt (checkpoint.settle_group)

    @property
    def start(self):
        """The first epoch to train."""
        return self.progress.epoch + 1

    def restore(self):
        """Resume from the last checkpoint when there is one to resume from (refusing one written by another
        config, on other data, or holding non-finite weights); then say what will run."""
        cfg, log = self.cfg, self.log
        if self.resume_from:
            state = checkpoint.load(self.resume_from, self.device)
            changed = refused_changes(state['params'], self.params)
            if changed:
                raise UserError(f'{self.resume_from}: written by a run with another config: '
                                f'{describe_changes(changed)}; not resumable here')
            if state['params'].get('training.device', cfg.training.device) != cfg.training.device:
                log(f"{self.run_dir}: resuming on training.device={cfg.training.device} (trained so far on "
                    f"{state['params']['training.device']}): later epochs use that device's kernels")
            if 'data' not in state:
                log(f'{self.resume_from}: written before checkpoints held a data fingerprint; the data is not '
                    'checked')
            checkpoint.restore(self.resume_from, self.parts, self.device, optional=('data',), state=state)
            bad = non_finite(self.model)
            if bad:
                raise UserError(f'{self.resume_from}: non-finite weights ({", ".join(bad[:3])}); not resumable')
            if self.progress.epoch > cfg.training.epochs:
                raise UserError(f'{self.resume_from}: holds epoch {self.progress.epoch}, past '
                                f'training.epochs={cfg.training.epochs}')
            log(f'{self.run_dir}: resuming after epoch {self.progress.epoch}')
        if self.writes:
            self.metrics.truncate_after(self.progress.epoch, log)  # a kill can land between checkpoint and log
            ranks = {} if self.parallel is None else {'data_parallel_ranks': self.parallel.world}
            append_provenance(self.run_dir, provenance(self.device, resumed_after_epoch=self.progress.epoch, **ranks))
        log(f'{self.run_dir}: {self.method.name} {cfg.model.arch} on {cfg.data.dataset} '
            f'({len(self.loaders.train_indices)} train images, {self.loaders.num_train_total} in the beton), '
            f'{cfg.training.epochs} epochs, device {self.device}')

    def end_epoch(self, epoch, lr, stats, seconds, net, autocast):
        """Record, evaluate, checkpoint and log a finished epoch. stats: the loop's sums for this run (loss x n,
        robust-correct, clean-correct, grad-norm sum, images, steps). True when training.stop_after says stop.
        Raises RunFailed, writing failed.json and no checkpoint, when the loss or a weight is not finite.
        Data-parallel: every rank evaluates (their random streams stay one), rank 0 alone writes."""
        cfg, device = self.cfg, self.device
        if self.parallel is not None:
            self.parallel.share_buffers(self.model)
        self.check_finite(epoch, stats)
        images, n = stats['images'], max(stats['images'], 1)
        record = {'epoch': epoch, 'lr': lr, 'train_loss': stats['loss'] / n,
                  'train_robust_acc': 100 * stats['robust'] / n if self.method.attack is not None else None,
                  'train_clean_acc': 100 * stats['clean'] / n if cfg.training.clean_acc else None,
                  'grad_norm': stats['grad_norm'] / max(stats['steps'], 1),
                  'images': images, 'epoch_time_s': seconds, 'images_per_s': images / seconds}
        if self.soft_labels is not None:  # 1.0 while the table is one-hot; falls as SGLS softens it
            rows = self.soft_labels.table[torch.as_tensor(self.loaders.train_indices, device=device)]
            record['soft_label_max_mean'] = rows.max(1).values.mean().item()
        self.progress.epoch = epoch
        if epoch % cfg.evaluation.every == 0 or epoch == cfg.training.epochs:
            with autocast():
                record.update(evaluate_epoch(cfg, net, self.loaders))
            if record.get('train_robust_acc') is not None:
                record['robust_gap'] = record['train_robust_acc'] - record['test_pgd_acc']
            self.select_best(epoch, record, self.model, '')
            if self.ema is not None:  # the averaged weights: evaluated and selected on their own, their attack
                # noise drawn from a fork of the random stream, so the model trains exactly as without the EMA
                with autocast(), torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
                    record.update({f'ema_{k}': v for k, v in evaluate_epoch(cfg, self.ema.model, self.loaders).items()})
                self.select_best(epoch, record, self.ema.model, 'ema_')
        if self.writes:
            checkpoint.save(self.checkpoint_path('pending' if self.grouped else 'last'), self.parts, self.params)
            self.metrics.append(record)
        self.log(epoch_line(record))
        self.epochs_this_run += 1
        stop_after = cfg.training.stop_after
        if stop_after and self.epochs_this_run >= stop_after and epoch < cfg.training.epochs:
            self.log(f'{self.run_dir}: stopped after {self.epochs_this_run} epochs (training.stop_after); '
                     'resume to continue')
            return True
        return False

    def select_best(self, epoch, record, model, prefix):
        """Keep `model` as best(-ema).pt when its validation PGD accuracy (test PGD without a validation split)
        beats its best so far; prefix '' for the model, 'ema_' for its weight EMA."""
        selector = record.get(f'{prefix}val_pgd_acc', record[f'{prefix}test_pgd_acc'])
        attribute = 'best_ema' if prefix else 'best'
        if selector > getattr(self.progress, attribute)['val_pgd_acc']:
            setattr(self.progress, attribute, {'val_pgd_acc': selector, 'epoch': epoch})
            if self.writes:
                checkpoint.save(self.checkpoint_path('best-ema' if prefix else 'best'),
                                {'model': model, 'progress': self.progress}, self.params)

    def check_finite(self, epoch, stats):
        """Divergence: the epoch's loss and gradient norm (already on the host) and every weight and buffer (one
        device read per epoch). On failure the last good checkpoints stay as they are."""
        bad = [(f'train {key}', stats[key]) for key in ('loss', 'grad_norm') if not math.isfinite(stats[key])]
        if not bad:
            bad = [('weights', name) for name in non_finite(self.model)[:3]]
        if bad:
            what, value = bad[0]
            if self.writes:
                write_failed(self.run_dir, epoch, f'non-finite {what}', value)
            self.log(f'{self.run_dir}: FAILED at epoch {epoch}: non-finite {what} ({value}); the checkpoints of '
                     f'epoch {self.progress.epoch} are kept, failed.json marks the run')
            raise RunFailed(f'{self.run_dir}: training diverged at epoch {epoch}: non-finite {what} ({value}); '
                            f'last good checkpoint: epoch {self.progress.epoch} (lower optimizer.lr?)')

    def commit(self):
        """Packed: phase 2 of the group checkpoint (checkpoint.settle_group), once every run wrote pending.pt."""
        if self.grouped and os.path.exists(self.checkpoint_path('pending')):
            os.replace(self.checkpoint_path('pending'), self.checkpoint_path('last'))

    def checkpoint_path(self, which):
        return os.path.join(self.run_dir, 'checkpoints', f'{which}.pt')

    def finish(self):
        if self.writes:  # the other ranks of a data-parallel run are done
            final_table(self.cfg, self.model, self.loaders, self.run_dir, self.progress.best, self.device, self.log,
                        ema=self.ema and self.ema.model, best_ema=self.progress.best_ema)

    def close(self):
        if self.writes:
            self.metrics.close()
            self.log.close()


def teacher_of(cfg, method, in_channels, device):
    """A distilling method's frozen teacher (method.teacher; engine.teacher), or None for the other methods."""
    if not method.distills:
        return None
    m = cfg.method
    if not m.teacher:
        raise UserError(f'method {method.name} distils from a teacher: set --method.teacher=PATH (a checkpoint of '
                        'this engine, or a state dict with --method.teacher_arch)')
    return load_teacher(m.teacher, arch=m.teacher_arch, width=m.teacher_width, num_classes=num_classes_of(cfg),
                        in_channels=in_channels, device=device, dtype=dtype_of(cfg, device))


def non_finite(model):
    """Names of the model's floating-point weights and buffers holding NaN or infinity (one host read when none)."""
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    if torch.stack([v.isfinite().all() for v in state.values()]).all().item():
        return []
    return [k for k, v in state.items() if not v.isfinite().all()]
