"""Many processes under torchrun: seed-parallel sweeps and data-parallel runs (issue 13 of the project).

torchrun (torch.distributed.run) starts one process per device and tells it its place in RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE; only when WORLD_SIZE > 1 do the processes join a torch.distributed process group
here, so without torchrun (or with one process) nothing changes. Each rank uses one device: on a GPU node
cuda:LOCAL_RANK (made the current device, so the engine's 'cuda' means it), on CPUs the CPU.

Before any work every rank checks, collectively, what a user gets wrong: more ranks per node than GPUs, ranks
started with different configs (multi-node launches run one command line per node) and an output folder that the
other nodes cannot see (each node its own disk). A failure is one UserError raised on every rank (exit code 2),
not one rank's error and the others waiting in the next collective.

- `seed_parallel` (run.py sweep): the ranks share a sweep's runs (engine.sweep claims them with writers.run_lock).
  They exchange only small host objects and wait for each other at the end, possibly for hours, so the group is
  gloo (on GPU nodes too) with a long timeout.
- `data_parallel` (run.py train): one run, each global batch split over the ranks (engine.data_parallel).
  gloo on CPUs, nccl on GPUs.
"""
import contextlib
import datetime
import os
import socket
import uuid

import torch
import torch.distributed as dist

from engine.errors import RunFailed, UserError

SWEEP_TIMEOUT = datetime.timedelta(days=30)  # a rank that finished its share waits for the others' last runs
RUN_TIMEOUT = datetime.timedelta(hours=2)    # a data-parallel rank waits at most for rank 0's checkpoint writes
TOKEN_PREFIX = '.torchrun-shared-'


def launched():
    """Whether this process is one of several ranks started by torchrun."""
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def place():
    """(rank, world size, local rank, ranks on this node) from torchrun's environment."""
    env = os.environ
    world = int(env.get('WORLD_SIZE', '1'))
    return (int(env.get('RANK', '0')), world, int(env.get('LOCAL_RANK', '0')),
            int(env.get('LOCAL_WORLD_SIZE', str(world))))


def rank_device(device_name, local_rank, local_world):
    """This rank's device for training.device=device_name: the CPU, or its node's GPU number local_rank (then the
    current CUDA device). More ranks on a node than visible GPUs is refused: two ranks would share one GPU."""
    if device_name == 'cpu' or (device_name == 'auto' and not torch.cuda.is_available()):
        return torch.device('cpu')
    if device_name not in ('auto', 'cuda'):
        raise UserError(f'training.device={device_name}: under torchrun each rank uses its own GPU '
                        '(cuda:LOCAL_RANK); set training.device=cuda (or auto, or cpu)')
    if not torch.cuda.is_available():
        raise UserError("training.device=cuda but no CUDA device is available (use 'auto' or 'cpu')")
    count = torch.cuda.device_count()
    if local_world > count:
        visible = os.environ.get('CUDA_VISIBLE_DEVICES')
        raise UserError(f'--nproc_per_node={local_world} but host {socket.gethostname()} has {count} visible '
                        f'GPU(s){f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""}: one rank '
                        f'per GPU, so start at most {count} per node (or train on training.device=cpu)')
    torch.cuda.set_device(local_rank)
    return torch.device('cuda', local_rank)


def _outcome(fn):
    """(fn(), None), or (None, (exit code, message)) when fn raises a UserError: what one rank tells the others."""
    try:
        return fn(), None
    except UserError as e:
        return None, (getattr(e, 'exit_code', 2), str(e))


def _raise(error):
    code, message = error
    raise (RunFailed if code == RunFailed.exit_code else UserError)(message)


class Group:
    """This process's place among torchrun's ranks and the collectives the engine needs, over host objects."""

    def __init__(self, rank, world, local_rank):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.host = socket.gethostname()

    def gather(self, value):
        """Every rank's value (picklable), in rank order, on every rank."""
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def from_writer(self, fn):
        """fn() run by rank 0 alone (what writes a shared folder); its result, or its UserError, on every rank."""
        message = [_outcome(fn) if self.rank == 0 else None]
        dist.broadcast_object_list(message, src=0)
        result, error = message[0]
        if error is not None:
            _raise(error)
        return result

    def leaders_first(self, fn):
        """fn() on each node's local rank 0, then on the node's other ranks: a conversion of the data writes it
        once per node, and the others find it done. A UserError of a leader is raised on every rank."""
        _, error = _outcome(fn) if self.local_rank == 0 else (None, None)
        errors = [e for e in self.gather(error) if e is not None]  # also the barrier the other ranks wait at
        if errors:
            _raise(errors[0])
        if self.local_rank != 0:
            fn()

    def check_same_config(self, values, what):
        """values ({key: JSON value}, the resolved config) must be the same on every rank: torchrun starts each
        node's ranks with that node's command line, and ranks that train different things would be wrong silently
        (or hang in a collective)."""
        ranks = self.gather(values)
        for rank, other in enumerate(ranks[1:], 1):
            differ = sorted(k for k in {*ranks[0], *other} if ranks[0].get(k) != other.get(k))
            if differ:
                shown = ', '.join(f'{k} {ranks[0].get(k)!r} vs {other.get(k)!r}' for k in differ[:4])
                raise UserError(f'ranks started with different {what}s: rank {rank} differs from rank 0 in '
                                f'{shown}{", ..." if len(differ) > 4 else ""}; start every node with the same '
                                'command line and config files')

    def check_shared_folder(self, folder):
        """Rank 0 writes a token file into folder; every rank must see it. The run folders, checkpoints and
        claims of the ranks live there, so a folder on each node's own disk would split or repeat the work."""
        def write_token():
            try:
                os.makedirs(folder, exist_ok=True)
                token = uuid.uuid4().hex
                with open(os.path.join(folder, TOKEN_PREFIX + token), 'w', encoding='utf-8') as f:
                    f.write(token)
            except OSError as e:
                raise UserError(f'{folder}: cannot write there ({e.strerror})') from None
            return token
        token = self.from_writer(write_token)
        path = os.path.join(folder, TOKEN_PREFIX + token)
        try:
            with open(path, encoding='utf-8') as f:
                seen = f.read() == token
        except OSError:
            seen = False
        views = self.gather((seen, self.host, os.path.abspath(folder)))  # every rank has looked
        if self.rank == 0:
            os.remove(path)
        blind = [f'rank {r} on {host} ({where})' for r, (ok, host, where) in enumerate(views) if not ok]
        if blind:
            raise UserError(f'{folder}: {", ".join(blind)} cannot see the file that rank 0 on {views[0][1]} '
                            f'({views[0][2]}) wrote there; the output folder must be one folder that every node '
                            'shares (a network file system), given by the same path')

    def log(self, log):
        """log with this rank's name in front (the console; a run's log.txt keeps the message alone)."""
        return lambda message: log(f'[rank {self.rank}/{self.world}] {message}')


@contextlib.contextmanager
def process_group(device_name, *, backend=None, timeout):
    """The body as one of torchrun's ranks, in the default process group (gloo for the CPU, nccl for a GPU,
    unless `backend`); yields a Group, or None without torchrun. The GPU count is checked before joining."""
    if not launched():
        yield None
        return
    rank, world, local_rank, local_world = place()
    device = rank_device(device_name, local_rank, local_world)
    dist.init_process_group(backend or ('nccl' if device.type == 'cuda' else 'gloo'), timeout=timeout)
    try:
        yield Group(rank, world, local_rank)
        # Every rank past its last collective before any leaves: a rank that tore its process group down while
        # another's gather was still in flight aborted ("terminate called without an active exception", seen in
        # CI on 2026-12-02). After a failure torchrun stops the others: no barrier then.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def seed_parallel(device_name, sweep, out_dir):
    """run.py sweep under torchrun: the ranks checked to run the same sweep (`sweep`: its options and base
    config) into one shared out_dir; yields the Group, or None without torchrun."""
    with process_group(device_name, backend='gloo', timeout=SWEEP_TIMEOUT) as group:
        if group is not None:
            group.check_same_config(sweep, 'sweep config')
            group.check_shared_folder(out_dir)
        yield group


@contextlib.contextmanager
def data_parallel(cfg):
    """run.py train under torchrun: yields the engine.data_parallel.DataParallel of this rank for the run of cfg
    (its config checked to be trainable so, the same on every rank, its output folder shared, its data
    converted once per node), or None without torchrun."""
    if not launched():
        yield None
        return
    from engine import config
    from engine.data_parallel import DataParallel, check_data_parallel
    check_data_parallel(cfg, place()[1])
    with process_group(cfg.training.device, timeout=RUN_TIMEOUT) as group:
        group.check_same_config(config.flat(cfg), 'config')
        group.check_shared_folder(cfg.output.dir)
        from engine.train.build import convert_data  # the data stack (ffcv) only now: the checks come first
        group.leaders_first(lambda: convert_data(cfg, log=lambda *_: None))  # the run says what it opened
        yield DataParallel(group)


def by_writer(parallel, fn):
    """fn() where it writes the run folder: in this process, or for a data-parallel run (parallel: its
    DataParallel) on rank 0, with its result or UserError on every rank."""
    return fn() if parallel is None else parallel.group.from_writer(fn)
