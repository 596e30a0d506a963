"""factorlm compress on a bare torch.nn.LSTM state dict: one layer file, read back by load_layer."""

from __future__ import annotations

import pytest
import torch

from factorlm.cli import main
from factorlm.compress import MASKS_KEY, load_layer
from factorlm.nn import FLSTM, GLSTM, LSTM
from helpers import cli_error


def saved_lstm(tmp_path, name="lstm.pt", seed=0, **kw) -> tuple[torch.nn.LSTM, str]:
    torch.manual_seed(seed)
    lstm = torch.nn.LSTM(**{"input_size": 8, "hidden_size": 12, **kw}).eval()
    path = tmp_path / name
    torch.save(lstm.state_dict(), path)
    return lstm, str(path)


def compress(capsys, *argv) -> str:
    """Run ``factorlm compress argv``; what it printed."""
    assert main(["compress", *argv]) == 0
    return capsys.readouterr().out


@torch.no_grad()
def outputs(layer, x: torch.Tensor):
    """(output, the last layer's h_n) of a layer for input x (T, B, input): what its caller reads (the
    earlier layers' h_n and c_n may be stored in another order, or c_n narrower)."""
    output, (h, _) = layer(x)
    return output, h[-1]


def test_svd_of_a_state_dict_at_full_rank_is_the_lstm(tmp_path, capsys):
    lstm, source = saved_lstm(tmp_path, num_layers=2, proj_size=4)
    out = tmp_path / "f.pt"
    printed = compress(capsys, "svd", source, "--rank", "12,8", "--out", str(out))
    assert "energy kept" in printed and f"factorlm.compress.load_layer({str(out)!r})" in printed
    assert (tmp_path / "f.spectrum.png").stat().st_size > 0
    layer = load_layer(out)
    assert isinstance(layer, FLSTM) and layer.rank == (12, 8) and layer.proj_size == 4 and not layer.training
    x = torch.randn(6, 3, 8)
    for got, want in zip(outputs(layer, x), outputs(lstm, x)):
        assert torch.allclose(got, want, atol=1e-5)
    saved = torch.load(out, weights_only=True)
    assert saved["format"] == "factorlm-layer" and saved["cell"] == "flstm" and "energy kept" in saved["report"]
    assert saved["compression"][-1]["method"] == "svd"


def _hide_blocks(lstm: torch.nn.LSTM, k: int, seed: int) -> None:
    """Zero every gate weight between units of different groups: the input features and the last
    layer's outputs in their own order (the caller's), the cells and the first layer's outputs
    grouped at random (what a conversion may reorder)."""
    g = torch.Generator().manual_seed(seed)

    def in_order(size):
        return torch.arange(size) // (size // k)

    def shuffled(size):
        return torch.randperm(size, generator=g) % k

    inputs = in_order(lstm.input_size)
    with torch.no_grad():
        for layer in range(lstm.num_layers):
            cells = shuffled(lstm.hidden_size).repeat(4)[:, None]
            outs = in_order(lstm.proj_size) if layer == lstm.num_layers - 1 else shuffled(lstm.proj_size)
            getattr(lstm, f"weight_ih_l{layer}").mul_(cells == inputs[None])
            getattr(lstm, f"weight_hh_l{layer}").mul_(cells == outs[None])
            inputs = outs


def test_blocks_recover_a_state_dict_block_diagonal_under_a_hidden_permutation(tmp_path, capsys):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(8, 12, num_layers=2, proj_size=4).eval()
    _hide_blocks(lstm, 2, seed=5)
    torch.save(lstm.state_dict(), tmp_path / "lstm.pt")
    printed = compress(capsys, "blocks", str(tmp_path / "lstm.pt"), "--groups", "2", "--out", str(tmp_path / "g.pt"))
    assert "kept in the identity order: E (the layer's input features are the caller's)" in printed
    assert "kept in the identity order: P1 (the last layer's output h is the caller's)" in printed
    layer = load_layer(tmp_path / "g.pt")
    assert isinstance(layer, GLSTM) and layer.groups == (2, 2)
    report = torch.load(tmp_path / "g.pt", weights_only=True)["compression"][-1]
    assert report["kept"] == pytest.approx(1.0) and report["kept_identity"] < 0.9
    x = torch.randn(5, 2, 8)
    for got, want in zip(outputs(layer, x), outputs(lstm, x)):
        assert torch.allclose(got, want, atol=1e-5)


def test_prune_of_a_state_dict_keeps_the_shapes_and_saves_the_masks(tmp_path, capsys):
    lstm, source = saved_lstm(tmp_path, num_layers=2, proj_size=4, bias=False)
    printed = compress(capsys, "prune", source, "--sparsity", "0.75", "--out", str(tmp_path / "p.pt"))
    assert "apply_masks(layer, masks)" in printed
    layer = load_layer(tmp_path / "p.pt")
    assert type(layer) is LSTM and not layer.bias
    masks = torch.load(tmp_path / "p.pt", weights_only=True)[MASKS_KEY]
    weights = dict(layer.named_parameters())
    assert set(masks) == set(weights)  # every matrix: no biases here
    for name, weight in weights.items():
        assert weight.shape == lstm.state_dict()[name].shape == masks[name].shape
        assert (weight == 0).double().mean().item() == pytest.approx(0.75, abs=0.5 / weight.numel())
        assert torch.equal(masks[name], weight != 0)
    # a layer file is an input too: its cells pruned, the zeros of what is left keep their masks
    compress(capsys, "prune", str(tmp_path / "p.pt"), "--sparsity", "0.25", "--units", "--out", str(tmp_path / "u.pt"))
    saved = torch.load(tmp_path / "u.pt", weights_only=True)
    assert [step["method"] for step in saved["compression"]] == ["prune", "prune-units"]
    assert saved["kwargs"]["hidden_size"] == 9 and saved["prune_masks"]["weight_hh_l1"].shape == (36, 4)
    assert all(torch.equal(mask, saved["state_dict"][name] != 0) for name, mask in saved["prune_masks"].items())


def test_units_of_zero_importance_behind_the_projection_leave_the_outputs(tmp_path, capsys):
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(8, 12, num_layers=2, proj_size=4).eval()
    with torch.no_grad():  # three cells per layer reach nothing: their columns of W_hr are zero
        for layer in range(2):
            getattr(lstm, f"weight_hr_l{layer}")[:, torch.randperm(12)[:3]] = 0
    torch.save(lstm.state_dict(), tmp_path / "lstm.pt")
    printed = compress(capsys, "prune", str(tmp_path / "lstm.pt"), "--sparsity", "0.25", "--units",
                       "--out", str(tmp_path / "u.pt"))
    assert "cells per layer n: 12 -> 9; projection p: 4 -> 4" in printed
    layer = load_layer(tmp_path / "u.pt")
    assert (layer.hidden_size, layer.proj_size, layer.input_size) == (9, 4, 8)
    x = torch.randn(5, 2, 8)
    for got, want in zip(outputs(layer, x), outputs(lstm, x)):
        assert torch.allclose(got, want, atol=1e-6)


def test_bad_layer_inputs_are_one_line(tmp_path, capsys):
    _, source = saved_lstm(tmp_path, num_layers=2, proj_size=4)
    _, plain = saved_lstm(tmp_path, "plain.pt", num_layers=2)
    _, both = saved_lstm(tmp_path, "bi.pt", bidirectional=True)
    junk = tmp_path / "junk.pt"
    torch.save({"weights": [1, 2]}, junk)
    text = tmp_path / "notes.txt"
    text.write_text("not a tensor file\n")
    out = str(tmp_path / "out.pt")
    assert cli_error(capsys, ["compress", "blocks", str(text), "--groups", "2", "--out", out]).endswith(
        f"{text} could not be read by a safe load (it is not a file torch.save wrote, is damaged, or holds objects a "
        "safe load refuses); expected a file written by factorlm train, or torch.save(lstm.state_dict())")
    assert cli_error(capsys, ["compress", "svd", str(junk), "--rank", "2", "--out", out]).endswith(
        f"{junk} holds a mapping with keys ['weights']; expected a factorlm run directory or checkpoint, a factorlm "
        "layer file, or a torch.nn.LSTM state dict (torch.save(lstm.state_dict()): weight_ih_l0, weight_hh_l0, ...)")
    assert cli_error(capsys, ["compress", "prune", source, "--sparsity", "0.5", "--out", source]).endswith(
        f"--out {source} is the input; it is never overwritten: choose a new file name (a compressed layer is never "
        "written over an existing file)")
    assert cli_error(capsys, ["compress", "prune", source, "--sparsity", "0.5", "--out", plain]).endswith(
        f"--out {plain} exists: choose a new file name (a compressed layer is never written over an existing file)")
    assert cli_error(capsys, ["compress", "blocks", both, "--groups", "2", "--out", out]).endswith(
        "blocks to G-LSTM: a bidirectional layer is not supported; convert a unidirectional one")
    assert cli_error(capsys, ["compress", "prune", plain, "--sparsity", "0.25", "--units", "--out", out]).endswith(
        "unit pruning of a bare layer removes only cells hidden behind a projection; this layer has none "
        "(proj_size=0), so its cells are the output h the caller reads (and all layers share one hidden_size): "
        "nothing can be removed without changing its outputs")
    assert cli_error(capsys, ["compress", "svd", source, "--rank", "2", "--no-ema", "--out", out]).endswith(
        f"{source} is a bare layer, which has one set of weights; leave --no-ema out")
    assert not (tmp_path / "out.pt").exists()
