"""The whole training step as CUDA graphs: captured once, replayed every step.

A PGD-10 step launches thousands of small kernels; at CIFAR sizes a GPU would mostly wait for Python and the
launch queue. Replayed as a graph, a step is one launch. What capture needs, and how it is met here:
- static shapes and addresses: each batch is copied into static input buffers; one graph per (SGLS phase,
  batch shape), all sharing one memory pool;
- no host sync inside the step: train_step has none (its metrics stay on the device, see EpochMeter);
- lazily built state must exist before capture (momentum buffers, compiled kernels for every mode the step
  uses, cuBLAS/cuDNN handles): a graph is captured only after `warmup` plain steps with the same key, run on a
  side stream as PyTorch's CUDA-graph notes ask;
- values that change between steps are tensors the graph reads: the learning rate (step.make_sgd with
  graphed=True, filled by step.set_lr), the soft-label table, the random stream (PyTorch's graph-safe Philox
  generator moves its offset on every replay, so each replay draws fresh attack noise);
- capture records kernels without running them, so the call that captures then replays: every call of the
  step trains on its batch exactly once, warm-up calls included.
Everything the step changes (weights, momentum, BatchNorm statistics, soft labels) is changed in place; state
loaded after the first capture must be copied into the existing tensors (model.load_state_dict does).
"""
import time

import torch

from engine.step import EpochMeter

WARMUP_STEPS = 3


class _CapturedStats(EpochMeter):
    """Stands in for the epoch's meter during capture: keeps the step's stats tensor, a static graph output."""

    def __init__(self):
        super().__init__('cuda')
        self.stats = None

    def add_stats(self, stats, n):
        self.stats = stats


class GraphedStep:
    """step(optimizer, x, y, idx, *, method, epoch, meter, **kw) replayed as CUDA graphs; same signature."""

    def __init__(self, step, warmup=WARMUP_STEPS, log=None):
        self.step, self.warmup, self.log = step, warmup, log
        self.graphs = {}      # key -> (graph, static inputs, static stats)
        self.plain_steps = {}  # key -> warm-up steps run so far
        self.pool = None
        self.side = torch.cuda.Stream()
        self.capture_seconds = 0.0

    def __call__(self, optimizer, x, y, idx, *, method, epoch, meter, **kw):
        key = (method.soft_labels_active(epoch), tuple(x.shape))
        if key not in self.graphs:
            if self.plain_steps.get(key, 0) < self.warmup:
                self.plain_steps[key] = self.plain_steps.get(key, 0) + 1
                self.side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.side):
                    self.step(optimizer, x, y, idx, method=method, epoch=epoch, meter=meter, **kw)
                torch.cuda.current_stream().wait_stream(self.side)
                return
            self.graphs[key] = self._capture(optimizer, x, y, idx, method=method, epoch=epoch, **kw)
        graph, static, stats = self.graphs[key]
        for buffer, value in zip(static, (x, y, idx)):
            buffer.copy_(value)
        graph.replay()
        meter.add_stats(stats, x.shape[0])

    def _capture(self, optimizer, x, y, idx, **kw):
        start = time.perf_counter()
        torch.cuda.synchronize()
        static = (x.clone(), y.clone(), idx.clone())
        out = _CapturedStats()
        optimizer.zero_grad(set_to_none=True)  # gradients are then allocated from the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step(optimizer, *static, meter=out, **kw)
        self.pool = graph.pool()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.capture_seconds += seconds
        if self.log:
            self.log(f'captured the training step as a CUDA graph (batch {tuple(x.shape)}, SGLS soft labels '
                     f"{'on' if kw['method'].soft_labels_active(kw['epoch']) else 'off'}) in {seconds:.1f}s")
        return graph, static, out.stats
