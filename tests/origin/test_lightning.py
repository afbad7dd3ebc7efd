"""Lightning (the ``[lightning]`` extra): a Trainer fed compact batches trains on finished
ones, equal to the default float32 output."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from diskcache_ocr import CachedOCRDataset, collate
from diskcache_ocr.lightning import FinishBatchMixin, finish_after_transfer
from diskcache_ocr.synth import split_paths

pl = pytest.importorskip("pytorch_lightning")

N = 4
FIELDS = ("image", "prob_map", "prob_mask", "thresh_map", "thresh_mask")


class TinyDetector(FinishBatchMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Conv2d(3, 1, kernel_size=1)
        self.seen: list[tuple[int, int, dict[str, torch.Tensor]]] = []

    def training_step(self, batch, batch_idx):
        for row, meta in enumerate(batch["meta"]):
            self.seen.append((self.current_epoch, meta["index"],
                              {k: batch[k][row].clone() for k in FIELDS}))
        logits = self.head(batch["image"])
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits, batch["prob_map"], weight=batch["prob_mask"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.full
def test_trainer_trains_on_finished_batches_equal_to_float32(synth_data, tmp_path):
    paths = split_paths(synth_data(N, 41, min_words=2, max_words=6, size=(160, 200)))
    reference = collate(CachedOCRDataset(*paths, tmp_path / "ref",
                                         preset="validation_optimized").__getitems__(range(N)))
    ds = CachedOCRDataset(*paths, tmp_path / "c", preset="validation_optimized",
                          output="compact")
    loader = DataLoader(ds, batch_size=2, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    assert next(iter(loader))["image"].dtype == torch.uint8  # the loader moves compact bytes
    model = TinyDetector()
    before = model.head.weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, loader)
    assert sorted((e, i) for e, i, _ in model.seen) == [(e, i) for e in (0, 1) for i in range(N)]
    for _epoch, index, fields in model.seen:
        for name in FIELDS:
            want = reference[name][index]
            assert fields[name].dtype == torch.float32 == want.dtype, name
            assert torch.equal(fields[name], want), (name, index)
    assert not torch.equal(model.head.weight.detach(), before)  # it did train


def test_finish_after_transfer_leaves_other_batches_alone():
    plain = {"image": torch.zeros(1, 3, 16, 16)}
    assert finish_after_transfer(plain) is plain
    pair = [torch.zeros(2), torch.ones(2)]
    assert finish_after_transfer(pair) is pair
