"""Dataset sources -> .beton files with fields image (raw uint8 HWC), label, index.

Layout of a beton written here:
  image  NDArrayField uint8 (H, W, C): the exact source pixels (no JPEG); Fashion-MNIST keeps its 1 channel.
  label  IntField
  index  IntField: the image's position in its source split, 0..N-1 (equal to its row in the beton), so a
         per-image table (soft labels) can be indexed by it.

File names: <out_dir>/<dataset>-{train,test}.beton; synthetic data carries its spec in the name,
<out_dir>/synthetic-<C>x<H>x<W>-c<classes>-n<n_train>-t<n_test>-s<seed>-{train,test}.beton,
so betons of different specs never collide.

Writing: ffcv's file format and its worker function, but our own control of the worker processes (_write_ffcv).
ffcv's DatasetWriter._write_common waits for a sample counter that a dead worker never raises (a full disk hangs
forever), leaves its queue's feeder thread blocked on a pipe nobody reads after Ctrl-C (the process hangs at exit)
and starts non-daemonic workers that outlive a killed parent. Here an interrupt or any failure terminates and joins
every worker, frees the shared memory, and the temp file goes with atomic_path: nothing is left behind.
"""
from __future__ import annotations

import ctypes
import errno
import multiprocessing
import os
import queue
import signal
import sys
import time
from multiprocessing import cpu_count
from multiprocessing.shared_memory import SharedMemory

import numpy as np
from ffcv.fields import IntField, NDArrayField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.utils import chunks
from ffcv.writer import DatasetWriter, worker_job_indexed_dataset
from tqdm import tqdm

from engine.data.datasets import dataset as dataset_record
from engine.data.loaders import REMAKE, open_beton
from engine.data.sources import Split, SyntheticSpec
from engine.errors import DataError
from writers.atomic import atomic_path, remove_stale_temps

PAGE_SIZE = 1 << 21  # ffcv's smallest page (2 MiB): each writer process fills at least one, so small betons stay small
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h

__all__ = ['SyntheticSpec', 'beton_paths', 'convert', 'write_beton']


def beton_paths(dataset: str, out_dir: str, synthetic: SyntheticSpec = SyntheticSpec()) -> tuple[str, str]:
    """(train_path, test_path) that convert() writes for this dataset (synthetic: for this spec)."""
    dataset_record(dataset)
    stem = dataset
    if dataset == 'synthetic':
        c, h, w = synthetic.shape
        stem = (f'synthetic-{c}x{h}x{w}-c{synthetic.classes}-n{synthetic.n_train}-t{synthetic.n_test}'
                f'-s{synthetic.seed}')
    return tuple(os.path.join(out_dir, f'{stem}-{split}.beton') for split in ('train', 'test'))


class _SplitDataset:
    """Indexable view that ffcv's writer reads: (image HWC uint8, label, index)."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self):
        return len(self.split.labels)

    def __getitem__(self, i):
        return self.split.images[i], int(self.split.labels[i]), i


# ------------------------------------------------------------------------------------- the writer processes
def _die_with_parent(parent: int) -> None:
    """Linux: the kernel SIGKILLs this worker when its parent dies, so a killed convert leaves no writer behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl (not Linux): the daemon flag and the parent's cleanup remain
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker(errors, parent, *ffcv_args):
    # Ctrl-C reaches the whole process group. Only the parent acts on it (it terminates all workers): a worker
    # dying of it mid-page would leave its siblings spinning on ffcv's page-order lock.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    try:
        worker_job_indexed_dataset(*ffcv_args)
    except BaseException as e:  # reported to the parent, which raises it; no traceback from each worker
        code = e.errno if isinstance(e, OSError) else None
        errors.put((code, e.strerror if code is not None and e.strerror else f'{type(e).__name__}: {e}'))
        sys.exit(1)


def _worker_failure(path: str, processes, errors) -> Exception:
    code, message = None, None
    if not errors.empty():
        code, message = errors.get()
    if message is None:
        codes = [p.exitcode for p in processes]
        message = f'a writer process ended with exit code {next(c for c in codes if c)} (killed, out of memory?)'
    if code is not None:
        return OSError(code, message, path)
    return RuntimeError(f'{path}: {message}')


def _write_ffcv(path: str, fields: dict, dataset, num_workers: int, chunksize: int, progress: bool,
                name: str) -> None:
    """What DatasetWriter.from_indexed_dataset does (ffcv 1.0.2: prepare, workers running ffcv's
    worker_job_indexed_dataset, finalize), with the workers supervised: their errors are raised here (an OSError
    keeps its errno), and on any exception, KeyboardInterrupt included, they are terminated and joined.
    name: the beton that path (a temp file) becomes, for messages."""
    writer = DatasetWriter(path, fields, page_size=PAGE_SIZE, num_workers=num_workers)
    writer.num_samples = len(dataset)
    # fork: the workers read the images in place (spawn would pickle them once per worker).
    ctx = multiprocessing.get_context('fork')
    work, allocations, errors = ctx.Queue(), ctx.Queue(), ctx.SimpleQueue()
    processes, bar = [], None
    try:
        writer.prepare()  # header and field descriptors; creates the shared metadata table
        done = ctx.Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(path, writer.data_region_start, writer.page_size)
        args = (work, writer.metadata_sm, writer.metadata_type, fields, allocator, done, allocations, dataset)
        processes = [ctx.Process(target=_worker, args=(errors, os.getpid()) + args, daemon=True)
                     for _ in range(num_workers)]
        for p in processes:
            p.start()
        # Queued after the forks, so the queue's feeder thread is not running while a worker is forked.
        for chunk in chunks(list(enumerate(range(len(dataset)))), chunksize):
            work.put(chunk)
        for _ in processes:
            work.put(None)
        bar = tqdm(total=len(dataset), disable=not progress)
        table = []
        received = 0
        while received < len(processes):
            all_ended = all(p.exitcode is not None for p in processes)
            if any(p.exitcode for p in processes):
                raise _worker_failure(name, processes, errors)
            try:
                table.extend(allocations.get(timeout=0.05))  # each worker's allocations, when it is done
                received += 1
            except queue.Empty:
                if all_ended:  # every worker exited cleanly, yet one list never came
                    raise RuntimeError(f'{name}: the ffcv writer processes ended without their allocation tables')
            bar.update(done.value - bar.n)
        for p in processes:
            p.join()
        writer.finalize(table)  # metadata, allocation table, header
    finally:
        for p in processes:
            if p.exitcode is None:
                p.terminate()  # SIGTERM, default action: also ends a worker stuck on ffcv's page lock
        for p in processes:
            p.join(5)
            if p.exitcode is None:
                p.kill()
                p.join()
        for q in (work, allocations):
            q.cancel_join_thread()  # a feeder thread blocked on a full pipe must not hold up the exit
            q.close()
        if isinstance(getattr(writer, 'metadata_sm', None), SharedMemory):
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()
        if bar is not None:
            bar.close()


def write_beton(path: str, split: Split, log=print, progress: bool = True) -> None:
    """Write split to path atomically (writers.atomic): a temp file in the same folder, checked, then renamed
    into place. On any error (or interrupt) the writer processes are ended, the temp file is removed and nothing
    is left at path. A full disk is a DataError naming the folder. progress=False: no progress bar.
    """
    images = np.ascontiguousarray(split.images, dtype=np.uint8)
    if images.ndim != 4 or len(images) != len(split.labels) or len(images) == 0:
        raise DataError(f'{path}: cannot write images {images.shape} with {len(split.labels)} labels.')
    fields = {'image': NDArrayField(np.dtype('uint8'), images.shape[1:]), 'label': IntField(), 'index': IntField()}
    start = time.perf_counter()
    folder = os.path.dirname(path) or '.'
    try:
        with atomic_path(path) as tmp:
            # A small beton needs only one worker (each costs a process start and a 2 MiB page).
            workers = max(1, min(cpu_count(), len(images) // 20000 + 1))
            _write_ffcv(tmp, fields, _SplitDataset(Split(images, split.labels)), workers, 1000, progress, path)
            h, w, c = images.shape[1:]
            open_beton(tmp, expect_shape=(c, h, w))
    except OSError as e:
        if e.errno in NO_SPACE:
            raise DataError(f'no space left on {folder}: writing {path} failed ({os.strerror(e.errno)}). Free '
                            f'space there or convert into another folder (data.dir), then run convert again.') from e
        raise DataError(f'{path}: cannot write it ({e.strerror or e}).') from e
    log(f'wrote {path}: {len(images)} images {images.shape[1:]} HWC in {time.perf_counter() - start:.1f}s')


# ------------------------------------------------------------------------------------------------ convert
def _beton_problem(path: str, shape: tuple, n: int | None, split: str) -> str | None:
    """None: path is a valid beton of this image shape (and n images); '': there is nothing at path; else what is
    wrong with it, naming path."""
    if not os.path.lexists(path):
        return ''
    try:
        info = open_beton(path, expect_shape=shape)
    except DataError as e:
        return str(e).removesuffix(' ' + REMAKE).removesuffix('.')  # convert itself is what re-creates it
    if n is not None and info.n != n:
        return f'{path}: holds {info.n} images, expected {n} (the {split} split)'
    return None


def convert(dataset: str, out_dir: str, *, source: str = '', download: bool = False, force: bool = False,
            synthetic: SyntheticSpec = SyntheticSpec(), check_md5: bool = True, progress: bool = True,
            log=print) -> tuple[str, str]:
    """Write <dataset>-train.beton and -test.beton into out_dir and return their paths.

    source: cifar10/cifar100: the official python tarball, its extracted folder, or a folder holding either
    (default: out_dir); fashion-mnist: the folder with the four IDX .gz files (default: the Debian package's).
    download: fetch with torchvision into out_dir when no source is given. A beton that already exists and opens
    as a valid beton of the right image shape and image count (the official split's; synthetic: the spec's) is
    kept unless force; an invalid one is rewritten, saying why. check_md5=False skips the CIFAR checksums and the
    official counts (only for tests with small fake tarballs). progress=False: no progress bars.
    Temp files of earlier, killed conversions in out_dir are removed first (writers.atomic.remove_stale_temps).
    """
    paths = beton_paths(dataset, out_dir, synthetic)
    record = dataset_record(dataset)
    shape = record.image_shape(synthetic)
    counts = record.split_counts(synthetic) if check_md5 or not record.counts else (None, None)
    remove_stale_temps(out_dir, log)
    problems = [None if force else _beton_problem(path, shape, n, f'{dataset} {split}')
                for path, n, split in zip(paths, counts, ('train', 'test'))]
    todo = [i for i in range(2) if force or problems[i] is not None]
    for i in set(range(2)) - set(todo):
        log(f'{paths[i]} exists and is valid; skipping (force=True rewrites it)')
    if not todo:
        return paths

    # A beton that exists but is invalid is named in any error: the user may not know it was there at all.
    damaged = [problems[i] for i in todo if problems[i]]
    os.makedirs(out_dir, exist_ok=True)
    try:
        splits = record.read(source, download, out_dir, check_md5, synthetic)
    except DataError as e:
        if damaged:
            raise DataError(f'{"; ".join(damaged)}. {"It" if len(damaged) == 1 else "They"} cannot be rewritten: '
                            f'{e}') from e
        raise
    where = record.source_name(source, download, out_dir)
    for i in todo:
        if problems[i]:
            log(f'{problems[i]}; rewriting it from {where}')
        write_beton(paths[i], splits[i], log, progress)
    return paths
