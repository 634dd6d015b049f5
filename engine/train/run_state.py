"""One run's state: its folder (and the rules that keep two runs out of one), its parts, resume, and the
bookkeeping that closes each epoch (metrics, evaluation, best and last checkpoints).

The epoch loop (engine.train.loop) drives one Run, or K Runs whose steps run packed; it never touches a file.
"""
import json
import os
import shutil

import torch

from engine import checkpoint, config as config_mod
from engine.checkpoint import Progress, RandomState
from engine.data.loaders import labels_by_index
from engine.errors import UserError
from engine.evaluate import evaluate
from engine.methods import corrupt_labels
from engine.soft_labels import SoftLabels
from engine.step import make_sgd
from engine.train.build import attack_budget, dtype_of, method_of, model_of, num_classes_of, open_data
from engine.train.final import final_table
from writers.run_files import MetricsLog, write_params
from writers.tables import epoch_line

# Keys that may change between a run and its resumption without changing what is computed so far.
RESUMABLE_CHANGES = ('training.resume', 'training.stop_after', 'training.progress', 'training.epochs',
                     'training.device', 'data.dir', 'data.source', 'data.download', 'data.force', 'output.dir',
                     'output.overwrite', 'output.tensorboard', 'evaluation.')


def run_dir_of(cfg):
    c = cfg
    name = c.output.name or f'{c.data.dataset}-{c.model.arch}-{c.method.name}-s{c.training.seed}'
    return os.path.join(c.output.dir, name)


def changed_keys(old_params, params):
    """Keys whose value would change what the run computes: compared as typed values (so a list saved as
    '100,150' equals [100, 150]); a key the old run did not know had its default."""
    changed = []
    for key, value in params.items():
        if key.startswith(RESUMABLE_CHANGES):
            continue
        old = old_params.get(key, config_mod.KEYS[key].default)
        try:
            old = config_mod.check_value(key, old, 'saved params')
        except UserError:
            pass  # not a valid value today: certainly a change
        new = config_mod.check_value(key, value, 'params')
        if old != new:
            changed.append((key, old, new))
    return changed


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
            changed = changed_keys(json.load(f), params)
        if changed:
            raise UserError(f'{run_dir}: cannot resume with a different config: '
                            + ', '.join(f'{k} {old!r} -> {new!r}' for k, old, new in changed))
    os.makedirs(run_dir, exist_ok=True)
    write_params(run_dir, params)
    return run_dir, (last if cfg.training.resume and os.path.exists(last) else None)


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
    checkpoint parts. Built in the order that fixes the run's random stream: seed, data, model; restore() then
    loads a checkpoint to resume from, RNG state included."""

    def __init__(self, cfg, device, log=print, graphed=False):
        self.cfg, self.device, self.log = cfg, device, log
        self.params = config_mod.flat(cfg)
        self.run_dir, self.resume_from = prepare_run_dir(cfg, self.params, log)
        torch.manual_seed(cfg.training.seed)
        self.loaders, train_path = open_data(cfg, device, log)
        self.model = model_of(cfg, self.loaders.image_shape[0], device)
        o, m = cfg.optimizer, cfg.method
        self.optimizer = make_sgd(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                  weight_decay=o.weight_decay, nesterov=o.nesterov, device=device, graphed=graphed)
        self.method, self.attack = method_of(cfg), attack_budget(cfg)
        n_cls = num_classes_of(cfg)
        self.labels = corrupt_labels(labels_by_index(train_path), n_cls, m.label_noise, m.noise_rate,
                                     m.noise_seed).to(device)
        self.soft_labels = SoftLabels(self.labels, n_cls, dtype_of(cfg, device)) if self.method.soft_labels else None
        self.progress = Progress()
        self.parts = {'model': self.model, 'optimizer': self.optimizer, 'rng': RandomState(),
                      'progress': self.progress}
        if self.soft_labels is not None:
            self.parts['soft_labels'] = self.soft_labels
        self.metrics = MetricsLog(self.run_dir, tensorboard=cfg.output.tensorboard)
        self.epochs_this_run = 0

    @property
    def start(self):
        """The first epoch to train."""
        return self.progress.epoch + 1

    def restore(self):
        """Resume from the last checkpoint when there is one to resume from; then say what will run."""
        cfg, log = self.cfg, self.log
        if self.resume_from:
            checkpoint.restore(self.resume_from, self.parts, self.device)
            log(f'{self.run_dir}: resuming after epoch {self.progress.epoch}')
        self.metrics.truncate_after(self.progress.epoch)  # a kill can land between the checkpoint and the log
        log(f'{self.run_dir}: {self.method.name} {cfg.model.arch} on {cfg.data.dataset} '
            f'({len(self.loaders.train_indices)} train images, {self.loaders.num_train_total} in the beton), '
            f'{cfg.training.epochs} epochs, device {self.device}')

    def end_epoch(self, epoch, lr, stats, seconds, net, autocast):
        """Record, evaluate, checkpoint and log a finished epoch. stats: the loop's sums for this run (loss x n,
        robust-correct, clean-correct, grad-norm sum, images, steps). True when training.stop_after says stop."""
        cfg, device = self.cfg, self.device
        images, n = stats['images'], max(stats['images'], 1)
        record = {'epoch': epoch, 'lr': lr, 'train_loss': stats['loss'] / n,
                  'train_robust_acc': 100 * stats['robust'] / n if self.method.attack is not None else None,
                  'train_clean_acc': 100 * stats['clean'] / n, 'grad_norm': stats['grad_norm'] / max(stats['steps'], 1),
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
            selector = record.get('val_pgd_acc', record['test_pgd_acc'])  # test only when there is no val split
            if selector > self.progress.best['val_pgd_acc']:
                self.progress.best = {'val_pgd_acc': selector, 'epoch': epoch}
                checkpoint.save(self.checkpoint_path('best'), {'model': self.model, 'progress': self.progress},
                                self.params)
        checkpoint.save(self.checkpoint_path('last'), self.parts, self.params)
        self.metrics.append(record)
        self.log(epoch_line(record))
        self.epochs_this_run += 1
        stop_after = cfg.training.stop_after
        if stop_after and self.epochs_this_run >= stop_after and epoch < cfg.training.epochs:
            self.log(f'{self.run_dir}: stopped after {self.epochs_this_run} epochs (training.stop_after); '
                     'resume to continue')
            return True
        return False

    def checkpoint_path(self, which):
        return os.path.join(self.run_dir, 'checkpoints', f'{which}.pt')

    def finish(self):
        final_table(self.cfg, self.model, self.loaders, self.run_dir, self.progress.best, self.device, self.log)
