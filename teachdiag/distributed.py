"""Shard a probe run over torchrun ranks: each rank probes every world-th context.

    torchrun --nproc_per_node 8 -m teachdiag probe --teacher T --student S --contexts c.jsonl --out runs/r1
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \
        -m teachdiag probe ...                                      # several nodes (README: SLURM)

Every rank reads the same contexts and draws the same positions (the sample depends on the seed,
never on the world size), takes contexts rank, rank + world, rank + 2·world, ... of the work left,
and appends its rows to its own part of the run folder (table.py). Rank 0 writes run.json and,
after a barrier, merges the parts into tokens.csv in the single-process order, so the table equals
a one-process run value for value. The process group only synchronises (barriers), so it uses
gloo on CPU and GPU nodes alike: nothing large crosses between ranks.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist



def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init() -> tuple[int, int, int]:
    """Join the process group when launched by torchrun with more than one rank."""
    rank, size, local = world()
    if size > 1 and not dist.is_initialized():
        # the last barrier waits for the slowest rank to finish its shard: allow a long wait
        hours = float(os.environ.get("TEACHDIAG_BARRIER_HOURS", "48"))
        dist.init_process_group("gloo", timeout=timedelta(hours=hours))
    return rank, size, local


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_float(value: float) -> float:
    """Rank 0's value on every rank (gloo, CPU tensor); the value itself without torchrun."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list, rank: int, size: int) -> list:
    """This rank's share: items rank, rank + size, ... (round robin keeps shards balanced
    when contexts are in file order, since positions are sampled uniformly over the file)."""
    return items[rank::size]


def rank_device(device: torch.device, local_rank: int, size: int) -> torch.device:
    """One GPU per rank on a multi-GPU node: cuda → cuda:<local rank>."""
    if device.type == "cuda" and size > 1 and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device
