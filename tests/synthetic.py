"""Batches for step-level tests: class-clustered images, as a loader gives them (each with its beton index)."""
import torch


def synthetic_batches(seed, *, steps, batch, classes, size=16, channels=3):
    """x [steps, batch, C, size, size] in [0, 1], labels y [steps, batch], indices idx [steps, batch] (distinct
    within a batch), and `labels` [steps * batch] with labels[idx] == y (what the epoch loop looks up by index)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(classes, channels, 1, 1, generator=g)
    y = torch.randint(0, classes, (steps, batch), generator=g)
    x = (centers[y] + 0.2 * torch.randn(steps, batch, channels, size, size, generator=g)).clamp(0, 1)
    idx = torch.stack([torch.randperm(steps * batch, generator=g)[:batch] for _ in range(steps)])
    labels = torch.zeros(steps * batch, dtype=torch.int64)
    labels[idx.flatten()] = y.flatten()
    return x, y, idx, labels
