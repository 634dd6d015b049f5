"""The whole training step as CUDA graphs: captured once, replayed every step.

A PGD-10 step launches thousands of small kernels; at CIFAR sizes a GPU would mostly wait for Python and the
launch queue. Replayed as a graph, a step is one launch. What capture needs, and how it is met here:
- static shapes and addresses: each batch is copied into static input buffers; one graph per (method phase,
  batch shape), all sharing one memory pool; the statistics the step returns are a static output, refilled by
  every replay (the loop adds them up before the next replay);
- no host sync inside the step: train_step has none (its statistics stay on the device);
- lazily built state must exist before capture (momentum buffers, compiled kernels for every mode the step
  uses, cuBLAS/cuDNN handles): a graph is captured only after `warmup` plain steps with the same key, run on a
  side stream as PyTorch's CUDA-graph notes ask;
- values that change between steps are tensors the graph reads: the learning rate (step.make_sgd with
  graphed=True, filled by step.set_lr), the soft-label table, the random stream (PyTorch's graph-safe Philox
  generator moves its offset on every replay, so each replay draws fresh attack noise; packed seeds draw from
  their own generators, registered with every graph so that their offsets move too);
- capture records kernels without running them, so the call that captures then replays: every call of the
  step trains on its batch exactly once, warm-up calls included.
Everything the step changes (weights, momentum, BatchNorm statistics, soft labels) is changed in place; state
loaded after the first capture must be copied into the existing tensors (model.load_state_dict does).
"""
import time

import torch

WARMUP_STEPS = 3


class GraphedStep:
    """step(optimizer, batch, *, method, epoch, **kw) -> statistics, replayed as CUDA graphs; same signature."""

    def __init__(self, step, warmup=WARMUP_STEPS, log=None, generators=()):
        self.step, self.warmup, self.log, self.generators = step, warmup, log, tuple(generators)
        self.graphs = {}      # key -> (graph, static batch, static statistics)
        self.plain_steps = {}  # key -> warm-up steps run so far
        self.pool = None
        self.side = torch.cuda.Stream()
        self.capture_seconds = 0.0

    def __call__(self, optimizer, batch, *, method, epoch, **kw):
        key = (method.phase(epoch), tuple(tuple(t.shape) for t in batch))
        if key not in self.graphs:
            if self.plain_steps.get(key, 0) < self.warmup:
                self.plain_steps[key] = self.plain_steps.get(key, 0) + 1
                self.side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.side):
                    stats = self.step(optimizer, batch, method=method, epoch=epoch, **kw)
                torch.cuda.current_stream().wait_stream(self.side)
                stats.record_stream(torch.cuda.current_stream())  # made on the side stream, read on this one
                return stats
            self.graphs[key] = self._capture(optimizer, batch, method=method, epoch=epoch, **kw)
        graph, static, stats = self.graphs[key]
        for buffer, value in zip(static, batch):
            buffer.copy_(value)
        graph.replay()
        return stats

    def _capture(self, optimizer, batch, **kw):
        start = time.perf_counter()
        torch.cuda.synchronize()
        static = tuple(t.clone() for t in batch)
        optimizer.zero_grad(set_to_none=True)  # gradients are then allocated from the graph's pool
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:  # besides the default generator, which every graph registers
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph, pool=self.pool):
            stats = self.step(optimizer, static, **kw)
        self.pool = graph.pool()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.capture_seconds += seconds
        if self.log:
            self.log(f'captured the training step as a CUDA graph (batch {tuple(batch[0].shape)}, method phase '
                     f"{kw['method'].phase(kw['epoch'])!r}) in {seconds:.1f}s")
        return graph, static, stats
