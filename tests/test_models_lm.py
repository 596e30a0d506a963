"""LanguageModel: shapes, state carry, losses, tying, dropout placement, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import factorlm.nn as fnn
from factorlm.models import LanguageModel, ModelConfig, SampledSoftmax, detach_state
from factorlm.nn import count_parameters

TOL = dict(rtol=1e-10, atol=1e-12)
V = 13


def config(cell="lstm", **kw) -> ModelConfig:
    base = dict(vocab_size=V, embedding_size=8, hidden_size=8, num_layers=2, cell=cell, forget_bias=0.5)
    if cell == "flstm":
        base["rank"] = (3, 5)
    if cell == "glstm":
        base["groups"] = (2, 4)
    base.update(kw)
    return ModelConfig(**base)


def model(cell="lstm", **kw) -> LanguageModel:
    return LanguageModel(config(cell, **kw)).double()


def tokens(T=5, B=3):
    return torch.randint(0, V, (T, B))


VARIANTS = [
    dict(),
    dict(proj_size=4, embedding_size=6),
    dict(residual=True),
    dict(residual=True, proj_size=4, embedding_size=4, tie_embeddings=True),
    dict(tie_embeddings=True),
    dict(num_layers=3, residual=True, num_sampled=5, rank=2, groups=2),
]


@pytest.mark.parametrize("cell", ["lstm", "flstm", "glstm"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "plain")
def test_forward_shapes_and_state(cell, variant):
    lm = model(cell, **variant)
    c = lm.config
    hidden, (h, c_n) = lm(tokens(5, 3))
    assert hidden.shape == (5, 3, c.output_size)
    assert h.shape == (c.num_layers, 3, c.output_size) and c_n.shape == (c.num_layers, 3, c.hidden_size)
    assert lm.loss(hidden, tokens(5, 3)).shape == (5, 3)
    assert lm.log_probs(hidden).shape == (5, 3, V)
    zeros = lm.init_state(3)
    assert [tuple(t.shape) for t in zeros] == [tuple(h.shape), tuple(c_n.shape)]
    assert all(t.dtype == torch.float64 and not t.any() for t in zeros)


def test_fast_path_is_one_multi_layer_module_and_residual_one_module_per_layer():
    plain = model("flstm")
    assert isinstance(plain.rnn, fnn.FLSTM) and plain.rnn.num_layers == 2 and plain.rnn.rank == (3, 5)
    residual = model("glstm", residual=True)
    assert [type(m) for m in residual.rnn] == [fnn.GLSTM, fnn.GLSTM]
    assert [m.groups for m in residual.rnn] == [(2,), (4,)]  # per-layer groups kept
    assert all(m.num_layers == 1 and m.forget_bias == 0.5 for m in residual.rnn)


@pytest.mark.parametrize("cell", ["lstm", "flstm", "glstm"])
@pytest.mark.parametrize("residual", [False, True])
def test_state_carry_two_windows_equal_one(cell, residual):
    lm = model(cell, residual=residual, dropout=0.3).eval()
    x = tokens(9, 4)
    full, (h, c) = lm(x)
    first, state = lm(x[:4])
    second, (h2, c2) = lm(x[4:], detach_state(state))
    torch.testing.assert_close(torch.cat([first, second]), full, **TOL)
    torch.testing.assert_close(h2, h, **TOL)
    torch.testing.assert_close(c2, c, **TOL)


def test_residual_adds_each_layer_input_to_its_output():
    lm = model("lstm", residual=True, num_layers=3).eval()
    x = tokens()
    state = (torch.randn(3, 3, 8, dtype=torch.float64), torch.randn(3, 3, 8, dtype=torch.float64))
    hidden, (h, c) = lm(x, state)
    a = lm.embedding(x)
    hs = []
    for k, layer in enumerate(lm.rnn):
        out, (hk, _) = layer(a, (state[0][k : k + 1], state[1][k : k + 1]))
        a = a + out
        hs.append(hk)
    torch.testing.assert_close(hidden, a, **TOL)
    torch.testing.assert_close(h, torch.cat(hs), **TOL)


def test_loss_is_the_log_softmax_nll():
    lm = model("glstm", proj_size=4, embedding_size=6)
    x, y = tokens(), tokens()
    hidden, _ = lm(x)
    logits = hidden @ lm.softmax.weight.t() + lm.softmax.bias
    want = -torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lm.loss(hidden, y), want, **TOL)
    torch.testing.assert_close(lm.log_probs(hidden), torch.log_softmax(logits, -1), **TOL)


def test_sampled_softmax_while_training_full_softmax_in_evaluation():
    lm = model("lstm", num_sampled=4)
    assert isinstance(lm.softmax, SampledSoftmax) and lm.softmax.num_sampled == 4
    hidden, _ = lm(tokens())
    y = tokens()
    full = lm.softmax.nll(hidden, y)
    sampled = lm.loss(hidden, y, generator=torch.Generator().manual_seed(3))
    want = lm.softmax.sampled_nll(hidden, y, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sampled, want, **TOL)
    assert not torch.allclose(sampled, full)
    torch.testing.assert_close(lm.loss(hidden, y, sampled=False), full, **TOL)
    lm.eval()
    torch.testing.assert_close(lm.loss(hidden, y), full, **TOL)  # evaluation: always the exact loss
    forced = lm.loss(hidden, y, sampled=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(forced, want, **TOL)
    # without num_sampled, training uses the full softmax too
    plain = model("lstm").train()
    h2, _ = plain(tokens())
    torch.testing.assert_close(plain.loss(h2, y), plain.softmax.nll(h2, y), **TOL)
    with pytest.raises(ValueError, match="sampled=True needs a model built with num_sampled > 0"):
        plain.loss(h2, y, sampled=True)


def test_sampled_and_full_models_share_a_state_dict():
    sampled, full = model("lstm", num_sampled=4), model("lstm")
    full.load_state_dict(sampled.state_dict())
    x = tokens()
    torch.testing.assert_close(sampled.eval()(x)[0], full.eval()(x)[0], **TOL)


def test_tied_weights_share_storage_count_and_gradient():
    untied = model("lstm")
    tied = model("lstm", tie_embeddings=True)
    assert tied.softmax.weight is tied.embedding.weight
    assert tied.softmax.weight.data_ptr() == tied.embedding.weight.data_ptr()
    assert count_parameters(untied) - count_parameters(tied) == V * 8
    assert "softmax.weight" not in dict(tied.named_parameters())
    # the shared weight's gradient is the sum of its two uses (as two separate tensors)
    untied.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        untied.softmax.weight.copy_(tied.embedding.weight)
    x, y = tokens(), tokens()
    for lm in (tied, untied):
        hidden, _ = lm(x)
        lm.loss(hidden, y).sum().backward()
    both_uses = untied.embedding.weight.grad + untied.softmax.weight.grad
    torch.testing.assert_close(tied.embedding.weight.grad, both_uses, **TOL)
    # and an optimizer step moves both views together
    with torch.no_grad():
        tied.embedding.weight.add_(1.0)
    torch.testing.assert_close(tied.softmax.weight, tied.embedding.weight, rtol=0, atol=0)


def test_parameter_groups_partition_the_parameters():
    for lm in (model("flstm", tie_embeddings=True), model("glstm", residual=True, num_sampled=3)):
        groups = lm.parameter_groups()
        ids = [id(p) for params in groups.values() for p in params]
        assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in lm.parameters()}
        assert {id(p) for p in groups["rnn"]} == {id(p) for n, p in lm.named_parameters() if n.startswith("rnn.")}
    tied = model("lstm", tie_embeddings=True)
    assert tied.parameter_groups()["softmax"] == [tied.softmax.bias]  # the shared weight counts once
    assert tied.parameter_groups()["embedding"][0] is tied.softmax.weight


def test_rnn_macs_per_token_sum_the_layers():
    plain, residual = model("flstm"), model("flstm", residual=True)
    assert plain.rnn_macs_per_token() == residual.rnn_macs_per_token() == plain.rnn.macs_per_token()
    assert plain.rnn_macs_per_token() == 3 * (8 + 8) + 32 * 3 + 5 * (8 + 8) + 32 * 5


# ----------------------------------------------------------------- dropout
def test_eval_mode_is_deterministic_and_dropout_free():
    lm = model("flstm", dropout=0.5).eval()
    same = model("flstm")
    same.load_state_dict(lm.state_dict())
    x = tokens()
    a, b = lm(x)[0], lm(x)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, same.eval()(x)[0], rtol=0, atol=0)


@pytest.fixture
def dropout_calls(monkeypatch):
    """Record every F.dropout call that is active (training and p > 0): (input, output, p)."""
    calls = []
    original = F.dropout

    def recording(input, p=0.5, training=True, inplace=False):
        output = original(input, p, training, inplace)
        if training and p > 0:
            calls.append((input, output, p))
        return output

    monkeypatch.setattr(F, "dropout", recording)  # nn.Dropout and factorlm.nn both call F.dropout
    return calls


@pytest.mark.parametrize("cell", ["lstm", "flstm", "glstm"])
def test_dropout_on_the_embedding_and_every_layer_output(cell, dropout_calls):
    L = 3
    lm = model(cell, num_layers=L, dropout=0.5, rank=3, groups=2)
    lm.rnn.impl = "reference"  # the per-step twin drops between layers with F.dropout, where we can see it
    x = tokens(6, 4)
    hidden, _ = lm(x)
    assert [p for _, _, p in dropout_calls] == [0.5] * (L + 1)  # embedding, L - 1 between layers, last output
    embedded = lm.embedding(x)
    torch.testing.assert_close(dropout_calls[0][0], embedded, **TOL)
    assert dropout_calls[-1][1] is hidden
    for inp, out, _ in dropout_calls:
        dropped = out == 0
        assert 0.2 < dropped.double().mean() < 0.8  # about half of the units are zeroed ...
        torch.testing.assert_close(out[~dropped], 2 * inp[~dropped], **TOL)  # ... and the rest scaled by 2
    lm.eval()
    dropout_calls.clear()
    lm(x)
    assert dropout_calls == []


def test_residual_dropout_on_the_embedding_and_each_layer_output():
    L = 3
    lm = model("lstm", num_layers=L, residual=True, dropout=0.5)
    inputs, outputs = [], []

    def record(module, args, out):
        inputs.append(args[0])
        outputs.append(out[0])

    for layer in lm.rnn:
        layer.register_forward_hook(record)
    x = tokens(6, 4)
    hidden, _ = lm(x)
    embedded = lm.embedding(x)
    # layer 1 sees the dropped embedding; each later input (and the hidden output) adds the dropped
    # output of the layer before to that layer's input
    steps = [inputs[0], *(inputs[k + 1] - inputs[k] for k in range(L - 1)), hidden - inputs[-1]]
    for k, (step, source) in enumerate(zip(steps, [embedded, *outputs])):
        kept = step != 0
        assert 0.2 < (~kept).double().mean() < 0.8, k
        torch.testing.assert_close(step[kept], 2 * source[kept], **TOL)


# --------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "cell, variant",
    [
        ("lstm", dict(proj_size=3, embedding_size=3)),
        ("flstm", dict(residual=True)),
        ("glstm", dict(tie_embeddings=True)),
    ],
)
def test_gradcheck_through_the_whole_model(cell, variant):
    lm = model(cell, **{**dict(vocab_size=5, embedding_size=4, hidden_size=4, rank=2, groups=2), **variant}).eval()
    names = [name for name, _ in lm.named_parameters()]
    x, y = torch.randint(0, 5, (3, 2)), torch.randint(0, 5, (3, 2))
    h0 = torch.randn(2, 2, lm.config.output_size, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, state):
            hidden, (h, c) = self.lm(x, state)
            return self.lm.loss(hidden, y), h, c

    wrapper = Loss()

    def f(h0, c0, *params):
        return functional_call(wrapper, {f"lm.{n}": p for n, p in zip(names, params)}, ((h0, c0),))

    params = [p.detach().clone().requires_grad_() for p in lm.parameters()]
    assert torch.autograd.gradcheck(f, (h0, c0, *params))


# ------------------------------------------------------------- initialisation
def test_init_scale_draws_every_parameter_uniformly():
    lm = LanguageModel(config("flstm", init_scale=0.05, vocab_size=400, embedding_size=32, hidden_size=32))
    for name, p in lm.named_parameters():
        assert p.abs().max() <= 0.05, name
        assert p.abs().max() > 0.04, name  # spread over the whole interval, biases included
        assert abs(p.mean().item()) < 0.05 / math.sqrt(p.numel()) * 5, name


def test_default_initialisation():
    lm = LanguageModel(config("lstm", vocab_size=2000, embedding_size=64, hidden_size=32, proj_size=16))
    assert abs(lm.embedding.weight.std().item() - 1 / 8) < 0.01  # N(0, 1/E)
    assert abs(lm.softmax.weight.std().item() - 1 / 4) < 0.01  # N(0, 1/p)
    assert not lm.softmax.bias.any()
    bound = 1 / math.sqrt(32)
    assert all(p.abs().max() <= bound for p in lm.rnn.parameters())  # torch.nn.LSTM's U(±1/√n)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kw, error, match",
    [
        (
            dict(tie_embeddings=True, proj_size=4),
            ValueError,
            "tie_embeddings needs the output size .* got output size 4 and embedding_size 8",
        ),
        (
            dict(residual=True, embedding_size=6),
            ValueError,
            "residual needs embedding_size == output size .* got embedding_size 6 and output size 8",
        ),
        (dict(num_sampled=-1), ValueError, "num_sampled must be an integer >= 0 .* got -1"),
        (dict(num_sampled=14), ValueError, "num_sampled=14 distinct candidates cannot be drawn from vocab_size=13"),
        (dict(dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\), got 1.0"),
    ],
)
def test_construction_errors(kw, error, match):
    with pytest.raises(error, match=match):
        LanguageModel(config("lstm", **kw))


def test_config_errors():
    with pytest.raises(ValueError, match="init_scale must be a positive number or None, got -0.1"):
        config(init_scale=-0.1)
    with pytest.raises(TypeError, match="expects a ModelConfig, got dict"):
        LanguageModel({"vocab_size": 10})


def test_forward_and_state_errors():
    lm = model("lstm")
    with pytest.raises(ValueError, match=r"int64 word ids, got a torch.float32 tensor of shape \(5, 3\)"):
        lm(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="inputs .* of int64 word ids, got a list"):
        lm([[1, 2]])
    with pytest.raises(ValueError, match=r"int64 word ids, got a torch.int64 tensor of shape \(5,\)"):
        lm(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"T >= 1 and B >= 1, got shape \(0, 3\)"):
        lm(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"state h must have shape \(2, 3, 8\) \(L, B, ·\), got \(2, 4, 8\)"):
        lm(tokens(), lm.init_state(4))
    with pytest.raises(ValueError, match="state must be a tuple"):
        lm(tokens(), torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        lm.init_state(0)
    hidden, _ = lm(tokens())
    with pytest.raises(ValueError, match=r"targets must have shape \(5, 3\)"):
        lm.loss(hidden, tokens(4, 3))


def test_detach_state_cuts_the_graph():
    lm = model("lstm")
    _, state = lm(tokens())
    assert all(t.requires_grad for t in state)
    cut = detach_state(state)
    assert isinstance(cut, tuple) and not any(t.requires_grad for t in cut)
    assert all(torch.equal(a, b) for a, b in zip(cut, state))
    nested = detach_state([state, state])
    assert isinstance(nested, list) and not nested[1][0].requires_grad


@pytest.mark.parametrize("num_sampled", [0, 5])
@pytest.mark.parametrize("training", [False, True])
def test_forward_with_targets_returns_the_loss_of_loss(num_sampled, training):
    lm = model("flstm", num_sampled=num_sampled).train(training)  # no dropout: only sampling draws numbers
    x, y = tokens(), tokens()
    torch.manual_seed(0)
    hidden, state = lm(x)
    want = lm.loss(hidden, y)  # sampled while training with num_sampled > 0, else exact
    torch.manual_seed(0)
    got, got_state = lm(x, targets=y)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_state, state, **TOL)
    with pytest.raises(ValueError, match=r"targets must have the inputs' shape \(5, 3\), got \(4, 3\)"):
        lm(x, targets=tokens(4, 3))
