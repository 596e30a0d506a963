"""Exact evaluation: perplexity, per-sentence scores and sampling.

Exact perplexity. Every target token of a split is scored exactly once, the loss is averaged per
token (not per batch) and the recurrent state is carried across the whole token stream, so the
result does not depend on the evaluation batch size. (The paper's code scored padding, dropped the
leftover tokens and averaged per batch; its README told users to evaluate with batch size 1.)

Batching a single stream without changing its result: the stream's N targets are cut into B
contiguous segments of equal length (the last may be shorter), one per batch row:

    stream:  <S> w w w w w w w w w w w w w w w w w w w w w w w
    row 0:   <S> w w w w w w w                                    starts from the zero state
    row 1:                   w w w w w w w w                      starts from row 0's final state
    row 2:                                   w w w w w w w w      starts from row 1's final state

Pass 1 runs all rows from the zero state. Each further pass restarts row s from the final state row
s-1 reached in the previous pass, until those starting states stop changing (to ``tol``): then every
row began from the state a single unbatched pass would have had there, and the scores equal batch
size 1's. An LSTM forgets its initial state within a segment, so 2 passes are usual.

Early stop (``stop_early=True``, the default): a further pass need not re-score a row whole. A row
restarted from a new state soon meets the trajectory it followed before (the LSTM forgets where it
started), and from there on its states, and so its scores, are the ones already kept. So pass 1
keeps every row's state (h and c of every layer) at a few checkpoints, the ends of chunk k = 1, 2,
..., 8 of ``num_steps`` steps and then of chunks 16, 32, 64, ... (and the row's end); a re-scored
row is compared with its kept state at each checkpoint, and once every state entry agrees to
``tol`` (the tolerance that decides convergence) the row stops and keeps its earlier scores from
there on. Stopped rows leave the batch, so the remaining rows run as a smaller batch and the work
really shrinks: pass 2 re-scores a few chunks per row instead of the whole row. A row that
never agrees (a state that does not forget) is re-scored to its end, as before, and its new states
replace the kept ones, so a later pass compares with the trajectory whose scores are kept. Only rows
whose starting state changed by more than ``tol`` are re-scored at all (row 0 never is).
Memory: C ≈ 6 + log2(L / num_steps) checkpoints (L: a row's length; 14 for L = 10,000 at 20
steps) of B · S numbers each (S = num_layers · (p + n) per row), against the B · S of the state
itself; for the paper's BIGLSTM (S = 18,432) at B = 64 that is 63 MiB in fp32. Keeping every
chunk's state instead would grow with the corpus (L / num_steps of them: 2.2 GiB there).
``stop_early=False`` re-scores every row whole in every pass (the two full passes of before).

The tokens after a row's stop are scored from a state within ``tol`` of the one re-scoring would
have reached (and, in a forgetting LSTM, converging to it), so the loss differs from the two full
passes' by far less than ``tol`` per such token: in float64 on the built-in corpus the perplexities
agreed to 6e-11 (relative) while pass 2 re-scored 3 chunks per row instead of the whole row.

A state that does not forget (a saturated forget gate) propagates one row per pass: after pass j,
rows 0..j-1 started from their exact states, so their scores are final, and row j's exact start is
the final state row j-1 reached in pass j. Waiting for convergence would then take B passes, B
times batch size 1's work. So after ``max_passes`` passes without convergence the remaining rows
(from the first whose start still changed) are scored one after another at batch size 1, each from
the previous row's final state, in windows of B * num_steps tokens (the memory of one batched
window). The work is at most max_passes batched passes plus one pass over the stream at batch size
1, and the result is still batch size 1's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
from torch import Tensor

from factorlm.data.batching import stream_rows
from factorlm.distributed import ProcessInfo, all_gather_tensor, all_reduce_sum
from factorlm.models.lm import map_state
from factorlm.progress import Progress
from factorlm.validate import check_int

#: Pass 1 keeps the rows' states at the ends of the first DENSE_CHECKPOINTS chunks, then at the
#: ends of chunks 16, 32, 64, ... (see the module docstring): a re-scored row stops at most one
#: chunk after agreeing early on, and at most twice as far as needed later, for O(log L) states.
DENSE_CHECKPOINTS = 8


def _state_tensors(state) -> list[Tensor]:
    if isinstance(state, Tensor):
        return [state]
    return [t for s in state for t in _state_tensors(s)]


def _map_states(fn, a, b):
    """fn(x, y) for each pair of tensors of two states of the same structure (map_state for two)."""
    if isinstance(a, Tensor):
        return fn(a, b)
    return type(a)(_map_states(fn, x, y) for x, y in zip(a, b))


def _row_distance(a, b) -> Tensor:
    """Largest absolute difference per batch row (dim 1) over every tensor of two states -> (B,)."""
    per_tensor = [(x - y).abs().transpose(0, 1).reshape(x.shape[1], -1).amax(dim=1)
                  for x, y in zip(_state_tensors(a), _state_tensors(b))]
    return torch.stack(per_tensor).amax(dim=0)


def checkpoint_positions(length: int, num_steps: int) -> list[int]:
    """The time steps (counted from a row's start, each a chunk's end) at which pass 1 keeps the
    rows' states: chunks 1..DENSE_CHECKPOINTS, then chunks 16, 32, 64, ..., and the row's end."""
    chunks = -(-length // num_steps)
    kept = [k * num_steps for k in range(1, chunks)
            if k <= DENSE_CHECKPOINTS or (k & (k - 1)) == 0]
    return kept + [length]


@dataclass
class EvalResult:
    loss: float  # mean negative log-likelihood per target token, nats
    perplexity: float
    tokens: int  # number of target tokens scored
    passes: int = 1  # batched state-propagation passes used (see module docstring)
    sequential_rows: int = 0  # rows scored one after another at batch size 1 after the passes
    # token positions scored again after pass 1 (re-scored rows up to their early stop, and the
    # rows scored in order); pass 1 itself scores rows * row length positions
    rescored_tokens: int = 0

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "loss": self.loss, "tokens": self.tokens, "passes": self.passes,
                "sequential_rows": self.sequential_rows, "rescored_tokens": self.rescored_tokens}


@torch.no_grad()
def evaluate_stream(
    model,
    stream: Tensor,
    *,
    batch_size: int = 64,
    num_steps: int = 20,
    tol: float = 1e-5,
    max_passes: int = 3,
    stop_early: bool = True,
    device: torch.device | str | None = None,
    progress: bool | str = False,
    processes: ProcessInfo | None = None,
) -> EvalResult:
    """Exact mean loss of ``model`` over a 1-D token stream (boundary first; N = len - 1 targets).

    model: a LanguageModel (forward(inputs (T, B), state) -> (hidden, state); loss(hidden, targets,
    sampled=False) -> (T, B); init_state(B)). batch_size: rows scored side by side (see the module
    docstring); tol: the largest change of the rows' starting states that counts as converged, and
    the largest state difference at which a re-scored row stops early; max_passes: batched passes
    before the remaining rows are scored in order at batch size 1. stop_early: stop re-scoring a
    row where its state meets the kept one (False: re-score every row whole in every pass, the
    reference the early stop is tested against).
    progress: show progress on stderr (True, or a label such as "valid" to show it under).
    processes: under torchrun, every rank calls this with the same stream and scores its own
    block of rows (batch_size rounded up to a multiple of the world size); the rows' final states
    are all-gathered after each pass, so every rank takes the same decisions, and the result is
    the same exact loss as one process's (each target scored once overall).
    """
    check_int("batch_size", batch_size)
    check_int("num_steps", num_steps)
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise ValueError(f"max_passes must be an integer >= 1, got {max_passes!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if not isinstance(progress, (bool, str)):
        raise TypeError(f"progress must be True, False or a label, got {type(progress).__name__}")
    processes = processes or ProcessInfo()
    world, rank = processes.world_size, processes.rank
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    layout = stream_rows(stream, -(-batch_size // world) * world)
    inputs, targets, mask = layout.inputs.to(device), layout.targets.to(device), layout.mask.to(device)
    targets_total = layout.num_targets
    length, rows = inputs.shape
    # this rank's block of rows (all of them in one process)
    first_row, last_row = rank * rows // world, (rank + 1) * rows // world
    local_inputs, local_targets = inputs[:, first_row:last_row], targets[:, first_row:last_row]
    local_rows = last_row - first_row

    label = progress if isinstance(progress, str) else "evaluate"
    # planned work in token positions: at most 2 passes usually (1 for a single row); revised later
    bar = Progress(min(rows, 2) * length * rows, f"{label}, pass 1", unit="tokens", enabled=bool(progress))
    token_loss = torch.zeros(length, local_rows, dtype=torch.float64, device=device)
    start = model.init_state(local_rows, device=device)  # the start of each row's kept scores
    positions = checkpoint_positions(length, num_steps) if stop_early else [length]
    kept_states: dict[int, object] = {}  # position -> (L, local_rows, ·) state of the kept scores there
    scoring = torch.arange(local_rows, device=device)  # the rows this pass scores
    passes = sequential_rows = rescored = 0
    first_in_order = rows  # the first row scored in order (rows: none)
    in_order = None  # losses of the rows scored in order, when the state did not converge
    try:
        while True:
            passes += 1
            done = _score_pass(model, local_inputs, local_targets, token_loss, kept_states, positions, scoring,
                               map_state(lambda t: t[:, scoring], start), num_steps=num_steps, tol=tol,
                               stop=stop_early and passes > 1, bar=bar, world=world)
            if passes > 1:
                rescored += done
            if passes == rows:  # every row started from its exact state
                break
            # row s should start where row s - 1 ended; row 0 starts from zeros
            final = map_state(lambda t: all_gather_tensor(t, processes, dim=1), kept_states[length])
            shifted = map_state(lambda t: torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], dim=1), final)
            next_start = map_state(lambda t: t[:, first_row:last_row].contiguous(), shifted)
            change = all_gather_tensor(_row_distance(next_start, start), processes, dim=0)  # (rows,)
            moved = torch.nonzero(change > tol).view(-1)
            if moved.numel() == 0:
                break
            if passes == max_passes:
                # Rows before the first that moved are final (their starts held to tol); row
                # `first_in_order` starts from its predecessor's final state. Rank 0 scores the rest
                # in order (one stream: no parallelism to share). The old passes restarted every
                # row, and so from row `passes` on (rows 0..passes-1 are final after pass `passes`).
                first_in_order = int(moved[0]) if stop_early else passes
                sequential_rows = rows - first_in_order
                bar.phase(f"{label}, rows {first_in_order + 1}-{rows} of {rows} in order (the state did not "
                          f"converge)", bar.done + sequential_rows * length)
                if processes.is_main:
                    row_start = map_state(lambda t: t[:, first_in_order : first_in_order + 1].contiguous(), shifted)
                    in_order = _score_rows_in_order(model, inputs[:, first_in_order:], targets[:, first_in_order:],
                                                    row_start, window=num_steps * rows, bar=bar)
                    rescored += sequential_rows * length
                break
            if stop_early:  # only the rows whose start moved; the others' scores stand
                local_moved = moved[(moved >= first_row) & (moved < last_row)] - first_row
                scoring = local_moved.to(device)
                start = _map_states(lambda s, n: s.index_copy(1, scoring, n[:, scoring]), start, next_start)
                planned = moved.numel() * length
            else:
                start, planned = next_start, rows * length
            bar.phase(f"{label}, pass {passes + 1}", bar.done + planned)
    finally:
        model.train(was_training)
        bar.close()
    kept = mask[:, first_row:last_row].clone()
    if sequential_rows:  # this rank's rows from `first_in_order` on were scored in order instead
        kept[:, max(0, first_in_order - first_row):] = False
    total = token_loss[kept].sum().item()
    if in_order is not None:
        total += in_order[mask[:, first_in_order:]].sum().item()
    total = all_reduce_sum(total, processes, device)
    rescored = int(all_reduce_sum(float(rescored), processes, device))
    loss = total / targets_total
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=targets_total, passes=passes,
                      sequential_rows=sequential_rows, rescored_tokens=rescored)


def _score_pass(model, inputs: Tensor, targets: Tensor, token_loss: Tensor, kept_states: dict, positions: list[int],
                rows: Tensor, state, *, num_steps: int, tol: float, stop: bool, bar: Progress, world: int) -> int:
    """Score ``rows`` (R,) of ``inputs`` / ``targets`` (L, B) from ``state`` (batch R) into
    ``token_loss`` (L, B) float64, chunk by chunk; returns the token positions scored.

    At each checkpoint position the rows' states are written to ``kept_states`` (position ->
    state of batch B), the states of the trajectory whose scores are kept. With ``stop``, a row
    whose state agrees with the kept one there to ``tol`` stops instead: its kept scores and
    states from there on are already those it would reach, and it leaves the batch.
    """
    length, batch = inputs.shape
    if rows.numel() == 0:  # under torchrun, none of this rank's rows moved
        return 0
    whole = rows.numel() == batch  # all rows: plain slices, no gathers
    checkpoints = set(positions)
    scored = 0
    for t0 in range(0, length, num_steps):
        t1 = min(t0 + num_steps, length)
        if whole:
            hidden, state = model(inputs[t0:t1], state)
            token_loss[t0:t1] = model.loss(hidden, targets[t0:t1], sampled=False)
        else:
            hidden, state = model(inputs[t0:t1, rows], state)
            token_loss[t0:t1, rows] = model.loss(hidden, targets[t0:t1, rows], sampled=False).to(token_loss.dtype)
        scored += (t1 - t0) * rows.numel()
        bar.update((t1 - t0) * rows.numel() * world)
        if t1 not in checkpoints:
            continue
        if t1 not in kept_states:  # pass 1 (all rows)
            kept_states[t1] = map_state(torch.clone, state)
            continue
        if stop:
            going = _row_distance(state, map_state(lambda t: t[:, rows], kept_states[t1])) > tol
            if not bool(going.all()):  # some rows met their kept trajectory: they stop here
                rows, state = rows[going], map_state(lambda t: t[:, going], state)
                whole = False
        kept_states[t1] = _map_states(lambda k, s: k.index_copy(1, rows, s), kept_states[t1], state)
        if rows.numel() == 0:
            break
    return scored


def _score_rows_in_order(model, inputs: Tensor, targets: Tensor, state, *, window: int, bar: Progress) -> Tensor:
    """Losses (L, R) float64 of the rows of ``inputs`` / ``targets`` (L, R) read as one stream at
    batch size 1, row 0 from ``state`` (batch 1) and each row from the previous row's final state.

    The window length does not change the result (the state is carried), so the windows are as
    long as the memory of a batched window allows.
    """
    length, rows = inputs.shape
    flat_inputs = inputs.t().reshape(-1, 1)  # (L * R, 1): row 0's tokens, then row 1's, ...
    flat_targets = targets.t().reshape(-1, 1)
    loss = torch.empty(length * rows, dtype=torch.float64, device=inputs.device)
    for t0 in range(0, length * rows, window):
        hidden, state = model(flat_inputs[t0 : t0 + window], state)
        loss[t0 : t0 + window] = model.loss(hidden, flat_targets[t0 : t0 + window], sampled=False).view(-1)
        bar.update(hidden.shape[0])
    return loss.view(rows, length).t()


@torch.no_grad()
def score_sentences(model, sentences: list[list[int]], boundary_id: int, *, batch_size: int = 64, device=None) -> list[tuple[float, int]]:
    """Log-probability (natural log) of each sentence on its own, and its number of scored tokens.

    Each sentence is scored as ``<S> w1 … wn <S>`` from the zero state: the n words and the closing
    boundary are the n + 1 targets. Sentences are batched by length; the result keeps input order.
    """
    check_int("batch_size", batch_size)
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    results: list[tuple[float, int] | None] = [None] * len(sentences)
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            seqs = [[boundary_id, *sentences[i], boundary_id] for i in chunk]
            longest = max(len(s) for s in seqs)
            batch = torch.full((longest, len(seqs)), boundary_id, dtype=torch.long)
            for b, seq in enumerate(seqs):
                batch[: len(seq), b] = torch.tensor(seq)
            lengths = torch.tensor([len(s) - 1 for s in seqs])
            mask = torch.arange(longest - 1).unsqueeze(1) < lengths.unsqueeze(0)
            batch = batch.to(device)
            hidden, _ = model(batch[:-1], model.init_state(len(seqs), device=device))
            loss = model.loss(hidden, batch[1:], sampled=False).double().cpu() * mask
            for b, i in enumerate(chunk):
                results[i] = (-loss[:, b].sum().item(), int(lengths[b]))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def check_temperature(value, name: str = "temperature") -> float:
    """A sampling temperature: a finite number > 0 (NaN would make every probability NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def sample_index(probs: Tensor, generator: torch.Generator | None = None) -> int:
    """One index drawn with probability ``probs[i]`` (a 1-D CPU tensor of non-negative weights,
    any positive sum): the first i whose cumulative sum exceeds u · total, u uniform in [0, 1).

    Inverse-CDF sampling, the same distribution as torch.multinomial(probs, 1), which on a CPU
    takes 250 µs for 10,000 words and 18 ms for the 793,470 of the 1B Word vocabulary (AVX2
    EPYC); this takes 35 µs and 1.3 ms, and at batch-1 generation it was the largest cost of a
    small model's token. The sum is taken in float64, so its rounding does not bias the tail. An
    index of zero weight (top-k masked) is never drawn: the cumulative sum does not rise there.
    """
    cumulative = probs.double().cumsum(0)
    total = cumulative[-1]
    if not total > 0:
        raise ValueError(f"cannot sample from weights that sum to {float(total)}")
    u = torch.rand((), generator=generator, dtype=torch.float64)
    index = int(torch.searchsorted(cumulative, u * total, right=True))
    if index >= probs.numel():  # u · total rounded up to total: the last index of positive weight
        index = int(torch.nonzero(probs).max())
    return index


@torch.no_grad()
def generate(
    model,
    prompt: list[int],
    boundary_id: int,
    *,
    max_tokens: int = 50,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    device=None,
) -> list[int]:
    """Sample a continuation of ``<S> prompt`` until the sentence boundary or ``max_tokens`` words.

    temperature > 0 divides the logits; top_k keeps the k most likely words. Returns the new ids
    (without the closing boundary).
    """
    check_temperature(temperature)
    check_int("max_tokens", max_tokens, 0)
    check_int("top_k", top_k, optional=True)
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    try:
        context = torch.tensor([boundary_id, *prompt], dtype=torch.long, device=device).unsqueeze(1)
        hidden, state = model(context, model.init_state(1, device=device))
        out: list[int] = []
        for _ in range(max_tokens):
            logits = model.log_probs(hidden[-1:]).reshape(-1).float() / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = sample_index(torch.softmax(logits, dim=0).cpu(), generator)
            if token == boundary_id:
                break
            out.append(token)
            hidden, state = model(torch.tensor([[token]], device=device), state)
    finally:
        model.train(was_training)
    return out

