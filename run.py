"""One entry point.

    python run.py convert  [-C config.yaml ...] [--data.key=value ...]   sources -> <data.dir>/<dataset>-{train,test}.beton
    python run.py train    [-C config.yaml ...] [--section.key=value ...] train one run; final.json / final.md at the end
    python run.py eval     --checkpoint PATH [--out DIR] [--section.key=value ...]   the final table of any model:
                           a checkpoint of this engine, a state dict / .safetensors with --model.arch, or
                           --model.factory=package.module:function (engine/eval_model.py)
    python run.py sweep    [-C config.yaml ...] --methods at,sgls --seeds 0-4 [--grid key=v1,v2] [--pack K] [--compare]
    python run.py compare  RUN_DIRS... [--out DIR] [--baseline METHOD]   many-seed statistics, report and plots

Under torchrun (`torchrun --nproc_per_node=N [--nnodes=M --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT] run.py
...`, README "Many GPUs and nodes"), `sweep` spreads its runs over the ranks and `train` trains one run data-parallel,
training.batch_size being the global batch (each rank takes batch_size / N).

`python run.py train --help` lists every config key. Errors in the input (config, data, checkpoints) print one
message naming the file and field, and exit with code 2; so does a full disk, a read-only file system or a denied
permission (naming the folder or file). A run that failed (its loss or weights stopped being finite) exits with 3,
an interrupted one (Ctrl-C) with 130.
"""
import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine.errors import UserError  # noqa: E402

USAGE = __doc__


def main(argv):
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    from engine import config
    from engine.distributed import launched
    if launched() and command not in ('train', 'sweep'):
        raise UserError(f'run.py {command} runs in one process; under torchrun only train and sweep share the work')
    if command in ('convert', 'train', 'eval', 'sweep') and ('-h' in args or '--help' in args):
        print(USAGE + config.help_text())
        return 0
    if command == 'convert':
        files, rest = config.take_options(args, '-C', '--config-file')
        cfg = config.load(files, rest)  # config errors before the heavy imports
        from engine.train.build import convert_data
        train_path, test_path = convert_data(cfg)
        print(f'{train_path}\n{test_path}')
    elif command == 'train':
        files, rest = config.take_options(args, '-C', '--config-file')
        if any(a.split('=', 1)[0] == '--pack' for a in rest):
            raise UserError('--pack is an option of run.py sweep (K seeds packed as one model, within each rank under '
                            'torchrun); run.py train trains one run, data-parallel under torchrun')
        cfg = config.load(files, rest)
        from engine.distributed import data_parallel
        with data_parallel(cfg) as parallel:  # None without torchrun; the ranks' checks before the heavy imports
            from engine.train.loop import train
            train(cfg, log=print if parallel is None or parallel.writes else lambda *_: None, parallel=parallel)
    elif command == 'eval':
        from engine.eval_model import eval_model
        eval_model(args)
    elif command == 'sweep':
        from engine.sweep import main as sweep_main
        files, rest = config.take_options(args, '-C', '--config-file')
        sweep_main(files, rest)
    elif command == 'compare':
        from engine.compare import main as compare_main
        compare_main(args)
    else:
        raise UserError(f"unknown command '{command}' (convert, train, eval, sweep, compare)")
    return 0


# OSErrors a user fixes outside the program (free space, a writable folder), as one line instead of a traceback.
# torch's own full-disk RuntimeErrors are converted by engine.checkpoint.
OS_ERRORS = {errno.ENOSPC: 'no space left on device', errno.EDQUOT: 'no space left on device (disk quota exceeded)',
             errno.EROFS: 'read-only file system', errno.EACCES: 'permission denied', errno.EPERM: 'permission denied'}


def os_error_message(e):
    """'<file or folder>: no space left on device' for the OSErrors of OS_ERRORS, else None (a bug: traceback)."""
    text = OS_ERRORS.get(e.errno)
    if text is None:
        return None
    from writers.atomic import temp_target  # writers.atomic writes .<name>.<host>-<pid>.<random>.tmp first
    where = [temp_target(os.fsdecode(name)) for name in (e.filename, e.filename2) if name is not None]
    return f"{' -> '.join(dict.fromkeys(where))}: {text}" if where else text


def cli(argv):
    """main() with its failures as (message on stderr, exit code): what `python run.py` does, callable by tests."""
    try:
        return main(argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return getattr(e, 'exit_code', 2)  # RunFailed: 3
    except OSError as e:
        message = os_error_message(e)
        if message is None:
            raise
        print(f'error: {message}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(cli(sys.argv[1:]))
