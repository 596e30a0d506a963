"""Several processes under torchrun: the process group, and the collectives the training loop needs.

``torchrun --nproc_per_node=N -m factorlm train ...`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT in their environment; :func:`init_processes` joins them into one
``torch.distributed`` group (NCCL on CUDA, one GPU per local rank; gloo on CPU). One process
(no WORLD_SIZE, or 1) needs none of this and every function here is then the identity.

The step is synchronous data parallelism written with plain collectives rather than
DistributedDataParallel, because the model's largest gradients are sparse (the embedding's and
the sampled softmax's touched rows, factorlm.models.lm.LanguageModel.use_sparse_gradients):

- dense gradients: one all-reduce of a flat buffer, divided by the world size (the mean);
- sparse gradients: every rank's (row ids, row values) are all-gathered and summed into one
  sparse gradient, divided by the world size: only touched rows cross the wire (a dense
  all-reduce of the paper's 793,470 × 1024 embedding would move 3.2 GB per step).

Every gradient is the mean over ranks, so with each rank's loss the mean over its B rows, the
step equals one process's step on the global batch of B × world_size rows (the original code
summed the sparse gradients over GPUs but averaged the LSTM ones; this does not).
"""

from __future__ import annotations

import datetime
import os
import time
import uuid
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from factorlm.errors import SetupError

#: collectives wait this long for the slowest rank (rank 0 alone writes checkpoints and evaluates)
TIMEOUT = datetime.timedelta(hours=2)
#: how long the processes of one launch wait for each other to join the group
JOIN_TIMEOUT = datetime.timedelta(minutes=15)


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "ProcessInfo":
        """This process's place, from torchrun's environment (one process when it is not set)."""
        try:
            info = cls(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                       local_rank=int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError as exc:
            raise SetupError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {exc}") from None
        if info.world_size < 1 or not 0 <= info.rank < info.world_size:
            raise SetupError(f"RANK={info.rank} is not in [0, WORLD_SIZE={info.world_size})")
        return info


def init_processes(device: torch.device) -> tuple[ProcessInfo, torch.device]:
    """Join torchrun's process group (once) and pick this process's device.

    device: what the user asked for (cpu, cuda). On CUDA each local rank takes its own GPU
    (cuda:LOCAL_RANK) and the backend is NCCL; on CPU it is gloo. One line for impossible set-ups:
    CUDA asked for on a machine without it, fewer GPUs than local ranks.
    """
    info = ProcessInfo.from_env()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(f"device {device} asked for, but this machine has no CUDA GPU "
                                f"(NCCL needs one GPU per process); use --device cpu (gloo)")
        if info.distributed:
            if info.local_rank >= torch.cuda.device_count():
                raise SetupError(f"LOCAL_RANK={info.local_rank} but this node has {torch.cuda.device_count()} "
                                    f"GPU(s): start at most that many processes per node")
            device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(device)
    if info.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _fresh_store(info)
        dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size,
                                timeout=TIMEOUT)
    return info, device


def _fresh_store(info: ProcessInfo) -> dist.Store:
    """torchrun's key-value store under a prefix no earlier launch of this run has used.

    Why: torchrun (c10d rendezvous, torch >= 2.4) keeps one store for the whole run, across elastic
    restarts, and torch.distributed's keys are the same at every restart, so a restarted rank could
    read the address a killed rank published and fail to connect (pytorch/pytorch#135712): every
    restart then fails the same way. TORCHELASTIC_RESTART_COUNT cannot name the launch either, as
    nodes count restarts apart. So rank 0 takes the next generation number from the store and hands
    it to each other rank in answer to that rank's own random token: a token is answered only once
    (its answer key then exists), so an earlier launch's token is never mistaken for this one's.
    """
    store, _, _ = next(dist.rendezvous("env://", rank=info.rank, world_size=info.world_size,
                                       timeout=JOIN_TIMEOUT))
    return dist.PrefixStore(f"factorlm/{agree_generation(store, info)}/group/", store)


def agree_generation(store: dist.Store, info: ProcessInfo) -> int:
    """The number of this launch of the run, the same on every rank (1, 2, ... at each restart)."""
    if info.rank == 0:
        generation = store.add("factorlm/generation", 1)
        waiting = set(range(1, info.world_size))
        deadline = time.monotonic() + JOIN_TIMEOUT.total_seconds()
        while waiting:
            for rank in sorted(waiting):
                # a rank that has joined this generation is done; one that has not may have sent a token
                if store.check([f"factorlm/{generation}/joined/{rank}"]):
                    waiting.discard(rank)
                elif store.check([f"factorlm/token/{rank}"]):
                    token = store.get(f"factorlm/token/{rank}").decode()
                    if not store.check([f"factorlm/answer/{token}"]):
                        store.set(f"factorlm/answer/{token}", str(generation))
            if waiting and time.monotonic() > deadline:
                raise SetupError(f"rank(s) {sorted(waiting)} did not join within {JOIN_TIMEOUT}")
            time.sleep(0.01 if waiting else 0)
    else:
        token = uuid.uuid4().hex
        store.set(f"factorlm/token/{info.rank}", token)
        generation = int(store.get(f"factorlm/answer/{token}").decode())  # waits, up to JOIN_TIMEOUT
        store.set(f"factorlm/{generation}/joined/{info.rank}", "1")
    return generation


def any_rank(flag: bool, info: ProcessInfo, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (an all-reduce with MAX); every rank must call it."""
    return any_rank_each([flag], info, device)[0]


def any_rank_each(flags: list[bool], info: ProcessInfo, device: torch.device) -> list[bool]:
    """For each flag, whether it is true on any rank: one all-reduce for all of them."""
    if not info.distributed:
        return [bool(f) for f in flags]
    value = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


def average_gradients(params: Iterable[torch.nn.Parameter], info: ProcessInfo) -> None:
    """Replace every parameter's gradient by its mean over ranks (module docstring).

    A parameter without a gradient on this rank counts as a zero gradient, so that every rank
    takes part in the same collectives in the same order. Sparse gradients stay sparse.
    """
    if not info.distributed:
        return
    params = [p for p in params if p.requires_grad]
    dense = [p for p in params if p.grad is None or not p.grad.is_sparse]
    sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
    if dense:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(info.world_size)
        offset = 0
        for p, g in zip(dense, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n
    for p in sparse:
        p.grad = _mean_sparse(p.grad, info)


def _mean_sparse(grad: Tensor, info: ProcessInfo) -> Tensor:
    """The mean over ranks of a sparse COO row gradient: touched rows all-gathered, summed by coalesce."""
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    count = torch.tensor([rows.numel()], dtype=torch.int64, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(info.world_size)]
    dist.all_gather(counts, count)
    longest = max(int(c) for c in counts)
    # all_gather needs equal shapes: pad every rank's rows to the longest, then cut each back
    padded_rows = torch.zeros(longest, dtype=rows.dtype, device=rows.device)
    padded_rows[: rows.numel()] = rows
    padded_values = values.new_zeros((longest, *values.shape[1:]))
    padded_values[: rows.numel()] = values
    all_rows = [torch.empty_like(padded_rows) for _ in range(info.world_size)]
    all_values = [torch.empty_like(padded_values) for _ in range(info.world_size)]
    dist.all_gather(all_rows, padded_rows)
    dist.all_gather(all_values, padded_values)
    rows = torch.cat([r[: int(c)] for r, c in zip(all_rows, counts)])
    values = torch.cat([v[: int(c)] for v, c in zip(all_values, counts)]) / info.world_size
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, grad.shape).coalesce()


def gather_to_main(obj, info: ProcessInfo) -> list | None:
    """Every rank's ``obj`` (picklable plain data and CPU tensors) as a list on rank 0; None elsewhere."""
    if not info.distributed:
        return [obj]
    gathered = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather_tensor(tensor: Tensor, info: ProcessInfo, dim: int) -> Tensor:
    """Every rank's ``tensor`` (equal shapes) concatenated along ``dim`` in rank order."""
    if not info.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def all_reduce_sum(value: float, info: ProcessInfo, device: torch.device) -> float:
    """The sum of ``value`` over ranks (float64)."""
    if not info.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def barrier(info: ProcessInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(*, together: bool = False) -> None:
    """Leave the process group (harmless when there is none). together: wait for every rank first
    (after a run that ended normally: a rank tearing gloo down while another still sends aborts it);
    never after an error on one rank, whose peers would wait for it forever."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
