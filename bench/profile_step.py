"""Which kernels dominate the fast training step: torch.profiler over the compiled bf16 channels-last step
(no CUDA graph, whose replay the profiler sees as one opaque launch; the kernels are the same).

    python bench/profile_step.py [--arch resnet18] [--batch 512] [--method at] [--steps 3] [--out FILE.md]

Prints GPU time per kernel class (cuDNN/cuBLAS convolutions and matmuls, inductor's fused Triton kernels
for BatchNorm/ReLU/elementwise, the rest), the top kernels, and the GPU-busy fraction of the wall time.
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from engine.fast import FastStep  # noqa: E402
from engine.methods import METHODS, make_method  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.soft_labels import SoftLabels  # noqa: E402
from engine.step import make_sgd  # noqa: E402


def kernel_class(name):
    n = name.lower()
    if n.startswith('triton'):
        return 'inductor Triton (fused BN/ReLU/elementwise)'
    if any(k in n for k in ('conv', 'cudnn', 'gemm', 'sm90', 'cutlass', 'xmma', 'wgrad', 'dgrad', 'implicit')):
        return 'convolution / matmul (cuDNN, cuBLAS)'
    return 'other (ATen elementwise, reductions, copies)'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='resnet18')
    p.add_argument('--batch', type=int, default=512)
    p.add_argument('--method', default='at', choices=['at', 'sgls'])
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--out', default='')
    a = p.parse_args(argv)
    device = torch.device('cuda')
    torch.manual_seed(0)
    model = build_model(a.arch, 10).to(device)
    optimizer = make_sgd(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, device=device)
    step = FastStep(model, device, precision='bf16', channels_last=True, compile=True, cuda_graphs=False)
    x = torch.rand(a.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (a.batch,), device=device)
    idx = torch.arange(a.batch, device=device)
    sgls_on = {'sgls_start_epoch': 1} if 'sgls_start_epoch' in METHODS[a.method].params else {}  # soft labels on
    method = make_method(a.method, **sgls_on)
    kw = dict(method=method, attack=dict(eps=8 / 255, step_size=2 / 255, steps=10, bn_mode='eval'),
              soft_labels=SoftLabels(y, 10) if method.soft_labels else None, epoch=1)
    total = torch.zeros(1, 4, dtype=torch.float64, device=device)  # the steps' statistics, summed as the loop does
    for _ in range(3):
        total += step(optimizer, (x, y, idx), **kw)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            total += step(optimizer, (x, y, idx), **kw)
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    classes = {}
    for e in kernels:
        classes[kernel_class(e.key)] = classes.get(kernel_class(e.key), 0) + e.self_device_time_total
    lines = [f'{a.arch} batch {a.batch} {a.method} PGD-10, bf16 channels-last compiled step, {a.steps} steps '
             f'profiled; {torch.cuda.get_device_name()}; torch {torch.__version__}; {time.strftime("%Y-%m-%d")}',
             '', f'GPU kernel time {total / 1e3 / a.steps:.1f} ms/step; wall {1e3 * wall / a.steps:.1f} ms/step '
             f'under the profiler; kernels launched per step: '
             f'{sum(e.count for e in kernels) // a.steps}', '', '| kernel class | share of GPU time |', '|---|---:|']
    lines += [f'| {k} | {100 * v / total:.1f}% |' for k, v in sorted(classes.items(), key=lambda kv: -kv[1])]
    lines += ['', '| top kernels | calls/step | ms/step | share |', '|---|---:|---:|---:|']
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]:
        lines.append(f'| `{e.key[:90]}` | {e.count // a.steps} | {e.self_device_time_total / 1e3 / a.steps:.2f} | '
                     f'{100 * e.self_device_time_total / total:.1f}% |')
    table = '\n'.join(lines) + '\n'
    if a.out:
        with open(a.out, 'w') as f:
            f.write(table)
    print(table)


if __name__ == '__main__':
    main()
