"""Lightning: train on finished float32 batches while the loader moves compact bytes.

Lightning's own place for device-side batch work is the ``on_after_batch_transfer`` hook of
a ``LightningModule`` or ``LightningDataModule``: the batch is already on the device there.
:class:`FinishBatchMixin` fills that hook with :func:`~diskcache_ocr.finish_batch`::

    class Detector(FinishBatchMixin, pl.LightningModule):
        ...                       # training_step sees batch["image"] as float32
    loader = DataLoader(CachedOCRDataset(..., output="compact"), collate_fn=collate, ...)
    pl.Trainer(accelerator="gpu").fit(Detector(), loader)

Nothing here imports Lightning (the mixin only overrides the hook and defers to the class
after it), so this module loads without the ``[lightning]`` extra.
"""

from __future__ import annotations

from typing import Any

from diskcache_ocr.samples import FINISH, finish_batch


def finish_after_transfer(batch: Any) -> Any:
    """``finish_batch`` for a batch of compact samples; anything else is returned as is."""
    if isinstance(batch, dict) and FINISH in batch:
        return finish_batch(batch)
    return batch


class FinishBatchMixin:
    """Put before ``LightningModule`` (or ``LightningDataModule``) in the bases: batches of
    compact samples reach ``training_step`` (and validation, test, predict) finished on the
    device, bit for bit what the default float32 output gives; other batches pass unchanged.
    """

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        parent = super()
        if hasattr(parent, "on_after_batch_transfer"):
            batch = parent.on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
        return finish_after_transfer(batch)


__all__ = ["FinishBatchMixin", "finish_after_transfer"]
