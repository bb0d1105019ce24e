"""The Lightning run every `vlacache train` objective shares: the output folder, threads and seeds, a trainer that
checkpoints every epoch (and, where the data's order can resume mid-epoch, every IN_EPOCH_EVERY steps within one)
and logs CSV, and a fit that resumes from the newest checkpoint after an interruption."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..eval.results import ResultsConflict
from ..messages import note, warn


RUN_FILE = "train_run.json"  # the settings a run's checkpoints were made with
# settings that do not change what a checkpoint holds: where it goes, how fast, how long, how it is exported
NOT_COUNTED = ("name", "output_dir", "threads", "epochs", "max_steps", "save_dtype")
# An epoch of a micro-deep policy is about an hour on one CPU core: a run interrupted mid-epoch resumes from the
# newest of these steps instead of the epoch's start.
IN_EPOCH_EVERY = 100
IN_EPOCH_NAME = "in-epoch"


def start_run(config: Any, restart: bool = False) -> Path:
    """The run's folder (created, and claimed: see `claim_folder`), torch's threads and every seed set."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    claim_folder(out, training_settings(config), restart)
    if config.threads:
        torch.set_num_threads(config.threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    return out


def training_settings(config: Any) -> dict[str, Any]:
    """What decides the checkpoints of a run: every setting of the train config but NOT_COUNTED, and the content
    of the demonstrations' index (a folder re-recorded in place is other data)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_COUNTED}
    folders = [config.demos, *getattr(config, "extra_demos", [])]
    settings["demos_index_sha256"] = [_index_hash(Path(f)) for f in folders]
    return json.loads(json.dumps(settings, default=str))


def _index_hash(folder: Path) -> str | None:
    index = folder / "index.jsonl"
    return hashlib.sha256(index.read_bytes()).hexdigest() if index.is_file() else None


def claim_folder(out: Path, settings: dict[str, Any], restart: bool) -> None:
    """Refuse to resume checkpoints made with other settings (naming them); `restart` moves the folder's
    previous run into out/restarted-<time>/ instead (nothing is deleted)."""
    path = out / RUN_FILE
    if restart:
        previous = [p for p in out.iterdir() if not p.name.startswith("restarted-")]
        if previous:
            dest = out / f"restarted-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.mkdir()
            for item in previous:
                item.rename(dest / item.name)
            note(f"moved the previous training run in {out} to {dest}")
    elif newest_checkpoint(out / "checkpoints"):
        if not path.is_file():
            warn(f"{out} holds checkpoints without a record of their settings (an older vlacache): resuming them "
                 f"under these settings; add --restart to start over")
        else:
            old = json.loads(path.read_text())
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if changed:
                raise ResultsConflict(
                    f"{out} holds a training run made with other settings ({', '.join(changed)}): resuming would mix "
                    f"them; pass a new output_dir=... or add --restart (the old run moves to {out}/restarted-<time>/)")
    path.write_text(json.dumps(settings, indent=1) + "\n")


def fit_resuming(module: L.LightningModule, out: Path, epochs: int, progress: bool, loaders: dict[str, Any],
                 accelerator: str = "cpu", resumable_mid_epoch: bool = False, **trainer_args) -> L.Trainer:
    """Fit for `epochs` with a checkpoint per epoch (out/checkpoints) and CSV logs (out/logs), resuming from the
    newest checkpoint an earlier run left. `resumable_mid_epoch`: the training data's order can resume mid-epoch
    (bc's PromptLengthBatches), so an overwritten in-epoch checkpoint is also written every IN_EPOCH_EVERY steps."""
    folder = out / "checkpoints"
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=-1, every_n_epochs=1)]
    if resumable_mid_epoch:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=folder, filename=IN_EPOCH_NAME, save_top_k=1, every_n_train_steps=IN_EPOCH_EVERY,
            enable_version_counter=False))
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_epochs=epochs, callbacks=callbacks,
        logger=L.pytorch.loggers.CSVLogger(out, name="logs"), enable_progress_bar=progress, log_every_n_steps=10,
        num_sanity_val_steps=0, enable_model_summary=False, **trainer_args,
    )
    trainer.fit(module, ckpt_path=newest_checkpoint(folder), **loaders)
    return trainer


def newest_checkpoint(folder: Path) -> str | None:
    """The checkpoint a resumed fit starts from: the later written of last.ckpt (an epoch's end) and the in-epoch
    one; None when the folder holds neither."""
    found = [p for p in (folder / "last.ckpt", folder / f"{IN_EPOCH_NAME}.ckpt") if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime_ns)) if found else None
