"""One entry point.

    python run.py convert  [-C config.yaml ...] [--data.key=value ...]   sources -> <data.dir>/<dataset>-{train,test}.beton
    python run.py train    [-C config.yaml ...] [--section.key=value ...] train one run; final.json / final.md at the end
    python run.py eval     --checkpoint PATH [--section.key=value ...]   the final-table evaluation of a checkpoint
    python run.py sweep    [-C config.yaml ...] --methods at,sgls --seeds 0-4 [--grid key=v1,v2] [--pack K] [--compare]
    python run.py compare  RUN_DIRS... [--out DIR] [--baseline METHOD]   many-seed statistics, report and plots

`python run.py train --help` lists every config key. Errors in the input (config, data, checkpoints) print one
message naming the file and field, and exit with code 2.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine.errors import UserError  # noqa: E402

USAGE = __doc__


def take_option(args, name):
    """Remove `--name VALUE` or `--name=VALUE` from args; return (the last value or None, remaining args)."""
    from engine.config import take_options
    values, rest = take_options(args, name)
    return (values[-1] if values else None), rest


def main(argv):
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    from engine import config
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
        cfg = config.load(files, rest)
        from engine.train.loop import train
        train(cfg)
    elif command == 'eval':
        from engine.train.final import eval_checkpoint
        path, rest = take_option(args, '--checkpoint')
        if path is None:
            raise UserError('eval needs --checkpoint PATH')
        eval_checkpoint(path, rest)
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


if __name__ == '__main__':
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)
