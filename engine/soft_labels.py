"""The SGLS soft-label table: one row of class probabilities per training image, addressed by beton index.

It lives on the training device and is only touched with gather / index_copy_, so an update costs no host sync.
It is part of every checkpoint: a resumed SGLS run must continue from the same table.
"""
import torch
import torch.nn.functional as F


class SoftLabels:
    def __init__(self, labels, num_classes, dtype=torch.float32):
        """labels: int64 [N] on the device (the possibly noise-corrupted training labels), indexed by beton index."""
        self.table = F.one_hot(labels, num_classes).to(dtype)

    def update(self, idx, prediction, alpha):
        """t[idx] = alpha * t[idx] + (1 - alpha) * prediction; returns the updated rows (the training target)."""
        rows = alpha * self.table[idx] + (1 - alpha) * prediction.to(self.table.dtype)
        self.table.index_copy_(0, idx, rows)
        return rows

    def state_dict(self):
        return {'table': self.table}

    def load_state_dict(self, state):
        if state['table'].shape != self.table.shape:
            raise ValueError(f"soft-label table shape {tuple(state['table'].shape)} != {tuple(self.table.shape)}")
        self.table.copy_(state['table'])
