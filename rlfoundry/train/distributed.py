"""Launching data-parallel training processes on one machine (CPU with gloo, or one GPU each with
NCCL) without torchrun: `spawn(fn, world_size, *args)` runs `fn(rank, world_size, *args)` in
`world_size` processes joined in one process group and returns rank 0's result. Used by the tests
and benchmarks; multi-node jobs use torchrun, which sets the same environment variables."""

from __future__ import annotations

import io
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def backend_for(device: torch.device) -> str:
    """The process-group backend for collectives on tensors of `device`: NCCL for CUDA tensors
    (it takes no others), gloo for the rest."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _entry(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    backend = backend_for("cuda" if torch.cuda.is_available() else "cpu")  # fn puts its tensors on cuda:rank
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        if rank == 0:  # as bytes: shared-memory tensors would vanish with this process
            buffer = io.BytesIO()
            torch.save(result, buffer)
            queue.put(("ok", buffer.getvalue()))
    except BaseException:
        queue.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, timeout: float = 600.0):
    """Run fn(rank, world_size, *args) on `world_size` local processes; return rank 0's result, or
    raise with the failing rank's traceback. `fn` must be importable (a module-level function)."""
    from rlfoundry.rollout.launch import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        status, result = queue.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise RuntimeError(f"distributed worker failed: {result}")
    return torch.load(io.BytesIO(result), weights_only=False)
