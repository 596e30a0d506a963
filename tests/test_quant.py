"""int8 inference and quantization-aware training (factorlm.quant): every cell type, the language
model on (a slice of) the built-in corpus, the quantize command and its errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from factorlm.cli import main
from factorlm.data import open_corpus, split_stream
from factorlm.evaluate import evaluate_stream
from factorlm.models import LanguageModel, ModelConfig
from factorlm.nn.registry import CELLS, example_cell_args
from factorlm.quant import QuantizedLanguageModel, _torchao, disable_qat, enable_qat, quantize_model
from factorlm.quant.fake import fake_quantize, fake_quantize_rows
from factorlm.quant.int8 import dequantize_rows, int8_linear, quantize_rows
from factorlm.quant.layers import QuantizedLSTM
from factorlm.quant.qat import qat_forward
from factorlm.runs import load_model
from factorlm.train.checkpoint import load_checkpoint, save_checkpoint
from factorlm.train.config import TrainConfig
from factorlm.train.loop import Trainer

needs_torchao = pytest.mark.skipif(not _torchao.available(), reason="torchao (the extra 'quant') is not installed")


# ------------------------------------------------------------------ arithmetic
def test_int8_linear_is_the_product_of_the_grids_values():
    """The int8 product equals, in float64, the product of the values the int8 grids stand for:
    the integer sums are exact, so the only error is the rounding onto the grids."""
    x, w, b = torch.randn(7, 33), torch.randn(5, 33), torch.randn(5)
    q_w, s_w = quantize_rows(w)
    assert q_w.dtype == torch.int8 and q_w.abs().max() == 127 and s_w.shape == (5,)
    q_x, s_x = quantize_rows(x)
    expected = dequantize_rows(q_x, s_x, torch.float64) @ dequantize_rows(q_w, s_w, torch.float64).T + b.double()
    torch.testing.assert_close(int8_linear(x, q_w, s_w, b).double(), expected, rtol=1e-6, atol=1e-6)
    # every value within half a step of its row's grid: |x - q·s| <= s / 2
    assert ((dequantize_rows(q_x, s_x) - x).abs() <= s_x[:, None] / 2 + 1e-7).all()
    assert quantize_rows(torch.zeros(2, 3))[0].eq(0).all()  # a zero row: no 0/0


def test_fake_quantization_is_the_int8_grid_with_straight_through_gradients():
    t = torch.randn(4, 9, dtype=torch.float64)
    q, s = quantize_rows(t)
    torch.testing.assert_close(fake_quantize_rows(t), dequantize_rows(q, s, torch.float64))
    # a fixed grid that cuts some values off: the gradient passes unchanged inside its range, 0 outside
    t.requires_grad_(True)
    scale = torch.full((4, 1), 0.01, dtype=torch.float64)
    upstream = torch.randn(4, 9, dtype=torch.float64)
    fake_quantize(t, scale).backward(upstream)
    inside = (t / scale).abs() <= 127.5
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(t.grad, upstream * inside)
    # the dynamic per-row grid holds every value: the gradient is the identity
    t.grad = None
    fake_quantize_rows(t).backward(upstream)
    assert torch.equal(t.grad, upstream)


# ---------------------------------------------------------------- every layer
@pytest.mark.parametrize("coupled", [False, True], ids=["lstm-gates", "coupled"])
@pytest.mark.parametrize("proj", [0, 4], ids=["no-proj", "proj"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_int8_layer_is_close_to_float_and_equals_its_qat_forward(cell, proj, coupled):
    """Tolerance 3% of the largest output over 6 steps of 2 layers. Each weight and activation is
    rounded by at most half a step, 1/254 of its row's largest magnitude; a product of K terms then
    errs by at most ~2/254 of K·max|x|·max|w| and in practice ~1/sqrt(K) of that (independent
    roundings); the sigmoids and tanh are 1-Lipschitz or less, and c carries errors on across steps.
    Observed: <= 1% on these layers. The QAT forward is the same rounding in float: equal to 1e-5."""
    torch.manual_seed(0)
    layer = CELLS[cell](8, 12, num_layers=2, proj_size=proj, coupled_gates=coupled, forget_bias=1.0,
                        **example_cell_args(cell)).eval()
    x = torch.randn(6, 3, 8)
    hx = (torch.randn(2, 3, proj or 12) * 0.5, torch.randn(2, 3, 12) * 0.5)
    with torch.no_grad():
        ref, (h, c) = layer(x, hx)
        out, (h_q, c_q) = QuantizedLSTM(layer)(x, hx)
        fake, (h_f, c_f) = qat_forward(layer, x, hx)
    for float_value, int8_value in ((ref, out), (h, h_q), (c, c_q)):
        assert (int8_value - float_value).abs().max() <= 0.03 * float_value.abs().max()
    for int8_value, fake_value in ((out, fake), (h_q, h_f), (c_q, c_f)):
        torch.testing.assert_close(fake_value, int8_value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", list(CELLS))
def test_shared_gates_and_factored_projection_run_in_int8(cell):
    """shared_gates / proj_rank layers are quantized in the form they compute with (their G-gate
    weights, W_hr = P2·P1): the same tolerance as every layer."""
    torch.manual_seed(0)
    layer = CELLS[cell](8, 12, num_layers=2, proj_size=4, shared_gates=True, proj_rank=2, forget_bias=1.0,
                        **example_cell_args(cell)).eval()
    x = torch.randn(6, 3, 8)
    with torch.no_grad():
        ref, _ = layer(x)
        out, _ = QuantizedLSTM(layer)(x, None)
        fake, _ = qat_forward(layer, x)
    assert (out - ref).abs().max() <= 0.03 * ref.abs().max()
    torch.testing.assert_close(fake, out, rtol=1e-5, atol=1e-5)


def test_qat_gradients_reach_every_parameter():
    for cell in CELLS:
        for options in ({}, {"shared_gates": True, "proj_rank": 2}):
            layer = CELLS[cell](8, 12, proj_size=4, **options, **example_cell_args(cell))
            output, _ = qat_forward(layer, torch.randn(3, 2, 8))
            output.square().sum().backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters()), (cell, options)


def test_qat_keeps_the_state_dict_and_can_be_undone():
    config = ModelConfig(vocab_size=30, embedding_size=8, hidden_size=12, proj_size=4, num_layers=2, cell="diagonal")
    model = LanguageModel(config).eval()
    inputs = torch.randint(0, 30, (4, 2))
    keys = list(model.state_dict())
    with torch.no_grad():
        float_out = model.log_probs(model(inputs)[0])
        enable_qat(model)
        assert list(model.state_dict()) == keys
        fake_out = model.log_probs(model(inputs)[0])
        int8_out = (int8_model := quantize_model(model, "native")).log_probs(int8_model(inputs)[0])
        torch.testing.assert_close(fake_out, int8_out, rtol=1e-5, atol=1e-5)
        assert not torch.equal(fake_out, float_out)
        disable_qat(model)
        assert torch.equal(model.log_probs(model(inputs)[0]), float_out)


def test_unsupported_layer_options_are_refused():
    layer = CELLS["lstm"](8, 12, bidirectional=True)
    with pytest.raises(NotImplementedError, match="bidirectional=True is not supported"):
        QuantizedLSTM(layer)


# -------------------------------------------------------- the language model
TINY = ModelConfig(embedding_size=16, hidden_size=32, proj_size=16, num_layers=2, cell="flstm", rank=8,
                   forget_bias=1.0)
FAST = TrainConfig(optimizer="adagrad", lr=0.2, batch_size=8, num_steps=10, max_steps=40, log_every=20,
                   eval_batch_size=16, checkpoint_minutes=math.inf)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """A slice of the built-in corpus as text splits: ~20k training tokens, ~1k to evaluate."""
    builtin = open_corpus(None)
    root = tmp_path_factory.mktemp("corpus")
    for split, count in (("train", 2000), ("valid", 100), ("test", 100)):
        lines = [" ".join(builtin.vocab.decode(s)) for _, s in zip(range(count), builtin.sentences(split))]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def float_run(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "float"
    Trainer(TINY, FAST, open_corpus(str(small_corpus)), out, show_progress=False).fit()
    return out


def _perplexity(model, corpus) -> float:
    return evaluate_stream(model, split_stream(corpus, "valid"), batch_size=16, num_steps=10).perplexity


def test_int8_and_qat_models_stay_near_float_perplexity(small_corpus, float_run, tmp_path):
    """Margins on a 40-step model (perplexity ~300): post-training int8 within 2% of float; after
    10 more steps with QAT, the int8 model within 0.1% of the QAT model's own (fake-quantized)
    perplexity, the same arithmetic, and no more than 2% above the float model's (it trained 10
    steps longer, so it may well be below: that margin is one-sided)."""
    corpus = open_corpus(str(small_corpus))
    model, _, _ = load_model(float_run)
    float_ppl = _perplexity(model, corpus)
    int8_ppl = _perplexity(quantize_model(model, "native"), corpus)
    assert abs(int8_ppl / float_ppl - 1) < 0.02, (int8_ppl, float_ppl)

    qat_dir = tmp_path / "qat"
    qat_dir.mkdir()
    (qat_dir / "checkpoint.pt").write_bytes((float_run / "checkpoint.pt").read_bytes())
    trainer = Trainer.resume(qat_dir, corpus, changes={"qat": True, "max_steps": FAST.max_steps + 10},
                             show_progress=False)
    assert trainer.config.qat and getattr(trainer.model, "_qat_enabled", False)
    trainer.fit()
    qat_model, _, payload = load_model(qat_dir)
    assert payload["train_config"]["qat"] is True and payload["step"] == FAST.max_steps + 10
    assert qat_model._qat_enabled  # a QAT run loads with the forward it trained with
    int8_after_qat = quantize_model(qat_model, "native")
    fake_ppl = _perplexity(qat_model, corpus)
    qat_int8_ppl = _perplexity(int8_after_qat, corpus)
    assert abs(qat_int8_ppl / fake_ppl - 1) < 1e-3, (qat_int8_ppl, fake_ppl)
    assert qat_int8_ppl / float_ppl - 1 < 0.02, (qat_int8_ppl, float_ppl)


@needs_torchao
def test_torchao_backend_is_as_close_to_float_as_native(float_run, tmp_path):
    """torchao's int8 Linear rounds activations on a slightly different grid (max/127.5 rather than
    max/127), so the two backends differ by int8 rounding, not 1e-6: each is compared with float."""
    model, _, _ = load_model(float_run)
    inputs = torch.randint(0, model.config.vocab_size, (7, 3))
    with torch.no_grad():
        reference = model.log_probs(model(inputs)[0])
        errors = {}
        for backend in ("native", "torchao"):
            int8_model = quantize_model(model, backend)
            errors[backend] = (int8_model.log_probs(int8_model(inputs)[0]) - reference).abs().max().item()
    assert errors["native"] < 0.05 and errors["torchao"] < max(0.05, 2 * errors["native"]), errors
    # the default backend's checkpoint is rebuilt with it
    assert main(["compress", "quantize", str(float_run), "--out", str(tmp_path / "int8")]) == 0
    loaded, _, payload = load_model(tmp_path / "int8")
    assert payload["quantization"]["backend"] == "torchao" and loaded.softmax.backend == "torchao"
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_probs(loaded(inputs)[0]), int8_model.log_probs(int8_model(inputs)[0]))
    # torchao's int8 weights are tensor subclasses: their size is that of the int8 data and scales they
    # hold (state_bytes read the subclass's own storage before, which has none)
    from factorlm.quant.model import state_bytes

    assert state_bytes(loaded) < 0.6 * state_bytes(model)  # float biases and scales weigh much in a tiny model


def test_tied_residual_model_round_trips_through_its_checkpoint(tmp_path):
    """Tied embeddings (one int8 table for the embedding and the softmax) and residual layers (one
    QuantizedLSTM per layer); the saved and reloaded model computes exactly what was saved."""
    from factorlm.quant.checkpoint import load_quantized_model, quantized_payload

    config = ModelConfig(vocab_size=50, embedding_size=8, hidden_size=16, proj_size=8, num_layers=2, cell="glstm",
                         groups=2, tie_embeddings=True, residual=True)
    torch.manual_seed(0)
    model = LanguageModel(config).eval()
    int8_model = quantize_model(model, "native")
    assert int8_model.softmax.weight_int8 is int8_model.embedding.weight_int8
    inputs = torch.randint(0, 50, (5, 2))
    with torch.no_grad():
        reference = model.log_probs(model(inputs)[0])
        saved = int8_model.log_probs(int8_model(inputs)[0])
    assert (saved - reference).abs().max() < 0.05
    vocab = {"words": [f"w{i}" for i in range(50)]}
    payload = quantized_payload(int8_model, {"model_config": config.to_dict(), "vocab": vocab}, "src", 1)
    save_checkpoint(payload, tmp_path / "checkpoint.pt")
    loaded = load_quantized_model(load_checkpoint(tmp_path), config, tmp_path)
    assert loaded.softmax.weight_int8 is loaded.embedding.weight_int8
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(loaded(inputs)[0]), saved)


# ----------------------------------------------------------------- the command
def test_quantize_command_and_the_int8_run_under_evaluate_score_generate(small_corpus, float_run, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["compress", "quantize", str(float_run), "--out", str(out), "--backend", "native"]) == 0
    assert "int8 run written to" in capsys.readouterr().out
    payload = load_checkpoint(out)
    assert payload["quantization"]["backend"] == "native" and payload["quantization"]["int8_bytes"] < \
        payload["quantization"]["float_bytes"] / 2.5  # tiny: float biases weigh
    model, _, _ = load_model(out)
    assert isinstance(model, QuantizedLanguageModel)
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(small_corpus), "--split", "valid",
                 "--batch-size", "16", "--num-steps", "10"]) == 0
    assert "valid: perplexity" in capsys.readouterr().out
    sentences = tmp_path / "s.txt"
    sentences.write_text((small_corpus / "valid.txt").read_text().splitlines()[0] + "\n")
    assert main(["score", "--checkpoint", str(out), str(sentences)]) == 0
    assert main(["generate", "--checkpoint", str(out), "--seed", "1", "--max-tokens", "5"]) == 0
    capsys.readouterr()
    # an int8 run is not quantized again, nor written over
    assert main(["compress", "quantize", str(out), "--out", str(tmp_path / "again"), "--backend", "native"]) == 2
    assert "is already an int8 run" in capsys.readouterr().err
    assert main(["compress", "quantize", str(float_run), "--out", str(out), "--backend", "native"]) == 2
    assert "exists; choose another --out" in capsys.readouterr().err


def test_finetune_qat_then_quantize(small_corpus, float_run, tmp_path, capsys):
    out = tmp_path / "qat"
    assert main(["finetune", str(float_run), "--out", str(out), "--qat", "--max-steps", "3", "--quiet",
                 "--data", str(small_corpus)]) == 0
    assert load_checkpoint(out)["train_config"]["qat"] is True
    assert main(["compress", "quantize", str(out), "--out", str(tmp_path / "int8"), "--backend", "native"]) == 0
    capsys.readouterr()
    assert main(["compress", "svd", str(tmp_path / "int8"), "--out", str(tmp_path / "svd"), "--rank", "4"]) == 2
    _one_line_error(capsys, "is an int8 run; compress its float source")


def _one_line_error(capsys, *needles) -> None:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_quantize_bad_input_is_one_line(float_run, tmp_path, capsys, monkeypatch):
    no_model = tmp_path / "no_model.pt"
    payload = {k: v for k, v in load_checkpoint(float_run).items() if k not in ("model", "format", "version")}
    save_checkpoint(payload, no_model)
    assert main(["compress", "quantize", str(no_model), "--out", str(tmp_path / "a"), "--backend", "native"]) == 2
    _one_line_error(capsys, "lacks ['model']")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["compress", "quantize", str(float_run), "--out", str(blocker / "sub"), "--backend", "native"]) == 2
    _one_line_error(capsys, "output directory")
    damaged = tmp_path / "damaged"
    assert main(["compress", "quantize", str(float_run), "--out", str(damaged), "--backend", "native"]) == 0
    capsys.readouterr()
    payload = load_checkpoint(damaged)
    del payload["model"]["softmax.weight_scale"]
    save_checkpoint(payload, damaged / "checkpoint.pt")
    assert main(["generate", "--checkpoint", str(damaged)]) == 2
    _one_line_error(capsys, "int8 weights do not fit its model config", "softmax.weight_scale")
    monkeypatch.setattr(_torchao, "available", lambda: False)
    assert main(["compress", "quantize", str(float_run), "--out", str(tmp_path / "b")]) == 2
    _one_line_error(capsys, "pip install 'factorlm[quant]'")
