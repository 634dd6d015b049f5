"""The SGLS soft-label table: one row of class probabilities per training image, addressed by beton index.

It lives on the training device and is only touched with gather / index_copy_, so an update costs no host sync.
It is part of every checkpoint: a resumed SGLS run must continue from the same table. In a data-parallel run
(engine.data_parallel) each rank updates the rows of its slice of the batch and the ranks exchange them, so every
rank holds the table one process would.
"""
import torch
import torch.nn.functional as F


class SoftLabels:
    def __init__(self, labels, num_classes, dtype=torch.float32, ranks=None):
        """labels: int64 [N] on the device (the possibly noise-corrupted training labels), indexed by beton index.
        ranks: the engine.data_parallel.DataParallel of a data-parallel run (gather_rows), else None."""
        self.table = F.one_hot(labels, num_classes).to(dtype)
        self.ranks = ranks

    def update(self, idx, prediction, alpha):
        """t[idx] = alpha * t[idx] + (1 - alpha) * prediction, and the other ranks' updated rows written too;
        returns this batch's updated rows (the training target)."""
        rows = alpha * self.table[idx] + (1 - alpha) * prediction.to(self.table.dtype)
        every_idx, every_row = (idx, rows) if self.ranks is None else self.ranks.gather_rows(idx, rows)
        self.table.index_copy_(0, every_idx, every_row)
        return rows

    def state_dict(self):
        return {'table': self.table}

    def load_state_dict(self, state):
        if state['table'].shape != self.table.shape:
            raise ValueError(f"soft-label table shape {tuple(state['table'].shape)} != {tuple(self.table.shape)}")
        self.table.copy_(state['table'])


class EnsembleTable(SoftLabels):
    """A soft-label table that starts at zero instead of one-hot: temporal ensembling's (method `te`,
    engine/methods/baselines.py), as dongyp13/memorization-AT loss.py PGD_TE (`self.soft_labels =
    torch.zeros(num_samples, num_classes)`), read normalised (row / row sum). Updated, exchanged between ranks
    and checkpointed as SoftLabels."""

    def __init__(self, labels, num_classes, dtype=torch.float32, ranks=None):
        super().__init__(labels, num_classes, dtype, ranks)
        self.table.zero_()
