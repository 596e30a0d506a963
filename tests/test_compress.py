"""Post-training compression (factorlm.compress, ``factorlm compress``): SVD -> F-LSTM, blocks -> G-LSTM,
magnitude and unit pruning; each checked against the dense model it came from, in float64."""

from __future__ import annotations

import hashlib
import json
import math
import warnings

import pytest
import torch

from factorlm.cli import main
from factorlm.compress import svd_to_flstm
from factorlm.compress.blocks import dense_to_glstm
from factorlm.compress.layers import model_layers
from factorlm.compress.prune import MASKS_KEY, magnitude_prune
from factorlm.compress.spectrum import rank_for_energy
from factorlm.compress.units import prune_units
from factorlm.errors import ConfigWarning
from factorlm.models import LanguageModel, ModelConfig
from factorlm.nn import FLSTM, GLSTM
from factorlm.train.checkpoint import load_checkpoint
from helpers import cli_error

V = 20


def tiny_model(**kw) -> LanguageModel:
    args = dict(vocab_size=V, embedding_size=8, hidden_size=12, num_layers=2, forget_bias=1.0)
    args.update(kw)
    return LanguageModel(ModelConfig(**args)).double().eval()


def log_probs(model: LanguageModel, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.log_probs(model(inputs)[0])


INPUTS = torch.randint(0, V, (7, 3), generator=torch.Generator().manual_seed(0))


def same_function(a: LanguageModel, b: LanguageModel) -> float:
    return (log_probs(a, INPUTS) - log_probs(b, INPUTS)).abs().max().item()


# -------------------------------------------------------------------- SVD
@pytest.mark.parametrize("kw", [dict(proj_size=4), dict(residual=True, hidden_size=8), dict(coupled_gates=True)])
def test_svd_at_full_rank_is_the_dense_model(kw):
    dense = tiny_model(**kw)
    widths = [layer.layer_input_size(i) + layer.output_size for layer, i in model_layers(dense)]
    full = [min(layer.num_gates * layer.hidden_size, w) for (layer, _), w in zip(model_layers(dense), widths)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # full rank saves nothing, as it warns
        factored, spectra = svd_to_flstm(dense, rank=tuple(full))
    assert factored.config.cell == "flstm" and factored.config.rank == tuple(full) or factored.config.rank == full[0]
    assert [s.rank for s in spectra] == full and all(s.energy == pytest.approx(1.0) for s in spectra)
    assert same_function(dense, factored) < 1e-12
    for layer, i in model_layers(factored):  # the singular values are split evenly between the factors
        w = layer.layer_parameters(i)
        assert torch.allclose((w["weight_w1"] ** 2).sum(1), (w["weight_w2"] ** 2).sum(0))


def test_svd_of_a_torch_lstm_state_dict_is_an_flstm_with_its_function():
    lstm = torch.nn.LSTM(6, 10, num_layers=2, proj_size=3, bidirectional=True).double()
    with pytest.warns(ConfigWarning, match="rank 9 in layers 0, 1 has 441 gate parameters"):  # full rank saves nothing
        factored, spectra = svd_to_flstm(lstm.state_dict(), rank=9)
    assert isinstance(factored, FLSTM) and factored.bidirectional and factored.rank == (9, 9)
    assert len(spectra) == 4  # two layers, two directions each
    x = torch.randn(5, 2, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(lstm(x)[0], factored(x)[0], atol=1e-12)


def _known_spectrum(values, rows=16, cols=10, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


def test_the_energy_rule_picks_the_smallest_rank_keeping_the_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16/22, 20/22, 21/22, 1
    assert [rank_for_energy(s, e) for e in (0.5, 16 / 22, 0.9, 20 / 22, 0.91, 0.99)] == [1, 1, 2, 2, 3, 4]
    # through a layer: [W_ih W_hh] (4n = 16, 6 + 4) with singular values 4, 2, 1, 1 and the rest 0
    weight = _known_spectrum([4.0, 2.0, 1.0, 1.0])
    lstm = torch.nn.LSTM(6, 4).double()
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(weight[:, :6])
        lstm.weight_hh_l0.copy_(weight[:, 6:])
    factored, (spectrum,) = svd_to_flstm(lstm, energy=0.9)
    assert spectrum.rank == 2 and spectrum.energy == pytest.approx(20 / 22)
    product = factored.weight_w2_l0 @ factored.weight_w1_l0  # Eckart–Young: the error is the dropped energy
    assert ((product - weight).norm() / weight.norm()).item() == pytest.approx(math.sqrt(2 / 22))
    assert spectrum.relative_error == pytest.approx(math.sqrt(2 / 22))


def test_svd_refuses_bad_requests():
    dense = tiny_model()
    with pytest.raises(ValueError, match=r"rank 30 for layer 0 exceeds the full rank of its gate matrix \[W_ih W_hh\], "
                                         r"48 x 20: give a rank from 1 to 20"):
        svd_to_flstm(dense, rank=30)
    for energy in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"energy must be a fraction .* strictly between 0 and 1, got {energy}"):
            svd_to_flstm(dense, energy=energy)
    with pytest.raises(ValueError, match="give either rank .* or energy .*, not both"):
        svd_to_flstm(dense, rank=2, energy=0.5)
    with pytest.raises(ValueError, match="needs a model of cell 'lstm', but the model has cell 'glstm'"):
        svd_to_flstm(tiny_model(cell="glstm", groups=2), rank=2)


# ----------------------------------------------------------------- blocks
def _hide_blocks(model: LanguageModel, k: int, seed: int) -> None:
    """Zero every gate weight between units of different groups, groups drawn at random per space:
    a model that is block-diagonal under a permutation the conversion does not know."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    inputs = torch.randperm(c.embedding_size, generator=g) % k
    with torch.no_grad():
        for layer, i in model_layers(model):
            cells = torch.randperm(c.hidden_size, generator=g) % k
            outputs = torch.randperm(c.proj_size, generator=g) % k if c.proj_size else cells
            w = layer.layer_parameters(i)
            rows = cells.repeat(layer.num_gates)[:, None]
            w["weight_ih"].mul_(rows == inputs[None])
            w["weight_hh"].mul_(rows == outputs[None])
            inputs = outputs


@pytest.mark.parametrize("kw,k", [(dict(proj_size=4), 2), (dict(embedding_size=16, hidden_size=24, num_layers=3), 4)])
def test_blocks_recover_a_permuted_block_diagonal_model_exactly(kw, k):
    dense = tiny_model(**kw)
    _hide_blocks(dense, k, seed=3)
    grouped, report = dense_to_glstm(dense, k)
    assert grouped.config.cell == "glstm" and grouped.config.groups == k
    assert all(isinstance(layer, GLSTM) for layer, _ in model_layers(grouped))
    assert report.kept == pytest.approx(1.0) and report.kept_identity < 0.9
    assert all(row["kept"] == pytest.approx(1.0) for row in report.layers)
    assert same_function(dense, grouped) < 1e-12


def test_blocks_recovery_with_the_iterative_eigensolver(monkeypatch):
    from factorlm.compress import partition

    monkeypatch.setattr(partition, "DENSE_EIGEN_LIMIT", 0)  # the path large models take
    dense = tiny_model(embedding_size=16, hidden_size=24, proj_size=8)
    _hide_blocks(dense, 4, seed=5)
    grouped, report = dense_to_glstm(dense, 4)
    assert report.kept == pytest.approx(1.0) and same_function(dense, grouped) < 1e-12


def test_blocks_keep_tied_spaces_in_order_and_never_lose_to_the_identity():
    dense = tiny_model(proj_size=8, tie_embeddings=True)
    grouped, report = dense_to_glstm(dense, 2)
    assert report.kept >= report.kept_identity
    assert any("tie_embeddings" in note for note in report.fixed)
    assert torch.equal(grouped.embedding.weight, dense.embedding.weight)
    with pytest.raises(ValueError, match="groups=5 does not divide"):
        dense_to_glstm(dense, 5)


# ---------------------------------------------------------------- pruning
def _silence_units(model: LanguageModel, count: int, outputs: int, seed: int) -> None:
    """Zero everything going out of ``count`` cells and ``outputs`` projection units per layer (as many
    from each group)."""
    g = torch.Generator().manual_seed(seed)
    layers = model_layers(model)
    flstm = model.config.cell == "flstm"
    k = model.config.groups or 1

    def draw(size: int, number: int) -> torch.Tensor:
        return torch.cat([torch.randperm(size // k, generator=g)[: number // k] + j * (size // k) for j in range(k)])

    with torch.no_grad():
        for l, (layer, i) in enumerate(layers):
            w = layer.layer_parameters(i)
            dead = draw(layer.hidden_size, count)
            if layer.proj_size:  # the cells reach only W_hr; a projection unit is its row of W_hr
                w["weight_hr"][:, dead] = 0
                w["weight_hr"][draw(layer.proj_size, outputs)] = 0
                continue
            p_in = layer.layer_input_size(i)
            if flstm:
                w["weight_w1"][:, p_in + dead] = 0
            else:
                w["weight_hh"][:, dead] = 0
            if l + 1 < len(layers):
                after = layers[l + 1][0].layer_parameters(layers[l + 1][1])
                after["weight_w1" if flstm else "weight_ih"][:, dead] = 0
            else:
                model.softmax.weight[:, dead] = 0


@pytest.mark.parametrize("kw,fraction,sizes", [
    (dict(proj_size=4), 0.25, (9, 3)),
    (dict(cell="flstm", rank=5), 0.25, (9, 0)),
    (dict(proj_size=8, tie_embeddings=True), 0.25, (9, 8)),  # a projection tied to the embedding stays
    (dict(proj_size=6, cell="glstm", groups=2), 1 / 3, (8, 4)),  # 2 cells and 1 projection unit per group
    (dict(proj_size=6, cell="gflstm", groups=2, rank=3), 1 / 3, (8, 4)),
])
def test_pruning_units_of_zero_importance_leaves_the_outputs_unchanged(kw, fraction, sizes):
    dense = tiny_model(**kw)
    _silence_units(dense, 12 - sizes[0], dense.config.proj_size - sizes[1], seed=1)
    pruned, report = prune_units(dense, fraction)
    assert (pruned.config.hidden_size, pruned.config.proj_size) == sizes and report["hidden_size"] == [12, sizes[0]]
    assert pruned.config.cell == dense.config.cell
    assert same_function(dense, pruned) < 1e-12
    assert sum(p.numel() for p in pruned.rnn.parameters()) < sum(p.numel() for p in dense.rnn.parameters())


def test_unit_pruning_refuses_what_it_cannot_shrink():
    with pytest.raises(ValueError, match="without a projection the cells are the layers' outputs"):
        prune_units(tiny_model(hidden_size=8, tie_embeddings=True), 0.25)
    with pytest.raises(ValueError, match="needs a model of cell .*, but the model has cell 'diagonal'"):
        prune_units(tiny_model(cell="diagonal"), 0.25)
    with pytest.raises(ValueError, match=r"the layers have different group counts \[2, 4\]"):
        prune_units(tiny_model(cell="glstm", groups=(2, 4), proj_size=4), 0.25)
    with pytest.raises(ValueError, match="a projection must be smaller than the cells"):
        prune_units(tiny_model(proj_size=8, tie_embeddings=True), 0.5)  # p = E = 8 stays, n 12 -> 6


def test_magnitude_pruning_hits_the_sparsity_and_masks_the_zeros():
    dense = tiny_model(proj_size=4)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    pruned, masks, report = magnitude_prune(dense, 0.6)
    assert set(masks) == {f"rnn.{name}_l{l}" for name in ("weight_ih", "weight_hh", "weight_hr") for l in (0, 1)}
    weights = dict(pruned.named_parameters())
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == weights[name].shape
        assert (1 - mask.double().mean()).item() == pytest.approx(0.6, abs=0.5 / mask.numel())
        assert torch.all(weights[name][~mask] == 0)
        kept, dropped = dense.state_dict()[name][mask].abs(), dense.state_dict()[name][~mask].abs()
        assert kept.min() >= dropped.max()  # the smallest magnitudes went
    assert torch.equal(pruned.rnn.bias_l0, dense.rnn.bias_l0)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())  # the source is untouched
    assert report["zeros"] == sum(int((~m).sum()) for m in masks.values())


# -------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny dense model with a projection, trained 2 steps on the built-in corpus."""
    root = tmp_path_factory.mktemp("compress")
    config = root / "tiny.json"
    config.write_text(json.dumps({"preset": "debug", "model": {"embedding_size": 8, "hidden_size": 16, "proj_size": 8},
                                  "train": {"batch_size": 4, "num_steps": 5, "ema_decay": 0.9}}))
    assert main(["train", "--config", str(config), "--out", str(root / "run"), "--max-steps", "2", "--quiet"]) == 0
    return root / "run"


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_compress_commands_write_runs_that_evaluate_reads(trained_run, tmp_path, capsys):
    source = _digest(trained_run / "checkpoint.pt")
    commands = {
        "svd": (["svd", str(trained_run), "--energy", "0.8"], "flstm"),
        "blocks": (["blocks", str(trained_run), "--groups", "2"], "glstm"),
        "prune": (["prune", str(trained_run), "--sparsity", "0.5"], "lstm"),
        "units": (["prune", str(trained_run / "checkpoint.pt"), "--sparsity", "0.25", "--units"], "lstm"),
    }
    for name, (argv, cell) in commands.items():
        out = tmp_path / name
        assert main(["compress", *argv, "--out", str(out)]) == 0, name
        printed = capsys.readouterr().out
        assert f"evaluate it with: factorlm evaluate --checkpoint {out}" in printed
        payload = load_checkpoint(out)
        assert payload["model_config"]["cell"] == cell
        assert payload["compression"][-1]["method"] == {"units": "prune-units"}.get(name, name)
        assert payload["train_config"] and (out / "compress.txt").exists() and (out / "compress.json").exists()
        assert main(["evaluate", "--checkpoint", str(out), "--split", "valid", "--json", str(out / "eval.json")]) == 0
        assert math.isfinite(json.loads((out / "eval.json").read_text())["perplexity"])
    assert (tmp_path / "svd" / "spectrum.png").stat().st_size > 0
    masks = load_checkpoint(tmp_path / "prune")[MASKS_KEY]
    assert set(masks) == {f"rnn.{w}_l{l}" for w in ("weight_ih", "weight_hh", "weight_hr") for l in (0, 1)}
    assert all(m.dtype == torch.bool for m in masks.values())
    assert load_checkpoint(tmp_path / "units")["model_config"]["hidden_size"] == 12
    # pruning units of a masked run keeps the masks of what is left; pruning again keeps the earlier zeros
    assert main(["compress", "prune", str(tmp_path / "prune"), "--sparsity", "0.25", "--units",
                 "--out", str(tmp_path / "both")]) == 0
    both = load_checkpoint(tmp_path / "both")
    assert both[MASKS_KEY]["rnn.weight_hh_l1"].shape == (48, 6)
    assert all(torch.equal(mask, both["model"][name] != 0) for name, mask in both[MASKS_KEY].items())
    assert main(["compress", "prune", str(tmp_path / "prune"), "--sparsity", "0.3", "--out", str(tmp_path / "more")]) == 0
    again = load_checkpoint(tmp_path / "more")[MASKS_KEY]
    assert all(torch.equal(again[name] & masks[name], again[name]) for name in masks)  # nothing pruned grew back
    capsys.readouterr()
    assert _digest(trained_run / "checkpoint.pt") == source  # the input is never written


def test_compress_errors_are_one_line(trained_run, tmp_path, capsys):
    run, out = str(trained_run), str(tmp_path / "out")
    assert cli_error(capsys, ["compress", "svd", run, "--rank", "99", "--out", out]).endswith(
        "rank 99 for layer 0 exceeds the full rank of its gate matrix [W_ih W_hh], 64 x 16: give a rank from 1 to 16")
    assert cli_error(capsys, ["compress", "svd", run, "--energy", "1.0", "--out", out]).endswith(
        "--energy must be a fraction of the spectral energy strictly between 0 and 1, got 1.0")
    assert cli_error(capsys, ["compress", "prune", run, "--sparsity", "0", "--out", out]).endswith(
        "--sparsity must be a fraction strictly between 0 and 1 (the share removed), got 0.0")
    assert cli_error(capsys, ["compress", "blocks", run, "--groups", "3", "--out", out]).endswith(
        "GLSTM layer 0: groups=3 does not divide the input size 8, hidden_size 16, output size 8; the input size, "
        "hidden_size and output size must all be multiples of groups: here 1, 2, 4 or 8")
    assert "is the source run's directory" in cli_error(capsys, ["compress", "prune", run, "--sparsity", "0.5",
                                                                "--out", run])
    assert main(["compress", "svd", run, "--rank", "4", "--out", out]) == 0
    capsys.readouterr()
    assert cli_error(capsys, ["compress", "svd", run, "--rank", "4", "--out", out]).endswith(
        f"{out}/checkpoint.pt exists: choose another --out (a compressed run is never written over an existing one)")
    assert cli_error(capsys, ["compress", "blocks", out, "--groups", "2", "--out", str(tmp_path / "again")]).endswith(
        f"blocks to G-LSTM needs a model of cell 'lstm', but the model has cell 'flstm'")
    assert "does not exist" in cli_error(capsys, ["compress", "svd", str(tmp_path / "none"), "--rank", "2",
                                                 "--out", str(tmp_path / "x")])


# -------------------------------------------------------- the sparse benchmark
def test_sparse_speed_quick_dry_run_and_break_even(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sparse_speed

    rows = [{"shape": "m", "batch": 1, "sparsity": s, "speedup": x} for s, x in ((0.5, 0.3), (0.9, 1.2), (0.99, 3.0))]
    rows += [{"shape": "m", "batch": 32, "sparsity": 0.5, "speedup": 0.1}]
    assert sparse_speed.break_even(rows) == [{"shape": "m", "batch": 1, "break_even": 0.9, "best_speedup": 3.0},
                                             {"shape": "m", "batch": 32, "break_even": None, "best_speedup": 0.1}]
    payload = sparse_speed.main(["--quick", "--repeats", "10", "--out", str(tmp_path / "s.json")])
    assert [(r["sparsity"], r["nnz"]) for r in payload["rows"]] == [(0.5, 256 * 64 // 2), (0.9, round(256 * 64 * 0.1))]
    assert json.loads((tmp_path / "s.json").read_text())["benchmark"] == "sparse_speed"
    assert "| matrix | B | CSR at least as fast from sparsity | best CSR speedup |" in capsys.readouterr().out
