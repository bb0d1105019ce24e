"""The Lightning run every `vlacache train` objective shares: the output folder, threads and seeds, a trainer that
checkpoints every epoch and logs CSV, and a fit that resumes from the last checkpoint after an interruption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch


def start_run(output_dir: str, threads: int | None, seed: int) -> Path:
    """The run's folder (created), torch's threads and every seed set."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    L.seed_everything(seed, workers=True, verbose=False)
    return out


def fit_resuming(module: L.LightningModule, out: Path, epochs: int, progress: bool, loaders: dict[str, Any],
                 accelerator: str = "cpu", **trainer_args) -> L.Trainer:
    """Fit for `epochs` with a checkpoint per epoch (out/checkpoints) and CSV logs (out/logs), resuming from
    out/checkpoints/last.ckpt when an earlier run left one."""
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=-1,
                                                      every_n_epochs=1)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_epochs=epochs, callbacks=[checkpoints],
        logger=L.pytorch.loggers.CSVLogger(out, name="logs"), enable_progress_bar=progress, log_every_n_steps=10,
        num_sanity_val_steps=0, enable_model_summary=False, **trainer_args,
    )
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(module, ckpt_path=str(last) if last.is_file() else None, **loaders)
    return trainer
