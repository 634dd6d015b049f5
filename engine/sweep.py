"""`run.py sweep`: a grid of methods x seeds (x any config values) from one config, one folder per run.

    python run.py sweep -C configs/fashion_mnist_quick.yaml --methods at,sgls --seeds 0-4 \
        [--grid attack.eps=4,8] [--pack K] [--out runs/sweep] [--compare [--group-by K1,K2] [--pool KEY]]
        [--section.key=value ...]

Finished runs (final.json present) are skipped, killed ones resumed from their last checkpoint, the rest
started; rerunning the same command after an interruption completes the sweep. Each run folder is claimed
(writers.run_lock) while it trains: runs owned by another live process (a second sweep on the same folder, a
`run.py train` of the same run) are skipped, so two sweeps share the work instead of doing it twice. A run that
diverges is marked failed (failed.json) and the sweep goes on; failed runs are listed at the end, left out of
--compare, and the sweep exits with code 3. With --pack K (K > 1) the seeds of each method and grid point train
K at a time as one packed model (engine.train.loop), each still writing its own folder, and checkpoint as a
group, so a killed group resumes packed, together; a sweep claims a packed group as a whole (a lock under
<out>/.claims) before its runs, so two processes never split a group between them.

Under torchrun (engine.distributed.seed_parallel) the ranks share the sweep: each walks the batches from its own
share (batch i is rank i % N's), then takes over the others' not yet started, from the end, by the same claims;
every run trains once, in one rank, as it would alone, and its folder is what a one-process sweep writes. After
all ranks are done, rank 0 alone lists what is left and runs --compare. A rank or node that dies leaves its runs'
locks stale: started again, the sweep resumes them from their last checkpoints.
"""
import contextlib
import itertools
import os

from engine import config
from engine.errors import RunFailed, UserError

# Keys the sweep sets itself: a grid over them would collide with --methods, --seeds or the run folder names.
SWEEP_KEYS = ('method.name', 'training.seed', 'output.name', 'output.dir')
CLAIMS = '.claims'  # <out>/.claims/<first run of a packed group>/run.lock while the group trains


def parse_seeds(text):
    """'0-4' -> [0, 1, 2, 3, 4]; '0,3,7' -> [0, 3, 7]."""
    seeds = []
    try:
        for part in text.split(','):
            lo, dash, hi = part.partition('-')
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError:
        raise UserError(f"--seeds: expected e.g. 0-4 or 0,3,7, got {text!r}") from None
    if len(set(seeds)) != len(seeds) or not seeds:
        raise UserError(f'--seeds: {text!r} is empty or repeats a seed')
    return seeds


def parse_grid(items):
    """['attack.eps=4,8', 'optimizer.lr=0.1,0.05'] -> [('attack.eps', ['4', '8']), ...] (keys checked)."""
    grid = []
    for item in items:
        key, eq, values = item.partition('=')
        if not eq or not values:
            raise UserError(f'--grid: expected section.key=v1,v2, got {item!r}')
        if key in SWEEP_KEYS:
            raise UserError(f'--grid: {key} is set by the sweep itself (--methods, --seeds, --out); not a grid key')
        if key in (k for k, _ in grid):
            raise UserError(f'--grid: {key} given twice')
        for v in values.split(','):
            config.load(cli_args=[f'--{key}={v}'], advise=False)  # an unknown key or a bad value stops here
        typed = [config.check_value(key, v, '--grid') for v in values.split(',')]
        if len(set(map(repr, typed))) != len(typed):
            raise UserError(f'--grid: {item!r} repeats a value')
        grid.append((key, values.split(',')))
    return grid


def plan(config_files, cli_args, methods, seeds, grid, out_dir):
    """Every run of the sweep as (run name, cfg, group), validated before anything trains; a group is the runs of
    one method and grid point, the seeds that may be packed together."""
    runs = []
    for method, seed, *values in itertools.product(methods, seeds, *[v for _, v in grid]):
        assignments = [f'--{key}={value}' for (key, _), value in zip(grid, values)]
        # a value may hold a path (data.dir=a/b): the run name stays one path component
        suffix = ''.join(f'-{key.split(".")[1]}{value}'.replace('/', '_').replace(os.sep, '_')
                         for (key, _), value in zip(grid, values))
        name = f'{method}{suffix}-s{seed}'
        cfg = config.load(config_files, [*cli_args, f'--method.name={method}', f'--training.seed={seed}',
                                         *assignments, f'--output.dir={out_dir}', f'--output.name={name}'])
        runs.append((name, cfg, (method, *values)))
    return runs


def status(run_dir):
    if os.path.exists(os.path.join(run_dir, 'failed.json')):
        return 'failed'
    if os.path.exists(os.path.join(run_dir, 'final.json')):
        return 'done'
    if any(os.path.exists(os.path.join(run_dir, 'checkpoints', f)) for f in ('last.pt', 'pending.pt')):
        return 'resume'
    return 'new'


def batches(todo, pack):
    """The unfinished runs as lists to train together: up to `pack` seeds of one group, in the sweep's order (the
    same lists on every rerun, so a killed packed group resumes as the same group)."""
    groups = {}
    for name, cfg, group in todo:
        groups.setdefault(group, []).append((name, cfg))
    return [runs[i:i + pack] for runs in groups.values() for i in range(0, len(runs), pack)]


def rank_order(n, rank, world):
    """The batches in the order rank walks them: its own share first (with runs of equal length every rank gets
    as much, and no two contend), then the others' from the end, meeting their owners from the far side."""
    return list(range(rank, n, world)) + [i for i in reversed(range(n)) if i % world != rank]


@contextlib.contextmanager
def claim(together, out_dir, log):
    """Own a packed group as a whole for the body (yields False when another live process owns it): its runs'
    own locks come one by one, and two processes taking them at once would split the group."""
    if len(together) == 1:
        yield True
        return
    from writers.run_lock import RunLock, RunOwned
    claims = os.path.join(out_dir, CLAIMS)
    lock = RunLock(os.path.join(claims, together[0][0]), log)
    try:
        lock.acquire()
    except RunOwned as e:
        log(f'skipping the group of {together[0][0]}: {e}')
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
        for folder in (lock.run_dir, claims):  # also a claim taken over from a killed process; others still held stay
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def main(config_files, args, log=print):
    from engine.distributed import seed_parallel
    from engine.methods import METHODS
    sweep_args = list(args)
    methods, args = config.take_options(args, '--methods')
    seeds, args = config.take_options(args, '--seeds')
    grid_items, args = config.take_options(args, '--grid')
    out, args = config.take_options(args, '--out')
    pack, args = config.take_options(args, '--pack')
    group_by, args = config.take_options(args, '--group-by')  # passed to compare (engine.grouping)
    pool, args = config.take_options(args, '--pool')
    do_compare = {'group_by': group_by[-1] if group_by else None, 'pool': pool} if '--compare' in args else None
    args = [a for a in args if a != '--compare']
    base = config.load(config_files, args)
    methods = methods[-1].split(',') if methods else [base.method.name]
    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r} (choices: {', '.join(METHODS)})")
    if len(set(methods)) != len(methods):
        raise UserError(f"--methods: {','.join(methods)} repeats a method")
    seeds = parse_seeds(seeds[-1]) if seeds else [base.training.seed]
    if pack and not (pack[-1].isdigit() and int(pack[-1]) >= 1):
        raise UserError(f'--pack: expected a number of seeds >= 1, got {pack[-1]!r}')
    pack = int(pack[-1]) if pack else 1
    out_dir = out[-1] if out else os.path.join(base.output.dir, 'sweep')
    runs = plan(config_files, args, methods, seeds, parse_grid(grid_items), out_dir)
    options = {**config.flat(base), 'sweep arguments': sweep_args, 'config files': list(config_files)}
    with seed_parallel(base.training.device, options, out_dir) as group:
        from engine.train.build import convert_data  # the data stack (ffcv): after the ranks' checks, on each at once
        if group is not None:  # each node converts the sweep's data once, before its ranks open it
            data = {tuple(sorted((k, repr(v)) for k, v in config.flat(cfg).items() if k.startswith('data.'))): cfg
                    for _, cfg, _ in runs}
            group.leaders_first(lambda: [convert_data(cfg, log=lambda *_: None) for cfg in data.values()])
        return _sweep(runs, out_dir, pack, do_compare, group, log if group is None else group.log(log))


def _sweep(runs, out_dir, pack, do_compare, group, log):
    """Train the unfinished runs (this rank's way through them under torchrun), then report (rank 0)."""
    from engine.train.loop import check_packable, train_group
    states = {name: status(os.path.join(out_dir, name)) for name, *_ in runs}
    count = {s: sum(v == s for v in states.values()) for s in ('done', 'resume', 'failed')}
    if group is None or group.rank == 0:
        log(f'sweep {out_dir}: {len(runs)} runs, {count["done"]} done, {count["resume"]} to resume'
            + (f', {count["failed"]} failed' if count['failed'] else '')
            + (f'; {group.world} ranks share them' if group is not None else ''))
    # resume=true throughout: a run killed before its first checkpoint restarts; a finished epoch is kept.
    todo = [(name, config.load(base=config.flat(cfg), overrides={'training.resume': True}), group_key)
            for name, cfg, group_key in runs if states[name] not in ('done', 'failed')]
    for _, cfg, _ in todo if pack > 1 else ():  # before anything trains
        check_packable([cfg])
    work = batches(todo, pack)
    order = range(len(work)) if group is None else rank_order(len(work), group.rank, group.world)
    done, trained, failures = len(runs) - len(todo), set(), []
    for i in order:
        together = work[i]
        names = ', '.join(f'{name} ({states[name]})' for name, _ in together)
        done += len(together)
        where = f'[{done}/{len(runs)}]' if group is None else f'[batch {i + 1}/{len(work)}]'
        log(f'{where} {names}' + (' packed' if len(together) > 1 else ''))
        with claim(together, out_dir, log) as claimed:
            try:
                if claimed:
                    trained.update(train_group([cfg for _, cfg in together], log=log, sweep=True))
            except RunFailed as e:
                failures.append(str(e))
    if group is not None:  # wait for every rank's last run; rank 0 reports on all of them
        ranks = group.gather((sorted(trained), failures))
        if group.rank != 0:
            return out_dir
        trained = {d for rank_trained, _ in ranks for d in rank_trained}
        failures = [f for _, rank_failures in ranks for f in rank_failures]
    finished = {name: status(os.path.join(out_dir, name)) for name, *_ in runs}
    failed = [name for name, s in finished.items() if s == 'failed']
    elsewhere = [name for name, _, _ in todo if finished[name] not in ('done', 'failed')
                 and os.path.join(out_dir, name) not in trained]
    if elsewhere:
        log(f'{len(elsewhere)} run(s) left to another process or unfinished: {", ".join(elsewhere)}; '
            'rerun the sweep when it is done')
    if do_compare:
        from engine.compare import compare
        compare([out_dir], os.path.join(out_dir, 'compare'), **do_compare)
        log(f'comparison: {os.path.join(out_dir, "compare", "report.md")}')
    if failed:
        raise RunFailed(f'{len(failed)} run(s) failed (diverged; failed.json in each, left out of the comparison): '
                        + ', '.join(failed) + ('\n' + '\n'.join(failures) if failures else ''))
    return out_dir
