"""Optimizers, the per-epoch learning-rate schedule, clipping and the weights' moving average."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from factorlm.train.config import TrainConfig


# Adagrad's sparse update builds COO tensors and PyTorch notes that it skips their invariant
# checks; the tensors come from autograd's own embedding backward, so there is nothing to check.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(
            params, lr=config.lr, initial_accumulator_value=config.adagrad_initial_accumulator,
            weight_decay=config.weight_decay,
        )
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
        if config.precondition_factors:
            precondition_factor_steps(optimizer, model)
        return optimizer
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def precondition_factor_steps(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Before every step of ``optimizer``, turn the gradients of ``model``'s F-LSTM factors into
    scaled-gradient-descent directions (:meth:`factorlm.nn.FLSTM.precondition_factor_gradients_`).

    Plain SGD on W = W2·W1 scales the step on W by the factors' Gram matrices, which grow
    during training: with Zaremba's lr 1 the product's top singular values run away (to ~200
    in 1,200 PTB steps against ~15 for a dense W) and the model stalls (BENCHMARKS.md). Only
    SGD gets this: Adagrad and Adam rescale every coordinate themselves and stay as the paper
    ran them. Models without F-LSTM layers are untouched (no hook is registered).
    """
    # any layer with factors to precondition (F-LSTM today; a later factorized cell opts in the same way)
    layers = [m for m in model.modules() if callable(getattr(m, "precondition_factor_gradients_", None))]
    if layers:
        def precondition(opt, args, kwargs):
            for layer in layers:
                layer.precondition_factor_gradients_()

        optimizer.register_step_pre_hook(precondition)


def sparse_ok(config: TrainConfig) -> bool:
    """Whether sparse embedding/softmax gradients give exactly the dense result for this recipe.

    Adagrad and plain SGD leave a row with a zero gradient unchanged (its accumulator too), so
    skipping it is exact; weight decay or Adam would move every row. Clipping over all
    parameters would need the norm of sparse gradients: recipes that clip everything stay dense.
    """
    return (config.sparse_gradients and config.optimizer in ("adagrad", "sgd") and config.weight_decay == 0
            and (config.clip_norm is None or config.clip_scope == "rnn"))


def lr_for_epoch(config: TrainConfig, epoch: int) -> float:
    """Zaremba et al.'s schedule: lr until lr_decay_start_epoch, then × lr_decay per epoch (0-based)."""
    return config.lr * config.lr_decay ** max(0, epoch - config.lr_decay_start_epoch + 1)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_parameters(model: nn.Module, config: TrainConfig) -> list[nn.Parameter]:
    """What clip_norm applies to: the recurrent layers' parameters (the paper) or all of them."""
    if config.clip_scope == "all":
        return [p for p in model.parameters() if p.requires_grad]
    return [p for p in model.parameter_groups()["rnn"] if p.requires_grad]


class EMA:
    """Exponential moving average of the weights: avg ← d·avg + (1 − d)·w after each step.

    d = min(decay, (1 + t) / (10 + t)) at step t (TensorFlow's ExponentialMovingAverage with
    num_updates): without the warm-up, after t steps a weight of decay^t stays on the initial
    weights (37% after 1,000 steps at 0.999), which makes short runs evaluate a half-trained
    average and favours whichever model took more steps in a time-budgeted comparison.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    def decay_at(self, step: int | None) -> float:
        """The decay used after optimizer step ``step`` (0-based; None: the configured decay)."""
        return self.decay if step is None else min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Move the average towards the model's weights; ``step``: steps done before this one."""
        weight = 1.0 - self.decay_at(step)
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach(), weight)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the model's weights with the averaged ones (call twice to restore)."""
        for name, p in model.named_parameters():
            tmp = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name].copy_(tmp)
