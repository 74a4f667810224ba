"""Sharded checkpoints with torch.distributed.checkpoint: model and optimizer state (each rank
writes its own shards under FSDP), plus the step, the RNG states and the data position, so that
`--resume` continues a killed run exactly. A checkpoint is written to a temporary directory and
renamed into place: a run killed while saving leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from rlfoundry.train.trainer import Trainer


def save_checkpoint(trainer: Trainer, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    with warnings.catch_warnings():  # a single process without a process group is fine
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    torch.save({"step": trainer.step, "rng": trainer.rng_state(), "extra": extra or {}}, tmp / "trainer_state.pt")
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    return directory


def load_checkpoint(trainer: Trainer, directory: str | os.PathLike) -> dict:
    """Restore a trainer in place; returns the `extra` dict saved with it (e.g. the data position)."""
    directory = Path(directory)
    if not (directory / "trainer_state.pt").exists():
        raise FileNotFoundError(f"{directory}: not a checkpoint (no trainer_state.pt)")
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    meta = torch.load(directory / "trainer_state.pt", weights_only=False)
    trainer.step = meta["step"]
    trainer.set_rng_state(meta["rng"])
    return meta["extra"]
