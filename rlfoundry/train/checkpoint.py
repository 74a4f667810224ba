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
import torch.distributed as dist

from rlfoundry.train.trainer import Trainer

# torch.distributed.checkpoint is imported where it is used: importing it takes ~1.3 s, which every
# process that reads a configuration (the RL driver and each of its actors) would otherwise pay.


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(trainer: Trainer, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save on every rank (collective); rank 0 writes the small files and swaps the directory in."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    # An optimizer that has not stepped yet has no state to save (and asking for its state dict
    # would make one up): then the model alone is saved, and a resume leaves the optimizer fresh.
    has_optim = bool(trainer.optimizer.state)
    if has_optim:
        model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
    else:
        state = {"model": get_model_state_dict(trainer.model)}
    with warnings.catch_warnings():  # a single process without a process group is fine
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(state, checkpoint_id=str(tmp))
    if _rank() != 0:  # every rank's RNG state, rank 0 moves the directory into place
        torch.save({"rng": trainer.rng_state()}, tmp / f"rng_rank{_rank()}.pt")
        _barrier()
        _barrier()
        return directory
    torch.save({"step": trainer.step, "rng": trainer.rng_state(), "extra": extra or {}, "has_optimizer": has_optim},
               tmp / "trainer_state.pt")
    _barrier()
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    _barrier()
    return directory


def load_checkpoint(trainer: Trainer, directory: str | os.PathLike) -> dict:
    """Restore a trainer in place; returns the `extra` dict saved with it (e.g. the data position)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    directory = Path(directory)
    if not (directory / "trainer_state.pt").exists():
        raise FileNotFoundError(f"{directory}: not a checkpoint (no trainer_state.pt)")
    meta = torch.load(directory / "trainer_state.pt", weights_only=False)
    has_optim = meta.get("has_optimizer", True)
    if has_optim:
        model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
    else:
        state = {"model": get_model_state_dict(trainer.model)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(directory))
    if has_optim:
        set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    else:
        set_model_state_dict(trainer.model, state["model"])
    trainer.step = meta["step"]
    rng = meta["rng"] if _rank() == 0 else torch.load(directory / f"rng_rank{_rank()}.pt", weights_only=False)["rng"]
    trainer.set_rng_state(rng)
    return meta["extra"]
