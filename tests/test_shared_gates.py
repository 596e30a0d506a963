"""The options every cell takes beside coupled gates: shared gates (one n-row gate map, each gate g
getting s_g ⊙ a + b_g) and a low-rank projection (W_hr = P2·P1).

Every cell with each option, coupled or not, on every CPU impl, against an independent float64
reference built from the layer's parameters by plain indexing (torch.nn.LSTM, helpers.DenseCIFG for
coupled gates, helpers.DiagonalReference for the diagonal LSTM with a projection): outputs, states
and the gradients of the input, the initial state and every parameter (s, the n-row weights, P1, P2
included), to 1e-10. Then exact parameter and multiply-add counts, conversion, the one-step path,
the errors, and the options through ModelConfig, the budget and the command line.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import factorlm.nn as fnn
from factorlm.budget import fit_rnn_params
from factorlm.cli import main
from factorlm.count import count_model
from factorlm.errors import ConfigWarning
from factorlm.models import LanguageModel, ModelConfig
from factorlm.nn.registry import example_cell_args
from helpers import (CELLS, DenseCIFG, DiagonalReference, circulant_from_blocks, make_layer, packed_data,
                     weighted_loss)

TOL = dict(rtol=1e-10, atol=1e-12)

# a G∘F-LSTM example rank may give a small shared group as many factor parameters as its block: said, not wrong
pytestmark = pytest.mark.filterwarnings("ignore::factorlm.errors.ConfigWarning")


def _shared_layer(cell, *, coupled=False, proj_size=4, proj_rank=None, num_layers=2, **kw):
    """A small float64 layer with shared gates whose scales, biases and state are not their
    initial values (s = 1 would hide a mix-up of gates)."""
    layer = make_layer(cell, num_layers=num_layers, proj_size=proj_size, per_layer=num_layers > 1, forget_bias=0.7,
                       coupled_gates=coupled, shared_gates=True, proj_rank=proj_rank, **kw)
    with torch.no_grad():
        for name, weight in layer.named_parameters():
            if name.startswith("gate_scale"):
                weight.uniform_(-1.5, 1.5)
    return layer


def _shared_rows(layer, k: int, suffix: str):
    """The n-row maps of layer k that the gates share, from its parameters by plain indexing:
    (W_x (n, p_in), W_h (n, p)), or for the diagonal LSTM (W_x (n, p_in), u (n,))."""
    n, p_in, p = layer.hidden_size, layer.layer_input_size(k), layer.output_size
    get = lambda name: getattr(layer, name + suffix)  # noqa: E731
    if isinstance(layer, fnn.DiagonalLSTM):
        return get("weight_ih"), get("weight_hh")[0]
    if isinstance(layer, fnn.LSTM):
        return get("weight_ih"), get("weight_hh")
    if isinstance(layer, fnn.FLSTM):
        w = get("weight_w2") @ get("weight_w1")
        return w[:, :p_in], w[:, p_in:]
    if isinstance(layer, fnn.CirculantLSTM):
        return circulant_from_blocks(get("weight_ih")), circulant_from_blocks(get("weight_hh"))
    g = layer.groups[k]  # G-LSTM / G∘F-LSTM: group j's rows are cells j·n/g ...
    if isinstance(layer, fnn.GLSTM):
        blocks = torch.cat([get("weight_ih"), get("weight_hh")], dim=2)
    else:
        blocks = torch.stack([w2 @ w1 for w1, w2 in zip(get("weight_w1"), get("weight_w2"))])
    rows = []
    for cell in range(n):
        j, m = divmod(cell, n // g)
        row = torch.zeros(p_in + p, dtype=torch.float64)
        row = row.index_put((torch.arange(j * p_in // g, (j + 1) * p_in // g),), blocks[j, m, : p_in // g])
        row = row.index_put((torch.arange(p_in + j * p // g, p_in + (j + 1) * p // g),), blocks[j, m, p_in // g :])
        rows.append(row)
    w = torch.stack(rows)
    return w[:, :p_in], w[:, p_in:]


def _reference(layer):
    """(module, weights): an independent reference of ``layer`` and the differentiable tensors to call
    it with, built from the shared maps: gate g's rows of each gate matrix s_g[c]·(row c), one gate
    after another; W_hr = P2·P1."""
    n, gates = layer.hidden_size, layer.num_gates
    diagonal_with_projection = isinstance(layer, fnn.DiagonalLSTM) and layer.proj_size
    if diagonal_with_projection:  # its recurrence reads tanh(c): no torch.nn.LSTM; the layer's parameter names
        plain = fnn.DiagonalLSTM(layer.input_size, n, num_layers=layer.num_layers, proj_size=layer.proj_size,
                                 bidirectional=layer.bidirectional, batch_first=layer.batch_first,
                                 forget_bias=layer.forget_bias, coupled_gates=layer.coupled_gates).double()
        module = DiagonalReference(plain)
    else:
        module = (DenseCIFG if layer.coupled_gates else torch.nn.LSTM)(
            layer.input_size, n, num_layers=layer.num_layers, batch_first=layer.batch_first,
            bidirectional=layer.bidirectional, proj_size=layer.proj_size).double()
    weights = {}
    for k in range(layer.num_layers):
        for d in range(layer.num_directions):
            suffix = f"_l{k}" + ("_reverse" if d else "")
            scale = getattr(layer, "gate_scale" + suffix)
            w_x, w_h = _shared_rows(layer, k, suffix)
            expand = lambda w: torch.cat([scale[g].view(n, *(1,) * (w.dim() - 1)) * w for g in range(gates)])  # noqa
            bias = getattr(layer, "bias" + suffix)
            if layer.proj_rank:
                w_hr = getattr(layer, "weight_hr2" + suffix) @ getattr(layer, "weight_hr1" + suffix)
            else:
                w_hr = getattr(layer, "weight_hr" + suffix, None)
            if diagonal_with_projection:
                weights.update({"weight_ih" + suffix: expand(w_x), "weight_hh" + suffix: scale * w_h,
                                "bias" + suffix: bias, "weight_hr" + suffix: w_hr})
                continue
            if isinstance(layer, fnn.DiagonalLSTM):
                w_h = torch.diag(w_h)
            forget = torch.zeros(gates * n, dtype=torch.float64)
            if layer.coupled_gates:
                forget[:n] = -layer.forget_bias
            else:
                forget[n : 2 * n] = layer.forget_bias
            weights.update({"weight_ih" + suffix: expand(w_x), "weight_hh" + suffix: expand(w_h),
                            "bias_ih" + suffix: bias, "bias_hh" + suffix: forget})
            if layer.proj_size:
                weights["weight_hr" + suffix] = w_hr
    return module, weights


def _check(layer, impl, *, batch=3, steps=4, lengths=None):
    """The layer under ``impl`` and its independent reference agree on output, h_n, c_n and every
    gradient (lengths: a PackedSequence of those lengths, unsorted)."""
    layer.impl = impl
    shape = (batch, steps, layer.input_size) if layer.batch_first else (steps, batch, layer.input_size)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    L = layer.num_layers * layer.num_directions
    h0 = torch.randn(L, batch, layer.output_size, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(L, batch, layer.hidden_size, dtype=torch.float64, requires_grad=True)
    pack = (lambda t: t) if lengths is None else (
        lambda t: pack_padded_sequence(t, lengths, batch_first=layer.batch_first, enforce_sorted=False))
    out, (h_n, c_n) = layer(pack(x), (h0, c0))
    module, weights = _reference(layer)
    ref_out, (ref_h, ref_c) = functional_call(module, weights, (pack(x), (h0, c0)))
    assert type(out) is type(ref_out)
    for ours, theirs in ((packed_data(out), packed_data(ref_out)), (h_n, ref_h), (c_n, ref_c)):
        torch.testing.assert_close(ours, theirs, **TOL)
    leaves = [x, h0, c0, *layer.parameters()]
    grads = torch.autograd.grad(weighted_loss(out, h_n, c_n), leaves, materialize_grads=True)
    ref_grads = torch.autograd.grad(weighted_loss(ref_out, ref_h, ref_c), leaves, materialize_grads=True)
    names = ["x", "h0", "c0", *(name for name, _ in layer.named_parameters())]
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL, msg=lambda m: f"{name}: {m}")


def _cpu_impls(cell, coupled):
    allowed = make_layer(cell, coupled_gates=coupled, shared_gates=True)._implementations
    return [impl for impl in ("reference", "torch", "extension") if impl in allowed]


GRID = [(cell, coupled, impl) for cell in CELLS for coupled in (False, True) for impl in _cpu_impls(cell, coupled)]


@pytest.mark.parametrize("cell,coupled,impl", GRID)
@pytest.mark.parametrize("proj_size,proj_rank", [(0, None), (4, (2, 3))], ids=["noproj", "hr-rank"])
def test_shared_gates_match_the_independent_reference(cell, coupled, impl, proj_size, proj_rank):
    if impl == "extension":
        from factorlm.ops import _extension

        if not _extension.is_available():
            pytest.skip(f"C++ extension unavailable: {_extension.build_error()}")
    _check(_shared_layer(cell, coupled=coupled, proj_size=proj_size, proj_rank=proj_rank), impl)


@pytest.mark.parametrize("cell", CELLS)
def test_bidirectional_packed_batch_first_with_both_options(cell):
    layer = _shared_layer(cell, proj_rank=2, bidirectional=True, batch_first=True)
    _check(layer, "auto", batch=4, steps=5, lengths=[2, 5, 1, 4])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("coupled", [False, True])
def test_low_rank_projection_alone_matches_the_reference(cell, coupled):
    """proj_rank without shared gates: the cell's own G-gate weights, W_hr = P2·P1."""
    layer = make_layer(cell, num_layers=2, proj_size=4, proj_rank=3, forget_bias=0.7, coupled_gates=coupled)
    assert layer.weight_hr1_l1.shape == (3, 12) and layer.weight_hr2_l1.shape == (4, 3)
    assert not hasattr(layer, "weight_hr_l0")
    layer.impl = "reference"
    x = torch.randn(4, 3, 8, dtype=torch.float64)
    expected = layer(x)
    plain = make_layer(cell, num_layers=2, proj_size=4, forget_bias=0.7, coupled_gates=coupled)
    state = {name: t for name, t in layer.state_dict().items() if not name.startswith("weight_hr")}
    for k in range(2):
        state[f"weight_hr_l{k}"] = getattr(layer, f"weight_hr2_l{k}") @ getattr(layer, f"weight_hr1_l{k}")
    plain.load_state_dict(state)
    for impl in _cpu_impls(cell, coupled):
        layer.impl = plain.impl = impl
        got, want = layer(x), plain(x)
        for a, b, c in zip((got[0], *got[1]), (want[0], *want[1]), (expected[0], *expected[1])):
            torch.testing.assert_close(a, b, **TOL)
            torch.testing.assert_close(a, c, **TOL)


def _gate_weights(cell, n_rows, p_in, p, args):
    """Parameters of one layer's gate map whose gate tensors have ``n_rows`` rows (G·n, or n shared)."""
    if cell == "lstm":
        return n_rows * (p_in + p)
    if cell in ("flstm", "gflstm"):
        return args["rank"] * (p_in + p) + n_rows * args["rank"]
    if cell == "glstm":
        return n_rows * (p_in + p) // args["groups"]
    if cell == "circulant":
        return n_rows * (p_in + p) // args["block"]
    return n_rows * p_in + n_rows  # diagonal: W_ih and one u of n values per gate block


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_exact_parameter_and_multiply_add_counts(cell, coupled, bidirectional):
    """Shared gates: the cell's map with n rows + G·n scales + the G·n bias; MACs the n-row map + G·n
    scalings. proj_rank r: r·(n + p) for the projection's p·n, in parameters and MACs."""
    p_in, n, p, L, r = 16, 32, 8, 2, 3
    args = {"rank": 4, "groups": 2, "block": 4}
    args = {k: v for k, v in args.items() if k in example_cell_args(cell)}
    G, D = (3 if coupled else 4), (2 if bidirectional else 1)
    with torch.device("meta"):
        layer = fnn.CELLS[cell](p_in, n, num_layers=L, proj_size=p, bidirectional=bidirectional, coupled_gates=coupled,
                                shared_gates=True, proj_rank=r, **args)
        plain = fnn.CELLS[cell](p_in, n, num_layers=L, proj_size=p, bidirectional=bidirectional, coupled_gates=coupled,
                                **args)
    widths = [p_in, D * p]
    gate_map = [_gate_weights(cell, n, w, p, args) for w in widths]
    assert fnn.count_parameters(layer) == D * sum(m + 2 * G * n + r * (n + p) for m in gate_map)
    assert fnn.count_parameters(plain) == D * sum(_gate_weights(cell, G * n, w, p, args) + G * n + p * n
                                                  for w in widths)
    assert layer.gate_scale_l0.shape == (G, n) and layer.bias_l1.shape == (G * n,)
    # the diagonal's u ⊙ s counts n; C-LSTM counts the method it runs, with shared gates always the dense one
    macs = [n * (w + 1) if cell == "diagonal" else n * (w + p) if cell == "circulant" else
            _gate_weights(cell, n, w, p, args) for w in widths]
    assert layer.macs_per_token() == D * sum(m + G * n + r * (n + p) for m in macs)


@pytest.mark.parametrize("cell", CELLS)
def test_to_lstm_builds_the_equivalent_dense_lstm(cell):
    layer = _shared_layer(cell, proj_size=0 if cell == "diagonal" else 4,
                          proj_rank=None if cell == "diagonal" else 2, bidirectional=True)
    lstm = layer.to_lstm()
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        got, want = layer(x), lstm(x)
    for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
        torch.testing.assert_close(a, b, **TOL)
    coupled = _shared_layer(cell, coupled=True)
    with pytest.raises(ValueError, match=r"to_lstm\(\): this layer has coupled_gates=True"):
        coupled.to_lstm()


@pytest.mark.parametrize("cell", [c for c in CELLS if fnn.CELLS[c]._step_function is not None])
def test_one_step_without_autograd_equals_the_general_way(cell):
    """Batch-1 generation runs the step function on the materialised weights (coupled for the dense
    LSTM: its one-step path is G-LSTM's with one group)."""
    layer = _shared_layer(cell, coupled=cell == "lstm", proj_rank=3)
    x, h0, c0 = torch.randn(1, 1, 8), torch.randn(2, 1, 4), torch.randn(2, 1, 12)
    x, h0, c0 = x.double(), h0.double(), c0.double()
    layer.impl = "torch"
    with torch.no_grad():
        fast = layer(x, (h0, c0))
        layer.impl = "reference"
        slow = layer(x, (h0, c0))
    for a, b in zip((fast[0], *fast[1]), (slow[0], *slow[1])):
        torch.testing.assert_close(a, b, **TOL)


def test_options_are_checked_with_one_line_errors():
    with pytest.raises(ValueError, match=r"^shared_gates must be True or False, got 'yes'$"):
        make_layer("lstm", shared_gates="yes")
    with pytest.raises(ValueError, match=r"^proj_rank=2 factors the projection W_hr, which needs proj_size > 0; "
                                         r"got proj_size=0$"):
        make_layer("flstm", proj_rank=2)
    for bad in (0, 4, -1, 2.5):
        with pytest.raises(ValueError, match=rf"^proj_rank={bad} \(layer 0\) must be in 1\.\.3: below "
                                             rf"min\(hidden_size, proj_size\) = min\(12, 4\)"):
            make_layer("glstm", proj_size=4, proj_rank=bad)
    with pytest.raises(ValueError, match=r"proj_rank=5 \(layer 1\) must be in 1\.\.3"):
        make_layer("glstm", num_layers=2, proj_size=4, proj_rank=(2, 5))
    with pytest.raises(ValueError, match=r"^proj_rank has 3 entries \[1, 2, 3\] but num_layers=2"):
        make_layer("lstm", num_layers=2, proj_size=4, proj_rank=(1, 2, 3))
    layer = make_layer("circulant", proj_size=4, shared_gates=True)
    layer.method = "fft"
    with pytest.raises(RuntimeError, match=r"method='fft' does not compose with shared_gates"):
        layer(torch.randn(3, 2, 8, dtype=torch.float64))
    layer.method = "auto"
    assert layer.layer_method(0) == "dense"
    with pytest.raises(ValueError, match=r"proj_rank=\(2, 2\) factors the projection, which needs proj_size > 0"):
        ModelConfig(proj_rank=[2, 2])


def test_initial_scales_are_ones_and_repr_names_the_options():
    layer = fnn.GLSTM(8, 12, num_layers=2, proj_size=4, groups=2, shared_gates=True, proj_rank=(2, 3))
    assert all(torch.equal(getattr(layer, f"gate_scale_l{k}"), torch.ones(4, 12)) for k in range(2))
    assert "shared_gates=True, proj_rank=[2, 3]" in repr(layer)
    assert "shared_gates" not in repr(fnn.GLSTM(8, 12, groups=2))
    names = [name for name, _ in fnn.LSTM(8, 12, proj_size=4, shared_gates=True, proj_rank=2).named_parameters()]
    assert names == ["weight_ih_l0", "weight_hh_l0", "gate_scale_l0", "bias_l0", "weight_hr1_l0", "weight_hr2_l0"]


def test_language_model_budget_and_command_line(tmp_path, capsys):
    """ModelConfig carries both options (JSON round trip; residual stacks give each layer its rank;
    init_scale leaves s at 1); the budget fit counts them; --shared-gates --proj-rank on count."""
    config = ModelConfig(vocab_size=50, embedding_size=8, hidden_size=16, proj_size=8, num_layers=2, cell="glstm",
                         cell_args={"groups": 2}, shared_gates=True, proj_rank=(3, 5), residual=True, init_scale=0.1)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = LanguageModel(config)
    assert [layer.proj_rank for layer in model.rnn] == [(3,), (5,)]
    assert torch.equal(model.rnn[1].gate_scale_l0, torch.ones(4, 16))
    n, p, E = 16, 8, 8
    assert count_model(config)["rnn_params"] == sum(n * (E + p) // 2 + 8 * n + r * (n + p) for r in (3, 5))

    base = ModelConfig(vocab_size=50, embedding_size=32, proj_size=16, num_layers=2, cell="flstm",
                       cell_args={"rank": 8}, shared_gates=True, proj_rank=4)
    fit = fit_rnn_params(base, 20_000)
    assert fit.rnn_params <= 20_000 < count_model(fit.config.replace(hidden_size=fit.value + 8))["rnn_params"]
    assert fit.rnn_params == sum(8 * (w + 16) + fit.value * 8 + 8 * fit.value + 4 * (fit.value + 16) for w in (32, 16))
    # the projection's rank: 2848 + 160 (r - 1) parameters here, r in 1..15
    by_rank = fit_rnn_params(base.replace(hidden_size=64), 4_000, vary="proj_rank")
    assert (by_rank.varied, by_rank.value, by_rank.rnn_params) == ("proj_rank", 8, 2848 + 160 * 7)
    assert fit_rnn_params(base.replace(hidden_size=64), 10**6, vary="proj_rank").value == 15  # the largest valid

    out = tmp_path / "counts.json"
    assert main(["count", "--cell", "lstm", "--vocab", "100", "--emb", "16", "--hidden", "32", "--proj", "8",
                 "--layers", "1", "--shared-gates", "--proj-rank", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"| lstm shared hr=4 | {32 * (16 + 8) + 8 * 32 + 4 * (32 + 8):,} " in text
    saved = json.loads(out.read_text())[0]["config"]
    assert saved["shared_gates"] is True and saved["proj_rank"] == 4


def test_a_cell_without_a_shared_gate_layout_refuses_shared_gates_and_takes_proj_rank():
    """A registered cell gets proj_rank from the base class as it is; shared_gates it must declare
    (_shared_gate_layout), else it is refused rather than its scales left unread."""
    from factorlm.nn import reference
    from factorlm.nn.base import LSTMBase

    class Toy(LSTMBase):  # the dense LSTM written as a new cell type, with nothing about the options
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_layers()

        def _layer_parameter_shapes(self, layer):
            rows = self.num_gates * self.hidden_size
            return {"weight_ih": (rows, self.layer_input_size(layer)), "weight_hh": (rows, self.output_size)}

        def _gate_fn(self, layer, w):
            return lambda x_t, h: reference.dense_gates(x_t, h, w["weight_ih"], w["weight_hh"], w["bias"])

        def _dense_gate_weights(self, layer, w):
            return w["weight_ih"], w["weight_hh"], w["bias"]

    with pytest.raises(NotImplementedError, match=r"^Toy does not support shared_gates: it declares no "
                                                  r"_shared_gate_layout"):
        Toy(8, 12, shared_gates=True)
    layer = Toy(8, 12, num_layers=2, proj_size=4, proj_rank=3, bidirectional=True).double()
    lstm = layer.to_lstm()
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        got, want = layer(x), lstm(x)
    torch.testing.assert_close(got[0], want[0], **TOL)
    assert fnn.count_parameters(layer) == 2 * sum(4 * 12 * (w + 4) + 4 * 12 + 3 * (12 + 4) for w in (8, 8))


def test_compare_applies_both_options_to_every_model(tmp_path, monkeypatch):
    """--shared-gates --proj-rank on compare: every model gets both, named NAME-shared-hrR (what is
    trained is captured, not trained: test_compare.py trains a comparison end to end)."""
    import factorlm.compare
    import factorlm.data

    captured = []

    def capture(entries, corpus, out, budget, **kwargs):
        captured.extend(entries)
        (tmp_path / "cmp").mkdir()
        (tmp_path / "cmp" / "results.md").write_text("")
        return []

    monkeypatch.setattr(factorlm.compare, "run_comparison", capture)
    monkeypatch.setattr(factorlm.data, "open_corpus", lambda *args, **kwargs: None)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"preset": "debug", "model": {"cell": "glstm", "groups": 2, "proj_size": 16,
                                                                "hidden_size": 32}}))
    assert main(["compare", "--config", str(config), "--shared-gates", "--proj-rank", "4", "--max-steps", "1",
                 "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    assert [(e.name, e.model.shared_gates, e.model.proj_rank) for e in captured] == [("tiny-shared-hr4", True, 4)]
