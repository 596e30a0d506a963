"""Functions the distributed tests run in each of several gloo processes (torch.multiprocessing.spawn
imports them by module name, so they live outside the test module)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from factorlm.distributed import ProcessInfo, average_gradients
from factorlm.evaluate import evaluate_stream
from factorlm.models import LanguageModel, ModelConfig
from factorlm.train.config import TrainConfig
from factorlm.train.optim import build_optimizer

#: a small float64 model whose embedding (and, with samples, softmax) gradients can be sparse
MODEL = ModelConfig(vocab_size=40, embedding_size=6, hidden_size=8, proj_size=0, num_layers=2, cell="glstm",
                    groups=2)
T, B = 5, 3  # steps, rows per rank


def step_data(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (T, B · world_size): the global batch."""
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, MODEL.vocab_size, (T + 1, B * world_size), generator=generator)
    return tokens[:-1], tokens[1:]


def one_step(model: LanguageModel, optimizer, inputs, targets, info: ProcessInfo) -> None:
    """The Trainer's step: loss summed over time, mean over this rank's rows; gradients averaged."""
    state = model.init_state(inputs.shape[1], dtype=torch.float64)
    token_loss, _ = model(inputs, state, targets=targets)
    optimizer.zero_grad(set_to_none=True)
    (token_loss.sum() / inputs.shape[1]).backward()
    average_gradients(model.parameters(), info)
    optimizer.step()


def build(optimizer: str, sparse: bool) -> tuple[LanguageModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = LanguageModel(MODEL).double()
    model.use_sparse_gradients(sparse)
    return model, build_optimizer(model, TrainConfig(optimizer=optimizer, lr=0.3))


def _join(rank: int, world_size: int, port: int) -> ProcessInfo:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return ProcessInfo.from_env()


def step_worker(rank: int, world_size: int, port: int, optimizer: str, sparse: bool, out: str) -> None:
    """One optimizer step on this rank's B columns of the global batch; rank 0 saves the parameters."""
    info = _join(rank, world_size, port)
    try:
        model, opt = build(optimizer, sparse)
        inputs, targets = step_data(world_size)
        mine = slice(rank * B, (rank + 1) * B)
        one_step(model, opt, inputs[:, mine], targets[:, mine], info)
        if sparse:
            assert model.embedding.weight.grad.is_sparse  # the exchange kept it sparse
        if info.is_main:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
        dist.barrier()  # leave together: a rank tearing gloo down while another still talks aborts
    finally:
        dist.destroy_process_group()


def evaluate_worker(rank: int, world_size: int, port: int, stream: torch.Tensor, batch_size: int, max_passes: int,
                    out: str) -> None:
    """Exact evaluation of ``stream`` shared among the ranks; rank 0 saves the result."""
    info = _join(rank, world_size, port)
    try:
        torch.manual_seed(0)
        model = LanguageModel(MODEL).double()
        result = evaluate_stream(model, stream, batch_size=batch_size, num_steps=4, max_passes=max_passes,
                                 processes=info)
        if info.is_main:
            torch.save(result.to_dict(), out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
