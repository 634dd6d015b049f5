"""K runs that differ only in their seed, trained in one process as one packed model (engine.packing).

Each seed keeps everything it would have alone: its run folder, data order and augmentation (its own loader),
initialization (its model is built after its own torch.manual_seed), attack noise (its own random stream,
`streams[k]`, handed to the packed attack and swapped in for its evaluation and checkpoint), BatchNorm
statistics, momentum and soft-label table (its slices of the packed tensors). After every epoch the packed
weights and optimizer state are split back into each seed's own model and optimizer, and the epoch is closed
by trainer.Run exactly as train() closes it: metrics, evaluation, `best` and `last` checkpoints. A seed's
checkpoint is therefore the checkpoint of its single run, and a packed run can be resumed packed or alone.

The packed step is the eager float32 step (engine.packing.packed_train_step); packing is for filling a GPU
that one small model leaves idle, not a replacement for the compiled single-model step.
On a GPU the CPU random stream is only used to initialise the models (they are built on the CPU): the
per-seed stream swapped around each seed's work is the device's, which draws all training and evaluation noise.
"""
import contextlib
import time

import torch

from engine import config as config_mod
from engine.errors import UserError
from engine.packing import (pack_models, pack_optimizer_state, packed_train_step, rng_state, seed_stream,
                            unpack_optimizer_state, unpack_state)
from engine.step import EpochMeter, make_sgd, set_lr
from engine.trainer import Run, progress_bar, resolve_device, show_progress

# Keys that may differ between the packed runs: what makes them different seeds, and where they write.
PER_SEED_KEYS = ('training.seed', 'output.name')


def check_packable(cfgs):
    """Raise UserError unless the configs are one run apart from PER_SEED_KEYS, on the eager engine."""
    flats = [config_mod.flat(c) for c in cfgs]
    differ = sorted({k for f in flats[1:] for k in f if f[k] != flats[0][k] and k not in PER_SEED_KEYS})
    if differ:
        raise UserError(f"packed seeds must share their config but for {', '.join(PER_SEED_KEYS)}; "
                        f"these differ: {', '.join(differ)}")
    if cfgs[0].training.engine != 'eager':
        raise UserError('packed seeds train with the eager float32 step: set --training.engine=eager '
                        '(or do not pack)')
    if len({c.training.seed for c in cfgs}) != len(cfgs):
        raise UserError('packed seeds must be different seeds')


def train_packed(cfgs, log=print):
    """Train the runs of `cfgs` (see check_packable) to the end or to training.stop_after; returns their folders."""
    check_packable(cfgs)
    cfg = cfgs[0]
    device = resolve_device(cfg.training.device)
    runs, streams = [], []
    for c in cfgs:  # each seed's set-up draws from its own freshly seeded (or restored) stream, as alone
        run = Run(c, device, log)
        run.restore()
        runs.append(run)
        streams.append(rng_state(device))
    if len({r.start for r in runs}) != 1:
        raise UserError('packed seeds must resume from the same epoch; got '
                        + ', '.join(f'{r.run_dir}: {r.start - 1}' for r in runs))
    packed = pack_models([r.model for r in runs])
    o = cfg.optimizer
    optimizer = make_sgd(packed.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                         nesterov=o.nesterov)
    optimizer.load_state_dict(pack_optimizer_state([r.optimizer.state_dict() for r in runs]))
    method, attack = runs[0].method, runs[0].attack
    tables = [r.soft_labels for r in runs] if runs[0].soft_labels is not None else None
    log(f'packed {len(runs)} seeds ({", ".join(str(c.training.seed) for c in cfgs)}) as one model')

    try:
        for epoch in range(runs[0].start, cfg.training.epochs + 1):
            lr = [r.begin_epoch(epoch) for r in runs][0]  # each seed's optimizer and loader; one schedule for all
            set_lr(optimizer, lr)
            meters = [EpochMeter(device) for _ in runs]
            t0 = time.perf_counter()
            bar = progress_bar(cfg, zip(*(r.loaders.train for r in runs)), epoch, total=len(runs[0].loaders.train))
            for i, batches in enumerate(bar):
                xs = torch.stack([x for x, _, _ in batches])  # a copy: FFCV may reuse its batch buffers
                idxs = torch.stack([idx for _, _, idx in batches])
                ys = torch.stack([r.labels[idx] for r, (_, _, idx) in zip(runs, batches)])
                packed_train_step(packed, optimizer, xs, ys, idxs, method=method, attack=attack, soft_labels=tables,
                                  epoch=epoch, meters=meters, rng_states=streams)
                show_progress(bar, i, meters, t0)
            seconds = time.perf_counter() - t0
            stop = False
            for k, (run, model_state, optimizer_state) in enumerate(zip(
                    runs, unpack_state(packed), unpack_optimizer_state(optimizer.state_dict(), len(runs)))):
                run.model.load_state_dict(model_state)
                run.optimizer.load_state_dict(optimizer_state)
                with seed_stream(streams, k, device):  # evaluation noise and the checkpoint's RNG state: seed k's
                    stop = run.end_epoch(epoch, lr, meters[k], seconds, run.model, contextlib.nullcontext) or stop
            if stop:
                return [r.run_dir for r in runs]
        for k, run in enumerate(runs):
            with seed_stream(streams, k, device):
                run.finish()
    finally:
        for run in runs:
            run.metrics.close()
    return [r.run_dir for r in runs]
