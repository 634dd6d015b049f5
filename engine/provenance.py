"""Where a run's numbers came from: code version, library versions, device, host and time (provenance.json)."""
import functools
import os
import platform
import socket
import subprocess
import sys
import time

import torch

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=1)
def code_version():
    """(git commit, dirty) of this project's checkout, (None, None) outside a git checkout."""
    def git(*args):
        return subprocess.run(['git', '-C', PROJECT, *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout
    try:
        commit = git('rev-parse', 'HEAD').strip()
        dirty = bool(git('status', '--porcelain', '--untracked-files=no').strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def device_name(device):
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def provenance(device, **about):
    """One provenance record for a process starting (or resuming) a run on `device`."""
    commit, dirty = code_version()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {'start': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'host': socket.gethostname(), 'pid': os.getpid(),
            'argv': sys.argv, 'git_commit': commit, 'git_dirty': dirty, 'python': platform.python_version(),
            'torch': torch.__version__, 'cuda': torch.version.cuda, 'cudnn': cudnn, 'device': str(device),
            'device_name': device_name(device), 'cpu_threads': torch.get_num_threads(), **about}
