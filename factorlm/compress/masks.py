"""Pruning masks that survive training, and gradual magnitude pruning (Zhu & Gupta 2017).

A mask is a bool tensor of a parameter's shape, True where the weight is kept. The masks of a
run are a dict {parameter name: mask}, kept in every checkpoint under ``"prune_masks"`` (names
as ``model.named_parameters()`` gives them; a tied softmax weight may be named either way).
:class:`MaskHook` keeps the masked weights exactly zero while a Trainer trains:

- before each optimizer step it zeroes their (dense) gradients, so that clipping and the
  optimizer see the pruned network, as if the forward used w ⊙ mask (Zhu & Gupta's TF code);
- after each step it zeroes the weights again (what weight decay or a sparse gradient moved);
- whenever the masks change (when they are loaded, at each pruning event) it zeroes the
  optimizer's per-weight state of the pruned weights (Adam's moments, momentum, Adagrad's sums),
  which would otherwise push a weight away from zero again, and the EMA's average of them.

Gradual pruning (``TrainConfig.prune_to`` and the other ``prune_*`` settings) raises the
sparsity of each pruned matrix on the cubic schedule of "To prune, or not to prune" (Zhu &
Gupta 2017, eq. 1):

    s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(n·Δt))³      t = t0, t0 + Δt, ..., t0 + n·Δt

pruning after optimizer steps t0, t0 + Δt, ... (t0 = 0: before the first step) the weights of
smallest magnitude among those still kept, each matrix to s_t on its own. n·Δt is
``prune_steps`` (the last event is at t0 + prune_steps, also when Δt does not divide it). Masks
only ever lose entries: a pruned weight never comes back. Pruned by default: the recurrent
layers' weight matrices (gates, F-LSTM factors, projections); ``prune_scope="all"`` adds the
embedding and the softmax weight. Biases are never pruned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from factorlm.errors import CheckpointError
from factorlm.train.hooks import StepHook

__all__ = ["PRUNE_SCOPES", "PruneSchedule", "cubic_sparsity", "prunable_parameters", "magnitude_mask",
           "MaskHook", "check_masks"]

PRUNE_SCOPES = ("rnn", "all")
#: the checkpoint entry of a run's masks
KEY = "prune_masks"


@dataclass(frozen=True)
class PruneSchedule:
    """Zhu & Gupta's schedule: final sparsity s_f, initial s_i, first event t0, span n·Δt, every Δt."""

    final: float
    initial: float = 0.0
    start: int = 0
    steps: int = 1000
    every: int = 100

    @classmethod
    def from_config(cls, config) -> "PruneSchedule | None":
        """The schedule of a TrainConfig's ``prune_*`` settings (None when prune_to is None)."""
        if config.prune_to is None:
            return None
        return cls(final=config.prune_to, initial=config.prune_from, start=config.prune_start,
                   steps=config.prune_steps, every=config.prune_every)

    def sparsity(self, step: int) -> float:
        """s_t of eq. 1 at step ``step``: s_i up to t0, s_f from t0 + n·Δt on."""
        return cubic_sparsity(step, final=self.final, initial=self.initial, start=self.start, steps=self.steps)

    def is_event(self, step: int) -> bool:
        """Whether masks are recomputed after step ``step`` (0: before the first step)."""
        offset = step - self.start
        return 0 <= offset <= self.steps and (offset % self.every == 0 or offset == self.steps)

    def end(self) -> int:
        """The step of the last event, after which the sparsity is s_f."""
        return self.start + self.steps


def cubic_sparsity(step: int, *, final: float, initial: float = 0.0, start: int = 0, steps: int) -> float:
    """Zhu & Gupta's s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(n·Δt))³, with t clamped to [t0, t0 + n·Δt].

    steps: n·Δt, the steps from the first pruning event to the last.
    """
    progress = min(max((step - start) / steps, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def prunable_parameters(model: nn.Module, scope: str = "rnn") -> dict[str, nn.Parameter]:
    """{name: parameter} of what pruning acts on: the recurrent layers' weight matrices (every
    parameter of ``model.rnn`` with 2 or more dimensions: gate maps, factors, projections;
    biases are vectors), and with ``scope="all"`` the embedding and softmax weights too."""
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"prune scope must be one of {PRUNE_SCOPES}, got {scope!r}")
    groups = model.parameter_groups()
    chosen = {id(p) for p in groups["rnn"]}
    if scope == "all":
        chosen |= {id(p) for p in groups["embedding"] + groups["softmax"]}
    return {name: p for name, p in model.named_parameters() if id(p) in chosen and p.dim() >= 2}


def magnitude_mask(weight: Tensor, sparsity: float, mask: Tensor | None = None) -> Tensor:
    """The mask keeping the largest-magnitude entries of ``weight`` at ``sparsity`` (a fraction
    of all entries, rounded to the nearest count), never keeping what ``mask`` already prunes:
    at a sparsity below the mask's own, the mask is returned unchanged."""
    kept = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.clone()
    target = int(round(sparsity * weight.numel()))
    if target <= int((~kept).sum()):
        return kept
    score = weight.detach().abs().float().masked_fill(~kept, -1.0).flatten()  # the pruned rank lowest
    smallest = torch.topk(score, target, largest=False, sorted=False).indices
    kept.view(-1)[smallest] = False
    return kept


def check_masks(masks, model: nn.Module, source: str) -> dict[str, Tensor]:
    """Masks read from ``source`` keyed by ``model``'s canonical parameter names; a CheckpointError
    (one line) for a mapping that is not one of bool tensors of the named parameters' shapes."""
    if not isinstance(masks, Mapping):
        raise CheckpointError(f"{source}: {KEY!r} must map parameter names to bool tensors, got {type(masks).__name__}")
    aliases = dict(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): name for name, p in model.named_parameters()}
    checked = {}
    for name, mask in masks.items():
        if name not in aliases:
            raise CheckpointError(f"{source}: a prune mask names {name!r}, which is not a parameter of the model")
        param = aliases[name]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != param.shape:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise CheckpointError(f"{source}: the prune mask of {name} must be a bool tensor of shape "
                                  f"{tuple(param.shape)}, got {got}")
        checked[canonical[id(param)]] = mask
    return checked


class MaskHook(StepHook):
    """Keeps masked weights exactly zero through training and runs the gradual pruning schedule.

    masks: {canonical parameter name: bool mask} already checked (:func:`check_masks`);
    schedule: a :class:`PruneSchedule` or None (masks kept as they are); scope: what the
    schedule prunes (:func:`prunable_parameters`).
    """

    key = KEY

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor], schedule: PruneSchedule | None = None,
                 scope: str = "rnn") -> None:
        params = dict(model.named_parameters())
        self.schedule = schedule
        if schedule is not None:  # every matrix the schedule prunes gets a mask, kept whole until its first event
            masks = {**{name: torch.ones_like(p, dtype=torch.bool)
                        for name, p in prunable_parameters(model, scope).items()}, **masks}
        self.params = {name: params[name] for name in masks}
        self.masks = {name: mask.to(params[name].device) for name, mask in masks.items()}

    @classmethod
    def create(cls, model: nn.Module, config, saved: Mapping | None, source: str) -> "MaskHook | None":
        """The hook of a run: the masks saved under "prune_masks" in ``saved`` (a checkpoint, or
        what a fine-tuning run starts from), with the schedule of ``config`` (a TrainConfig);
        None when there are neither masks nor a schedule."""
        schedule = PruneSchedule.from_config(config)
        stored = (saved or {}).get(KEY)
        if stored is None and schedule is None:
            return None
        masks = check_masks(stored, model, source) if stored is not None else {}
        return cls(model, masks, schedule, config.prune_scope)

    # ------------------------------------------------------------- the hook
    def start(self, trainer) -> None:
        if self.schedule is not None and trainer.progress.step == 0 and self.schedule.is_event(0):
            self._prune(self.schedule.sparsity(0))
            trainer.logger.record("prune", 0, sparsity=self.sparsity())
        self._masks_changed(trainer)

    def before_update(self, trainer) -> None:
        for name, mask in self.masks.items():
            grad = self.params[name].grad
            if grad is not None and not grad.is_sparse:  # a sparse row update is undone after the step
                grad.mul_(mask)

    @torch.no_grad()
    def after_update(self, trainer, step: int) -> None:
        if self.schedule is not None and self.schedule.is_event(step):
            self._prune(self.schedule.sparsity(step))
            self._masks_changed(trainer)
            trainer.logger.record("prune", step, sparsity=self.sparsity())
        else:
            self.apply_()

    def state_dict(self) -> dict[str, Tensor]:
        return {name: mask.cpu() for name, mask in self.masks.items()}

    # ------------------------------------------------------------ the masks
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every masked weight."""
        for name, mask in self.masks.items():
            self.params[name].mul_(mask)

    def sparsity(self) -> float:
        """The fraction of masked entries over all masked parameters."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / total if total else 0.0

    def _prune(self, sparsity: float) -> None:
        for name, mask in self.masks.items():
            self.masks[name] = magnitude_mask(self.params[name], sparsity, mask)

    @torch.no_grad()
    def _masks_changed(self, trainer) -> None:
        """The weights, the optimizer's per-weight state and the EMA's average all zero where masked."""
        self.apply_()
        for name, mask in self.masks.items():
            param = self.params[name]
            for value in trainer.optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape and not value.is_sparse:
                    value.mul_(mask)
            if trainer.ema is not None:
                trainer.ema.shadow[name].mul_(mask)

