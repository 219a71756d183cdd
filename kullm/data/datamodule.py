"""The ``LightningDataModule``: processed splits → sampled, padded micro-batches, resumable mid-epoch."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from kullm.data.pairs import collator, columns
from kullm.data.preprocess import Processed, preprocess
from kullm.data.sampling import EpochSampler, TokenBudgetBatchSampler, make_sampler
from kullm.templates import Prompter

log = logging.getLogger(__name__)


class KullmDataModule(L.LightningDataModule):
    """Train/validation dataloaders over the cached, processed data.

    ``data.packing`` packs training examples into rows of ``cutoff_len`` tokens (``position_ids`` restart per
    example; the loss builds the block-diagonal mask), and then batch sizes count packed rows. ``data.batching:
    tokens`` fills micro-batches up to ``data.token_budget`` padded tokens instead of ``micro_batch_size`` rows.
    Sharding over ranks is done by kullm's own samplers (set ``use_distributed_sampler=False`` on the Trainer);
    :meth:`resume_at` skips the batches an interrupted epoch had already trained.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        tokenizer,
        prompter: Prompter,
        *,
        micro_batch_size: int,
        sampler: str = "length_grouped",
        num_workers: int = 0,
        seed: int = 42,
        pad_to_multiple_of: int = 8,
    ) -> None:
        super().__init__()
        self.data, self.tokenizer, self.prompter = data, tokenizer, prompter
        self.micro_batch_size, self.sampler_kind = micro_batch_size, sampler
        self.num_workers, self.seed = num_workers, seed
        # preference rows (data.kind=pairs|kto) batch chosen and rejected (or KTO's mismatched rows) together
        self.collator = collator(data["kind"], tokenizer.pad_token_id, pad_to_multiple_of, int(data["cutoff_len"]))
        self.processed: Processed | None = None
        self.prepared: Processed | None = None
        self.packed = None
        self.pack_stats = None
        self.train_sampler: EpochSampler | TokenBudgetBatchSampler | None = None

    def prepare_data(self) -> None:
        # rank 0 builds the cache and keeps it for its setup (one check, one set of lines); the others wait
        self.prepared = preprocess(self.data, self.tokenizer, self.prompter)

    def setup(self, stage: str | None = None) -> None:
        if self.processed is None:
            self.processed = self.prepared or preprocess(self.data, self.tokenizer, self.prompter)
            if len(self.processed.dataset["train"]) == 0:
                raise ValueError(f"{self.data['path']}: no training example is left after preprocessing")
            rank_zero_info(
                f"kullm-train: {len(self.processed.dataset['train'])} training and "
                f"{len(self.processed.dataset['validation'])} validation examples "
                f"(data.val_set_size={self.data['val_set_size']})"
            )
            if self.data["packing"]:
                from kullm.data.packing import pack_dataset

                self.packed, stats = pack_dataset(
                    self.processed.dataset["train"], int(self.data["cutoff_len"]), self.seed
                )
                self.pack_stats = stats

    @property
    def train_set(self):
        """The training rows: packed rows when ``data.packing``, else one example per row."""
        return self.packed if self.packed is not None else self.processed.dataset["train"]

    @property
    def val_set(self):
        return self.processed.dataset["validation"]

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        if self.data["batching"] == "tokens":
            budget = self.data["token_budget"] or self.micro_batch_size * int(self.data["cutoff_len"])
            self.train_sampler = TokenBudgetBatchSampler(
                self.train_set["length"], int(budget), seed=self.seed, num_replicas=world, rank=rank
            )
            return self._resumed(self._loader(self.train_set, batch_sampler=self.train_sampler))
        self.train_sampler = make_sampler(
            self.sampler_kind,
            self.train_set["length"],
            micro_batch_size=self.micro_batch_size,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
        )
        return self._resumed(self._loader(self.train_set, self.train_sampler))

    def _resumed(self, loader: DataLoader) -> DataLoader:
        """Skip what a resumed epoch already trained, before Lightning makes the loader's iterator: with worker
        processes that iterator draws its first indices from the sampler at once."""
        trainer = self.trainer
        if trainer is not None and trainer.fit_loop.epoch_loop.restarting:
            self.resume_at(trainer.fit_loop.epoch_loop.batch_progress.current.ready, trainer.current_epoch)
        return loader

    def val_dataloader(self) -> DataLoader:
        world, rank = self._world()
        sampler = EpochSampler(len(self.val_set), shuffle=False, num_replicas=world, rank=rank)
        return self._loader(self.val_set, sampler)

    def _loader(self, ds, sampler: EpochSampler | None = None, batch_sampler=None) -> DataLoader:
        wanted = ("input_ids", "labels", "position_ids") if self.data["kind"] == "sft" else columns(self.data["kind"])
        ds = ds.select_columns([c for c in wanted if c in ds.column_names and c != "id"])
        batching = (
            {"batch_sampler": batch_sampler}
            if batch_sampler is not None
            else {"batch_size": self.micro_batch_size, "sampler": sampler}
        )
        return DataLoader(
            ds,
            **batching,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # never draw from the global RNG
        )

    def resume_at(self, batches: int, epoch: int) -> None:
        """Resume after the ``batches`` micro-batches this rank had trained in ``epoch`` (its first ones are skipped).

        A checkpoint taken after the last batch of ``epoch`` resumes at the start of the next epoch, in that epoch's
        order. The skip is recorded under the epoch itself, so Lightning's ``set_epoch`` keeps it.
        """
        if self.train_sampler is None:
            return
        per_batch = 1 if isinstance(self.train_sampler, TokenBudgetBatchSampler) else self.micro_batch_size
        self.train_sampler.set_epoch(epoch)
        if batches >= -(-len(self.train_sampler) // per_batch):
            self.train_sampler.set_epoch(epoch + 1)
        elif batches:
            state = self.train_sampler.state_dict()
            self.train_sampler.load_state_dict({**state, "epoch": epoch, "served": batches * per_batch})
            log.info("resuming epoch %d mid-way: skipping %d micro-batches already trained", epoch, batches)

    def set_epoch(self, epoch: int) -> None:
        """Give the training sampler its epoch (Lightning does so only for ``.sampler`` and
        ``.batch_sampler.sampler``, which token-budget batches are not)."""
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch)
