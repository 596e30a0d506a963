"""ONNX export (factorlm.export, ``factorlm export onnx``): the streaming graph that onnxruntime runs
gives PyTorch's log-probabilities and state over a stream fed in chunks, for every registered cell
type with and without a projection (and coupled gates), and for a residual two-layer model through
the command line; bad input and a missing extra are one line; and the stock-PyTorch route
(to_lstm, plain state dicts) gives the same log-probabilities.

Exports are slow (torch.onnx traces each layer's scan: ~2 s of one core for a one-layer model): one
layer per model in the grid, one export per cell type and projection, all chunks in one session."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from factorlm.cli import main
from factorlm.data import Vocabulary
from factorlm.export import StreamingLM, check_onnx, to_onnx
from factorlm.models import LanguageModel, ModelConfig
from factorlm.nn.registry import CELLS, example_cell_args
from factorlm.train.checkpoint import save_checkpoint
from helpers import cli_error

VOCAB = 50


def _model(cell: str, proj_size: int = 0, num_layers: int = 1, **kw) -> LanguageModel:
    config = ModelConfig(vocab_size=VOCAB, embedding_size=8, hidden_size=12, proj_size=proj_size,
                         num_layers=num_layers, cell=cell, forget_bias=1.0,
                         cell_args=example_cell_args(cell, num_layers, per_layer=True), **kw)
    return LanguageModel(config).eval()


def _stream(model: LanguageModel, chunks=(4, 1, 3), batch: int = 3):
    """(tokens, h_0, c_0) of each chunk of one random stream, from a random initial state."""
    tokens = torch.randint(0, VOCAB, (sum(chunks), batch))
    h, c = (torch.randn_like(s) for s in model.init_state(batch))
    return tokens.split(list(chunks)), (h, c)


#: (cell, proj_size, coupled_gates): every cell type with a projection, and without one with coupled
#: gates (the CIFG update is the same code in every cell); G∘F-LSTM's projection-free case is the
#: command-line test's two-layer residual model (an export costs ~2 s: one per case, no more)
GRID = [(cell, 4, False) for cell in CELLS] + [(cell, 0, True) for cell in CELLS if cell != "gflstm"]


@pytest.mark.parametrize("cell,proj_size,coupled", GRID,
                         ids=[f"{cell}-{'proj' if proj else 'no-proj-cifg'}" for cell, proj, _ in GRID])
def test_onnxruntime_equals_pytorch_over_a_chunked_stream(cell, proj_size, coupled, tmp_path):
    """check_onnx feeds chunks of 4, 1 and 3 steps (T = 1 included) at batch 2, each from the state
    onnxruntime returned for the one before (a random one at the start), and compares log_probs, h_n
    and c_n of every chunk with the model's."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = _model(cell, proj_size, coupled_gates=coupled)
    path = to_onnx(model, tmp_path / "model.onnx")
    assert check_onnx(model, path, chunks=(4, 1, 3), batch_size=2) < 1e-4
    assert not model.training and all(layer.impl == "auto" for layer in model._layers())  # given back


def test_onnxruntime_on_shared_gates_and_a_factored_projection(tmp_path):
    """Layers whose maths take derived tensors (effective_parameters: gates scaled from one shared W,
    W_hr = P2·P1): the export builds them once, outside the time loop, and computes the model's
    function. C-LSTM, whose circulant blocks expand their own way."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = _model("circulant", proj_size=4, shared_gates=True, proj_rank=2)
    with torch.no_grad():  # gate scales away from their initial value
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    assert check_onnx(model, to_onnx(model, tmp_path / "model.onnx")) < 1e-4


def test_streaming_refuses_a_bidirectional_layer():
    model = _model("lstm")
    model.rnn = type(model.rnn)(8, 12, bidirectional=True)
    with pytest.raises(ValueError, match=r"a bidirectional layer \(LSTM\) cannot stream: its reverse direction reads "
                                         r"the future"):
        StreamingLM(model)


def _run(tmp_path, config: ModelConfig, **payload) -> str:
    model = LanguageModel(config)
    vocab = Vocabulary([f"w{i}" for i in range(config.vocab_size - 2)] + ["<S>", "<UNK>"], boundary="<S>", unk="<UNK>")
    save_checkpoint({"model_config": config.to_dict(), "vocab": vocab.to_dict(), "model": model.state_dict(),
                     **payload}, tmp_path / "checkpoint.pt")
    return str(tmp_path)


def test_cli_writes_and_checks_a_residual_two_layer_model(tmp_path, capsys):
    """``factorlm export onnx RUN OUT`` on a run with an EMA: the averaged weights are exported (as
    evaluate uses them), the graph checked in onnxruntime, the config kept in the metadata. Two
    layers with their own groups and ranks, residual, no projection, coupled gates: the state's rows,
    the skip path, and G∘F-LSTM's projection-free case of the grid above."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    config = ModelConfig(vocab_size=VOCAB, embedding_size=8, hidden_size=8, num_layers=2, cell="gflstm",
                         cell_args={"groups": (2, 4), "rank": (3, 2)}, residual=True, coupled_gates=True)
    ema = {name: t + 0.01 for name, t in LanguageModel(config).state_dict().items()}
    run = _run(tmp_path, config, ema=ema)
    out = tmp_path / "model.onnx"
    assert main(["export", "onnx", run, str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: gflstm model, 2 layer(s), vocabulary 50" in printed
    assert "checked: onnxruntime equals PyTorch" in printed
    graph = onnx.load(str(out))
    assert [i.name for i in graph.graph.input] == ["tokens", "h_0", "c_0"]
    assert [o.name for o in graph.graph.output] == ["log_probs", "h_n", "c_n"]
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert ModelConfig.from_dict(json.loads(metadata["factorlm.model_config"])) == config
    from factorlm.runs import load_model

    averaged, _, _ = load_model(run)
    assert check_onnx(averaged, out) < 1e-4  # the EMA's weights, not the raw ones
    raw, _, _ = load_model(run, use_ema=False)
    assert check_onnx(raw, out) > 1e-3


def test_bad_input_is_one_line(tmp_path, capsys):
    """Checked before any work: the output first (a missing directory, a directory), then the run
    (missing, without a model, an int8 run)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    config = ModelConfig(vocab_size=VOCAB, embedding_size=4, hidden_size=6, num_layers=1)
    (tmp_path / "run").mkdir()
    run = _run(tmp_path / "run", config)
    out = str(tmp_path / "model.onnx")
    missing = tmp_path / "missing" / "model.onnx"
    assert cli_error(capsys, ["export", "onnx", run, str(missing)]).endswith(
        f"cannot write ONNX file {missing}: the directory {missing.parent} does not exist")
    assert cli_error(capsys, ["export", "onnx", run, str(tmp_path)]).endswith(
        f"ONNX file {tmp_path} is a directory; expected a file name")
    save_checkpoint({"model_config": config.to_dict(), "vocab": {}}, tmp_path / "empty.pt")
    assert cli_error(capsys, ["export", "onnx", str(tmp_path / "empty.pt"), out]).endswith(
        f"checkpoint {tmp_path / 'empty.pt'} lacks ['model']")
    assert cli_error(capsys, ["export", "onnx", "/nonexistent", out]).endswith("checkpoint /nonexistent does not exist")
    assert not (tmp_path / "model.onnx").exists()
    # an int8 run: its float source is what exports (with --int8 for an int8 graph)
    assert main(["compress", "quantize", run, "--out", str(tmp_path / "int8"), "--backend", "native"]) == 0
    assert cli_error(capsys, ["export", "onnx", str(tmp_path / "int8"), out]).endswith(
        f"{tmp_path / 'int8'} is an int8 run (native backend); export its float source {run} (with --int8 for an int8 "
        f"graph)")


def test_a_missing_extra_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    err = cli_error(capsys, ["export", "onnx", str(tmp_path), str(tmp_path / "model.onnx")])
    assert err == ("factorlm export: error: factorlm export onnx needs onnxruntime: install the extra with "
                   "pip install 'factorlm[onnx]'")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match=r"ONNX export needs onnx and onnxscript: install the extra with "
                                           r"pip install 'factorlm\[onnx\]'"):
        to_onnx(_model("lstm"), tmp_path / "model.onnx")


@pytest.mark.parametrize("cell", CELLS)
def test_stock_pytorch_model_from_to_lstm_and_plain_state_dicts(cell):
    """For users who must stay on stock PyTorch: the model rebuilt from plain modules (nn.Embedding,
    the stack's to_lstm() as a torch.nn.LSTM, with a projection where the cell has a dense
    equivalent with one, nn.Linear), each loaded from a plain state dict, gives the model's
    log-probabilities. (The diagonal LSTM converts without a projection only;
    tests/test_nn_layers.py covers to_lstm() itself on every cell type.)"""
    proj = 0 if cell == "diagonal" else 4
    model = _model(cell, proj_size=proj, num_layers=2)
    config = model.config
    embedding = torch.nn.Embedding(VOCAB, config.embedding_size)
    lstm = torch.nn.LSTM(config.embedding_size, config.hidden_size, num_layers=2, proj_size=proj)
    softmax = torch.nn.Linear(config.output_size, VOCAB)
    embedding.load_state_dict({"weight": model.embedding.weight})
    lstm.load_state_dict(model.rnn.to_lstm().state_dict())
    softmax.load_state_dict(model.softmax.state_dict())
    chunks, state = _stream(model, chunks=(5,))
    with torch.no_grad():
        hidden, (h, c) = model(chunks[0], state)
        output, (h_stock, c_stock) = lstm(embedding(chunks[0]), state)
        torch.testing.assert_close(torch.log_softmax(softmax(output), -1), model.log_probs(hidden), rtol=0, atol=1e-5)
    torch.testing.assert_close(h_stock, h, rtol=0, atol=1e-5)
    torch.testing.assert_close(c_stock, c, rtol=0, atol=1e-5)



def test_int8_graph_quantizes_the_products_inside_the_time_loop(tmp_path, capsys):
    """``factorlm export onnx RUN OUT --int8``: every MatMul, the per-step ones in each layer's Scan
    included, becomes MatMulInteger on int8 weights; the float graph is checked and not left behind;
    the int8 graph's log-probabilities stay near the float model's."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    config = ModelConfig(vocab_size=VOCAB, embedding_size=8, hidden_size=16, proj_size=8, num_layers=2,
                         cell="glstm", cell_args={"groups": 2})
    run = _run(tmp_path, config)
    out = tmp_path / "int8.onnx"
    assert main(["export", "onnx", run, str(out), "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "checked: onnxruntime equals PyTorch" in printed and "int8 rounding: log-probabilities within" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "int8.onnx"]  # no float graph left

    def op_types(graph):
        for node in graph.node:
            yield node.op_type
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from op_types(attribute.g)

    written = onnx.load(str(out))
    # T and B stay free with as many layers as the trace's example batch once had rows (L = 2)
    assert [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in written.graph.input] == [
        ["time", "batch"], [2, "batch", 8], [2, "batch", 16]]
    ops = list(op_types(written.graph))
    # the softmax; per layer the input side, the recurrent side and the projection
    assert "MatMul" not in ops and ops.count("MatMulInteger") == 1 + 2 * 3
    from factorlm.runs import load_model

    model, _, _ = load_model(run)
    assert 1e-6 < check_onnx(model, out) < 0.1



def test_evaluate_and_score_read_an_exported_graph(tmp_path, capsys):
    """The export keeps the vocabulary in the graph, so ``factorlm evaluate`` and ``score`` take the
    .onnx file as --checkpoint and give the run's own numbers: OnnxLanguageModel puts onnxruntime
    behind the calls evaluate_stream makes, rows restarted and re-scored alike; a file that is no
    graph, or a graph without a vocabulary, is one line."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    run, graph = tmp_path / "run", tmp_path / "model.onnx"
    assert main(["train", "--out", str(run), "--max-steps", "2", "--quiet"]) == 0
    assert main(["export", "onnx", str(run), str(graph), "--no-check"]) == 0
    results = {}
    for name, checkpoint in (("run", run), ("onnx", graph)):
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--split", "valid", "--json",
                     str(tmp_path / f"{name}.json")]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["onnx"]["tokens"] == results["run"]["tokens"] > 0
    assert results["onnx"]["loss"] == pytest.approx(results["run"]["loss"], rel=1e-6)
    from factorlm.export import OnnxLanguageModel
    from factorlm.runs import load_model

    onnx_model = OnnxLanguageModel(graph, threads=1)
    assert onnx_model.config == load_model(run)[0].config
    with pytest.raises(RuntimeError, match="onnxruntime graph: inference only"):
        onnx_model.train()
    lines = tmp_path / "lines.txt"
    _, vocab, _ = load_model(run)
    lines.write_text(" ".join(vocab.words[2:6]) + "\n")
    capsys.readouterr()
    scores = {}
    for name, checkpoint in (("run", run), ("onnx", graph)):
        assert main(["score", "--checkpoint", str(checkpoint), str(lines)]) == 0
        scores[name] = capsys.readouterr().out
    assert scores["onnx"] == scores["run"]
    assert main(["generate", "--checkpoint", str(graph), "--prompt", vocab.words[2], "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    (tmp_path / "bad.onnx").write_text("not a graph")
    assert "bad.onnx is not an ONNX graph onnxruntime can load" in cli_error(
        capsys, ["evaluate", "--checkpoint", str(tmp_path / "bad.onnx")])
    onnx = pytest.importorskip("onnx")
    bare = onnx.load(str(graph))  # as to_onnx writes it without vocab=
    kept = [p for p in bare.metadata_props if p.key != "factorlm.vocab"]
    del bare.metadata_props[:]
    bare.metadata_props.extend(kept)
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    assert cli_error(capsys, ["evaluate", "--checkpoint", str(tmp_path / "bare.onnx")]).endswith(
        f"{tmp_path / 'bare.onnx'} holds no vocabulary (exported by to_onnx without vocab=); export it again with "
        f"factorlm export onnx, which keeps the run's")
