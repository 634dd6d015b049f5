"""Training-loader throughput: kind='gpu', kind='ffcv' and the official code's torchvision DataLoader, side by side.

    python bench/loaders.py [--device cpu|cuda] [--n 10000] [--batch 512] [--epochs 2] [--workers 2]
                            [--beton PATH] [--out results.json]

Each loader runs one warm-up epoch (ffcv's JIT compile, worker start-up, caches) that is not timed, then
--epochs timed epochs of training batches (shuffle, crop with 4 zero pixels, flip, float on --device).
Without --beton, a synthetic CIFAR-shaped beton of --n images is converted first.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from bench.machine import cpu_model  # noqa: E402, F401 (bench/train_step.py and packing.py import it from here)
from engine.data.convert import convert  # noqa: E402
from engine.data.loaders import make_loaders, read_beton  # noqa: E402
from engine.data.sources import SyntheticSpec  # noqa: E402


class InMemoryPIL(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 array -> PIL image -> transform."""

    def __init__(self, images, labels, transform):
        from PIL import Image
        self.to_pil = Image.fromarray
        self.images = images[..., 0] if images.shape[-1] == 1 else images  # PIL wants (H, W) for grey
        self.labels, self.transform = labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.to_pil(self.images[i])), int(self.labels[i])


class TorchvisionTrainLoader:
    """The official SGLS pipeline: RandomCrop(size, padding=4), RandomHorizontalFlip, ToTensor; shuffled."""

    def __init__(self, beton, batch, device, workers):
        from torchvision import transforms
        images, labels = read_beton(beton)
        transform = transforms.Compose([transforms.RandomCrop(images.shape[1], padding=4),
                                        transforms.RandomHorizontalFlip(), transforms.ToTensor()])
        self.device = device
        self.loader = torch.utils.data.DataLoader(InMemoryPIL(images, labels, transform), batch_size=batch,
                                                  shuffle=True, drop_last=True, num_workers=workers,
                                                  pin_memory=device.type == 'cuda')

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        torch.manual_seed(epoch)  # the DataLoader shuffles from torch's global RNG

    def __iter__(self):
        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def timed_epochs(loader, epochs, device):
    """Seconds per epoch for epochs 1..epochs after an untimed epoch 0."""
    seconds = []
    for epoch in range(epochs + 1):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        for batch in loader:
            del batch  # the batch is already materialised on device; a trainer would use it here
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if epoch:
            seconds.append(time.perf_counter() - start)
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--n', type=int, default=10000, help='synthetic training images (ignored with --beton)')
    parser.add_argument('--batch', type=int, default=512)
    parser.add_argument('--epochs', type=int, default=2, help='timed epochs, after one warm-up epoch')
    parser.add_argument('--workers', type=int, default=2, help='ffcv threads, DataLoader processes, torch threads')
    parser.add_argument('--beton', default='', help='an existing train beton instead of synthetic data')
    parser.add_argument('--data-dir', default='.data/bench', help='where the synthetic beton is written')
    parser.add_argument('--out', default='', help='write the results as JSON here')
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.workers)
    beton = args.beton or convert('synthetic', args.data_dir, synthetic=SyntheticSpec(n_train=args.n, n_test=1000),
                                  log=lambda message: None)[0]
    candidates = {
        'gpu (engine, on device)': lambda: make_loaders(beton, beton, kind='gpu', batch_size=args.batch, val_size=0,
                                                        device=device).train,
        'ffcv (engine)': lambda: make_loaders(beton, beton, kind='ffcv', batch_size=args.batch, val_size=0,
                                              device=device, num_workers=args.workers).train,
        'torchvision DataLoader + PIL': lambda: TorchvisionTrainLoader(beton, args.batch, device, args.workers),
    }
    rows = []
    for name, make in candidates.items():
        loader = make()
        seconds = timed_epochs(loader, args.epochs, device)
        images = len(loader) * args.batch * args.epochs
        rows.append({'loader': name, 'images_per_s': images / sum(seconds), 'epoch_s': seconds,
                     'images_per_epoch': len(loader) * args.batch})
        print(f'{name}: {rows[-1]["images_per_s"]:.0f} images/s', file=sys.stderr)

    baseline = rows[-1]['images_per_s']
    print('\n| loader | images/s | s/epoch | x torchvision |\n|---|---:|---:|---:|')
    for row in rows:
        print(f'| {row["loader"]} | {row["images_per_s"]:,.0f} | {np.mean(row["epoch_s"]):.2f} | '
              f'{row["images_per_s"] / baseline:.1f} |')
    if args.out:
        meta = {'date': time.strftime('%Y-%m-%d'), 'device': args.device,
                'cpu': cpu_model(), 'gpu': torch.cuda.get_device_name() if device.type == 'cuda' else None,
                'torch': torch.__version__, 'ffcv': importlib.metadata.version('ffcv'), 'beton': beton,
                'command': ' '.join([os.path.basename(sys.executable)] + sys.argv), 'args': vars(args)}
        with open(args.out, 'w') as f:
            json.dump({'meta': meta, 'results': rows}, f, indent=2)


if __name__ == '__main__':
    main()
