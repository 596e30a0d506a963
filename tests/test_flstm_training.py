"""F-LSTM trains like the dense LSTM under Zaremba's SGD recipe (issue #9, BENCHMARKS.md).

Plain SGD on W = W2·W1 makes W's top singular values grow multiplicatively: under the
``ptb-small`` recipe (SGD lr 1, U(±0.1), clip 5) they ran away within 50 steps and the model
stalled. The trainer now takes scaled-gradient-descent steps on the factors by default.
"""

from __future__ import annotations

import json

import pytest
import torch

from factorlm.data.synthetic import SyntheticConfig, builtin_corpus
from factorlm.models import LanguageModel
from factorlm.nn import FLSTM
from factorlm.configs import preset
from factorlm.train.config import TrainConfig
from factorlm.train.loop import Trainer
from factorlm.train.optim import build_optimizer

STEPS = 200
#: The built-in language and training split, with small valid/test splits: fit() evaluates both at the end.
CORPUS = SyntheticConfig(valid_tokens=1_000, test_tokens=1_000)


def _short_run(tmp_path, cell: str, **model_changes):
    """STEPS steps of the ptb-small recipe (one layer of its 200 cells, to stay fast) on the built-in corpus."""
    model, train = preset("ptb-small")
    model = model.replace(num_layers=1, cell=cell, **model_changes)
    train = train.replace(epochs=None, max_steps=STEPS, log_every=50)
    trainer = Trainer(model, train, builtin_corpus(CORPUS), tmp_path / cell, show_progress=False)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / cell / "metrics.jsonl").read_text().splitlines()]
    last = [r["loss"] for r in records if r["kind"] == "train" and r["step"] == STEPS]
    weight_ih, weight_hh, _ = trainer.model.rnn.dense_gate_weights(0)
    top_singular_value = torch.linalg.svdvals(torch.cat([weight_ih, weight_hh], 1).detach())[0].item()
    return last[0], top_singular_value


def test_full_rank_flstm_trains_like_the_lstm_under_the_ptb_small_recipe(tmp_path):
    lstm_loss, lstm_top = _short_run(tmp_path, "lstm")
    flstm_loss, flstm_top = _short_run(tmp_path, "flstm", rank=200)
    # Before the fix: loss 0.15 nats above the LSTM's, top singular value ~50 against ~8.
    assert flstm_loss <= lstm_loss + 0.05, (flstm_loss, lstm_loss)
    assert flstm_top <= 1.5 * lstm_top, (flstm_top, lstm_top)


def test_preconditioned_factor_step_is_a_projected_dense_step():
    """To first order, SGD on the preconditioned factor gradients moves W2·W1 by -lr·(P2·G + G·P1)."""
    torch.manual_seed(0)
    layer = FLSTM(5, 4, rank=3).double()
    w1, w2 = layer.weight_w1_l0, layer.weight_w2_l0  # (3, 9), (16, 3)
    with torch.no_grad():
        w2.mul_(7.0)  # unbalanced, large factors: the plain step would be scaled by their Gram matrices
    g = torch.randn(16, 9, dtype=torch.float64)  # dL/dW for L = <G, W2·W1>
    (g * (w2 @ w1)).sum().backward()
    layer.precondition_factor_gradients_(damping=0.0)
    eps = 1e-6
    with torch.no_grad():
        step = (w2 - eps * w2.grad) @ (w1 - eps * w1.grad) - w2 @ w1
        p2 = w2 @ torch.linalg.pinv(w2)  # projection onto W2's columns
        p1 = torch.linalg.pinv(w1) @ w1  # projection onto W1's rows
    torch.testing.assert_close(step / eps, -(p2 @ g + g @ p1), rtol=1e-4, atol=1e-4)


def test_preconditioned_gradients_match_the_formula_with_damping():
    torch.manual_seed(1)
    layer = FLSTM(6, 4, rank=2, num_layers=2).double()
    for p in layer.parameters():
        p.grad = torch.randn_like(p)
    raw = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.precondition_factor_gradients_(damping=0.1)
    for k in range(2):
        w1, w2 = getattr(layer, f"weight_w1_l{k}"), getattr(layer, f"weight_w2_l{k}")
        gram2, gram1 = w2.T @ w2, w1 @ w1.T
        eye = torch.eye(2, dtype=torch.float64)
        expected1 = torch.linalg.solve(gram2 + 0.1 * gram2.trace() / 2 * eye, raw[f"weight_w1_l{k}"])
        expected2 = torch.linalg.solve(gram1 + 0.1 * gram1.trace() / 2 * eye, raw[f"weight_w2_l{k}"].T).T
        torch.testing.assert_close(w1.grad, expected1)
        torch.testing.assert_close(w2.grad, expected2)
        torch.testing.assert_close(getattr(layer, f"bias_l{k}").grad, raw[f"bias_l{k}"])  # untouched


@pytest.mark.parametrize("cell, optimizer, preconditioned",
                         [("flstm", "sgd", True), ("flstm", "adagrad", False), ("lstm", "sgd", False)])
def test_only_sgd_steps_on_flstm_factors_are_preconditioned(cell, optimizer, preconditioned):
    model_config, _ = preset("debug")
    model_config = model_config.replace(cell=cell, rank=8 if cell == "flstm" else None)
    after = {}
    for flag in (True, False):
        torch.manual_seed(0)
        model = LanguageModel(model_config)
        step = build_optimizer(model, TrainConfig(optimizer=optimizer, precondition_factors=flag))
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        step.step()
        after[flag] = model.state_dict()
    changed = {name for name, value in after[True].items() if not torch.equal(value, after[False][name])}
    assert changed == ({"rnn.weight_w1_l0", "rnn.weight_w2_l0", "rnn.weight_w1_l1", "rnn.weight_w2_l1"}
                       if preconditioned else set())
