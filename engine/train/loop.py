"""The epoch loop: one loop for one run or K runs of seeds trained packed as one model (sweep --pack K).

    for each epoch: learning rate, each run's data order -> steps (statistics summed on the device) ->
                    each run closes its epoch (metrics, evaluation, checkpoints)        -> the final tables

What differs between one run and packed seeds is the stepper: which model and optimizer train, how the runs'
batches become one, and how the packed state goes back into each run after an epoch. Packed seeds keep
everything they would have alone: their run folder, data order and augmentation (their own loaders),
initialization (each model built after its own torch.manual_seed), attack noise (their own random stream,
swapped in for their evaluation and checkpoint), BatchNorm statistics, momentum and soft labels (their slices of
the packed tensors), so a seed's checkpoint is its single run's. A packed group checkpoints as a group (every
seed's epoch in pending.pt, then all renamed onto last.pt; checkpoint.settle_group), so wherever a kill lands the
group resumes together, at one epoch, packed as before.
The device is read once per epoch (the meter, the divergence check) and once per evaluation. A run whose loss or
weights stop being finite fails at the end of that epoch (failed.json, RunFailed); packed, the other seeds go on.
"""
import contextlib
import os
import sys
import time

import torch
from tqdm import tqdm

from engine import checkpoint, config as config_mod
from engine.distributed import by_writer
from engine.errors import RunFailed, UserError
from engine.fast import FastStep
from engine.packing import (PackedSeeds, pack_models, pack_optimizer_state, seed_generator, seed_stream,
                            unpack_optimizer_state, unpack_state)
from engine.step import make_sgd, set_lr, train_step
from engine.train.build import lr_at, method_of, progress_on, resolve_device, uses_graphs
from engine.train.run_state import Run, run_dir_of
from engine.weight_ema import WeightEMA
from writers.run_lock import RunLock, RunOwned

# Keys that may differ between packed runs: what makes them different seeds, and where they write.
PER_SEED_KEYS = ('training.seed', 'output.name')


class EpochMeter:
    """Each run's summed step statistics over an epoch, on the device ([K, 4], engine.step.STATS); the image
    (per run) and step counts on the host. parallel: a data-parallel run's DataParallel, whose ranks' sums are
    added up when read."""

    def __init__(self, num_runs, device, parallel=None):
        self.sums = torch.zeros(num_runs, 4, dtype=torch.float64, device=device)
        self.images = self.steps = 0
        self.parallel = parallel

    def add(self, stats, n):
        self.sums += stats
        self.images += n
        self.steps += 1

    def read(self):
        """The one host sync of the epoch: per run, the sums with the counts."""
        if self.parallel is not None:
            self.sums, self.images = self.parallel.sum_epoch(self.sums, self.images)
        return [dict(loss=loss, robust=robust, clean=clean, grad_norm=grad, images=self.images, steps=self.steps)
                for loss, robust, clean, grad in self.sums.tolist()]


def fast_step(model, device, t, log, generators=()):
    """engine.fast.FastStep for `model` (one network or packed seeds, whose generators a CUDA graph captures) as
    the training section `t` configures it."""
    step = FastStep(model, device, precision=t.precision, channels_last=t.channels_last, compile=t.compile,
                    cuda_graphs=t.cuda_graphs, log=log, fold_bn=t.fold_bn, fused_attack=t.fused_attack,
                    generators=generators)
    log(f'fast engine: precision {step.precision}, channels_last {t.channels_last}, compile {t.compile}, '
        f'cuda_graphs {step.graphed is not None}, fold_bn {t.fold_bn}, fused_attack {t.fused_attack}')
    return step


class SingleStepper:
    """Trains one run's own model with its own optimizer, by the eager or the fast step (training.engine)."""

    def __init__(self, run, log):
        self.run, t = run, run.cfg.training
        self.fast = t.engine == 'fast'
        self.optimizer = run.optimizer
        if self.fast:
            self.step_fn = fast_step(run.model, run.device, t, log)
            self.net, self.autocast = self.step_fn.eval_net, self.step_fn.autocast
        else:
            self.step_fn = lambda optimizer, batch, **kw: train_step(run.model, optimizer, batch, **kw)
            self.net, self.autocast = run.model, contextlib.nullcontext
        self.options = {} if run.parallel is None else {'seeds': run.parallel.seeds}  # this rank's slice

    def batch(self, batches):
        (x, _, idx), = batches
        return x, self.run.labels[idx], idx  # the (possibly noise-corrupted) label of each image, by index

    def step(self, batch, epoch):
        run = self.run
        return self.step_fn(self.optimizer, batch, method=run.method, attack=run.attack,
                            soft_labels=run.soft_labels, epoch=epoch, clean_acc=run.cfg.training.clean_acc,
                            teacher=run.teacher, ema=run.ema, **self.options)

    def end_epoch(self):
        pass

    def seed(self, k):
        return contextlib.nullcontext()

    def eval_model(self, k):
        return self.net


class PackedStepper:
    """Trains K runs' models as one packed model (engine.packing) with one SGD over its parameters, by the eager
    or the fast step (training.engine; with CUDA graphs the seeds' generators are captured with the step); after
    each epoch the packed weights and optimizer state are split back into each run's model and optimizer."""

    def __init__(self, runs, generators, log):
        self.runs, self.generators, self.device = runs, generators, runs[0].device
        self.packed = pack_models([r.model for r in runs])
        cfg = runs[0].cfg
        o, t = cfg.optimizer, cfg.training
        self.optimizer = make_sgd(self.packed.parameters(), lr=o.lr, momentum=o.momentum,
                                  weight_decay=o.weight_decay, nesterov=o.nesterov, device=self.device,
                                  graphed=uses_graphs(cfg, self.device))
        self.optimizer.load_state_dict(pack_optimizer_state([r.optimizer.state_dict() for r in runs]))
        self.seeds = PackedSeeds(len(runs), generators)
        self.tables = [r.soft_labels for r in runs] if runs[0].soft_labels is not None else None
        # weight EMA: the packed model's, continued from each run's (elementwise, so K EMAs; engine.weight_ema)
        self.ema = (WeightEMA(self.packed, t.weight_ema_decay, average=pack_models([r.ema.model for r in runs]))
                    if runs[0].ema is not None else None)
        self.fast = t.engine == 'fast'
        if self.fast:
            self.step_fn = fast_step(self.packed, self.device, t, log, generators=generators)
            self.autocast = self.step_fn.autocast
        else:
            self.step_fn = lambda optimizer, batch, **kw: train_step(self.packed, optimizer, batch, **kw)
            self.autocast = contextlib.nullcontext

    def batch(self, batches):
        xs = torch.stack([x for x, _, _ in batches])  # a copy: FFCV may reuse its batch buffers
        idxs = torch.stack([idx for _, _, idx in batches])
        return xs, torch.stack([r.labels[idx] for r, (_, _, idx) in zip(self.runs, batches)]), idxs

    def step(self, batch, epoch):
        run = self.runs[0]
        return self.step_fn(self.optimizer, batch, method=run.method, attack=run.attack, soft_labels=self.tables,
                            epoch=epoch, seeds=self.seeds, clean_acc=run.cfg.training.clean_acc, ema=self.ema)

    def end_epoch(self):
        for run, model_state, optimizer_state in zip(self.runs, unpack_state(self.packed), unpack_optimizer_state(
                self.optimizer.state_dict(), len(self.runs))):
            run.model.load_state_dict(model_state)
            run.optimizer.load_state_dict(optimizer_state)
        for run, ema_state in zip(self.runs, unpack_state(self.ema.model) if self.ema is not None else ()):
            run.ema.load_state_dict(ema_state)

    def seed(self, k):
        """Seed k's random stream in the body: its evaluation noise and its checkpoint's RNG state."""
        return seed_stream(self.generators, k, self.device)

    def eval_model(self, k):
        return self.runs[k].model


def check_packable(cfgs):
    """Raise UserError unless the configs are one run apart from PER_SEED_KEYS."""
    flats = [config_mod.flat(c) for c in cfgs]
    differ = sorted({k for f in flats[1:] for k in f if f[k] != flats[0][k] and k not in PER_SEED_KEYS})
    if differ:
        raise UserError(f"packed seeds must share their config but for {', '.join(PER_SEED_KEYS)}; "
                        f"these differ: {', '.join(differ)}")
    if len({c.training.seed for c in cfgs}) != len(cfgs):
        raise UserError('packed seeds must be different seeds')
    method = method_of(cfgs[0])
    if not method.packable:
        raise UserError(f'--pack: method {method.name} cannot train as packed seeds: {method.not_packable_because}')


def progress_bar(cfg, batches, epoch, total, show=True):
    return tqdm(batches, total=total, desc=f'epoch {epoch}', disable=not (show and progress_on(cfg)), leave=False,
                file=sys.stderr, unit='batch', dynamic_ncols=True)


def show_progress(bar, i, meter, t0):
    """Every 20 steps of a visible bar: mean training loss so far (over the runs) and images/s (all runs).
    A host read, so only then."""
    if not bar.disable and i % 20 == 19:
        images = meter.images * meter.sums.shape[0]
        bar.set_postfix(loss=f'{meter.sums[:, 0].sum().item() / images:.4f}',
                        img_s=f'{images / (time.perf_counter() - t0):.0f}')


def train_runs(runs, stepper, log):
    """The epoch loop over runs (one, or the packed seeds of stepper) from their start epoch to the end or to
    training.stop_after; then each run's final table. Returns the folders of the runs that did not fail; raises
    RunFailed (after the others are done) naming those that did."""
    cfg = runs[0].cfg
    failed = {}
    stop = False
    for epoch in range(runs[0].start, cfg.training.epochs + 1):
        lr = lr_at(cfg, epoch)
        set_lr(stepper.optimizer, lr)
        for run in runs:
            run.loaders.train.set_epoch(epoch)
            run.method.begin_epoch(epoch)  # epoch-dependent values a captured step reads (TE's ramp weight)
        meter = EpochMeter(len(runs), runs[0].device, runs[0].parallel)
        t0 = time.perf_counter()
        bar = progress_bar(cfg, zip(*(r.loaders.train for r in runs)), epoch, total=len(runs[0].loaders.train),
                           show=runs[0].writes)
        for i, batches in enumerate(bar):
            batch = stepper.batch(batches)
            meter.add(stepper.step(batch, epoch), batch[1].shape[-1])
            show_progress(bar, i, meter, t0)
            if i == 0 and stepper.fast and runs[0].epochs_this_run == 0:
                meter.sums.sum().item()  # once per run: wait for the first step, which includes compilation
                log(f'first fast step (compilation included): {time.perf_counter() - t0:.1f}s')
        seconds = time.perf_counter() - t0
        stepper.end_epoch()
        for k, (run, stats) in enumerate(zip(runs, meter.read())):
            if k not in failed:  # a failed seed's slice of a packed model trains on, unread: it touches no other
                with stepper.seed(k):
                    try:
                        stop = run.end_epoch(epoch, lr, stats, seconds, stepper.eval_model(k), stepper.autocast) or stop
                    except RunFailed as e:
                        failed[k] = e
        for k, run in enumerate(runs):  # every pending checkpoint of the group is written: make them the last
            if k not in failed:
                run.commit()
        if stop or len(failed) == len(runs):
            break
    else:
        for k, run in enumerate(runs):
            if k not in failed:
                with stepper.seed(k):
                    run.finish()
    if failed:
        raise RunFailed('\n'.join(str(e) for e in failed.values()))
    return [r.run_dir for r in runs]


def _train_alone(cfg, device, log, parallel=None):
    """One run whose folder the caller owns (data-parallel: rank 0 owns it)."""
    with contextlib.ExitStack() as stack:
        run = Run(cfg, device, log, graphed=uses_graphs(cfg, device), parallel=parallel)
        stack.callback(run.close)
        stepper = SingleStepper(run, run.log)  # before restore: a channels-last model then receives the checkpoint
        run.restore()
        return train_runs([run], stepper, run.log)[0]


def _train_packed(cfgs, device, log):
    """Runs of one group, at one epoch, whose folders the caller owns, trained as one packed model."""
    check_packable(cfgs)
    with contextlib.ExitStack() as stack:
        runs, generators = [], []
        for c in cfgs:  # each seed's set-up draws from its own freshly seeded (or restored) stream, as alone
            run = Run(c, device, log, graphed=uses_graphs(c, device))
            stack.callback(run.close)
            run.grouped = True
            run.restore()
            runs.append(run)
            generators.append(seed_generator(device))
        if len({r.start for r in runs}) != 1:
            raise UserError('packed seeds must resume from the same epoch; got '
                            + ', '.join(f'{r.run_dir}: {r.start - 1}' for r in runs))
        log(f'packed {len(runs)} seeds ({", ".join(str(c.training.seed) for c in cfgs)}) as one model')
        return train_runs(runs, PackedStepper(runs, generators, log), log)


def train(cfg, log=print, parallel=None):
    """Train one run to the end (or to training.stop_after epochs), owning its folder; returns the folder.
    parallel: this rank's engine.data_parallel.DataParallel of a data-parallel run, whose rank 0 owns the folder."""
    device = resolve_device(cfg.training.device)
    with contextlib.ExitStack() as stack:
        def own():
            stack.enter_context(RunLock(run_dir_of(cfg), log))
            checkpoint.settle_group([run_dir_of(cfg)], log, epochs=False)  # a run trained packed before, now alone
        by_writer(parallel, own)
        return _train_alone(cfg, device, log, parallel)


def train_group(cfgs, log=print, sweep=False):
    """Train the runs of one method and grid point (see check_packable) packed, as far as they are at one epoch
    after checkpoint.settle_group (a run at another epoch trains alone, with a message; one run trains alone).
    sweep=True: runs owned by another live process, or finished or failed meanwhile, are skipped with a message.
    Returns the folders trained; raises RunFailed after the others when a run diverged."""
    device = resolve_device(cfgs[0].training.device)
    with contextlib.ExitStack() as stack:
        claimed = []
        for c in cfgs:
            lock = RunLock(run_dir_of(c), log)
            try:
                lock.acquire()
            except RunOwned as e:
                if not sweep:
                    raise
                log(f'skipping {run_dir_of(c)}: {e}')
                continue
            stack.callback(lock.release)
            done = [f for f in ('final.json', 'failed.json') if os.path.exists(os.path.join(run_dir_of(c), f))]
            if sweep and done:
                log(f'skipping {run_dir_of(c)}: {done[0]} written meanwhile (another process)')
                continue
            claimed.append(c)
        # the epochs decide what trains together: not needed for one run
        epochs = checkpoint.settle_group([run_dir_of(c) for c in claimed], log, epochs=len(claimed) > 1) or [0]
        by_epoch = {}
        for c, epoch in zip(claimed, epochs):
            by_epoch.setdefault(epoch, []).append(c)
        if len(by_epoch) > 1:
            log('runs at different epochs train apart: ' + ', '.join(
                f'{run_dir_of(c)} ({e})' for e, cs in by_epoch.items() for c in cs))
        trained, failures = [], []
        for together in by_epoch.values():
            try:
                trained += (_train_packed(together, device, log) if len(together) > 1
                            else [_train_alone(together[0], device, log)])
            except RunFailed as e:
                failures.append(str(e))
        if failures:
            raise RunFailed('\n'.join(failures))
        return trained


def train_packed(cfgs, log=print):
    """Train the runs of `cfgs` (see check_packable) packed, owning their folders; returns their folders."""
    check_packable(cfgs)
    return train_group(cfgs, log)
