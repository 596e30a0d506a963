"""The cell registry: a new cell type is one class and one registry line, and then it works in
``factorlm train --cell``, ``factorlm count``, the language model and the layer test grid."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import test_nn_layers as layer_tests
from factorlm.cli import main
from factorlm.models import LanguageModel, ModelConfig
from factorlm.nn import CELLS, CellArg, reference, register_cell
from factorlm.nn.base import LSTMBase, per_layer
from factorlm.runs import load_model
from factorlm.train.checkpoint import load_checkpoint
from helpers import make_layer


class SpreadLSTM(LSTMBase):
    """A toy cell: the dense LSTM (torch.nn.LSTM's function), whose initial weights are drawn from
    U(±1/(spread·√n)), ``spread`` an int or one per layer."""

    cell_args = (CellArg("spread", "divides the initial weight bound", example=2, per_layer_example=(2, 3, 4)),)

    def __init__(self, *args, spread, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spread = per_layer("spread", spread, self.num_layers)
        self._init_layers()

    def _layer_parameter_shapes(self, layer):
        rows = self.num_gates * self.hidden_size  # 4n, or 3n with coupled_gates
        return {"weight_ih": (rows, self.layer_input_size(layer)), "weight_hh": (rows, self.output_size)}

    def reset_parameters(self) -> None:
        for layer in range(self.num_layers):
            bound = 1.0 / (self.spread[layer] * math.sqrt(self.hidden_size))
            for direction in range(self.num_directions):
                for weight in self.layer_parameters(layer, direction).values():
                    if weight is not None:
                        nn.init.uniform_(weight, -bound, bound)

    def _gate_fn(self, layer, w):
        return lambda x_t, h: reference.dense_gates(x_t, h, w["weight_ih"], w["weight_hh"], w["bias"])

    def _dense_gate_weights(self, layer, w):
        return w["weight_ih"], w["weight_hh"], w["bias"]

    def _layer_gate_macs(self, layer):
        return self.num_gates * self.hidden_size * (self.layer_input_size(layer) + self.output_size)


@pytest.fixture
def toy():
    register_cell("toy", SpreadLSTM)  # the one registry line
    yield "toy"
    del CELLS["toy"]


@pytest.mark.parametrize("proj_size", [0, 4])
@pytest.mark.parametrize("num_layers,per_layer_args", [(1, False), (3, True)])
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_toy_cell_matches_nn_lstm_in_the_layer_grid(toy, proj_size, num_layers, per_layer_args, impl):
    layer_tests.test_matches_dense_nn_lstm_values_and_gradients(
        toy, proj_size, batch_first=True, num_layers=num_layers, per_layer=per_layer_args, zero_state=False, impl=impl,
        coupled=False)
    layer = make_layer(toy, num_layers=num_layers, per_layer=per_layer_args)
    assert isinstance(layer, SpreadLSTM) and layer.spread == ((2, 3, 4) if per_layer_args else (2,))
    bound = 1 / (layer.spread[-1] * math.sqrt(12))
    assert getattr(layer, f"weight_hh_l{num_layers - 1}").abs().max() <= bound  # its argument was used


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_toy_cell_is_bidirectional_and_takes_packed_batches_for_free(toy, impl):
    """Nothing in SpreadLSTM mentions directions or packing: the base class supplies both."""
    layer_tests.check_against_nn_lstm(toy, proj_size=4, batch_first=False, num_layers=2, per_layer=True,
                                      zero_state=False, impl=impl, bidirectional=True, packed="unsorted")
    layer = make_layer(toy, num_layers=2, per_layer=True, bidirectional=True)
    assert layer.weight_hh_l1_reverse.abs().max() <= 1 / (3 * math.sqrt(12))  # its reset_parameters ran on both


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_toy_cell_takes_coupled_gates_for_free(toy, impl):
    """coupled_gates is the base class's: a cell whose gate tensors have num_gates·n rows gets CIFG."""
    layer_tests.check_against_nn_lstm(toy, proj_size=4, batch_first=False, num_layers=2, per_layer=True,
                                      zero_state=False, impl=impl, bidirectional=True, packed="sorted", coupled=True)
    layer = make_layer(toy, coupled_gates=True)
    assert layer.weight_ih_l0.shape == (36, 8) and layer.bias_l0.shape == (36,)


def test_toy_cell_trains_from_the_command_line(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--cell", toy, "--spread", "3,5", "--out", str(out), "--max-steps", "3", "--batch-size",
                 "4", "--quiet"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    saved = load_checkpoint(out)
    assert (saved["model_config"]["cell"], saved["model_config"]["cell_args"], saved["step"]) == (toy, {"spread": (3, 5)}, 3)
    model, _, _ = load_model(out)
    assert isinstance(model.rnn, SpreadLSTM) and model.rnn.spread == (3, 5)
    assert main(["train", "--cell", toy, "--out", str(tmp_path / "no-arg"), "--max-steps", "1"]) == 2
    assert "cell 'toy' needs spread: divides the initial weight bound" in capsys.readouterr().err


def test_coupled_gates_from_the_train_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--cell", "flstm", "--rank", "8", "--coupled-gates", "--out", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--quiet"]) == 0
    saved = load_checkpoint(out)
    assert saved["model_config"]["coupled_gates"] is True
    model, _, _ = load_model(out)
    assert model.rnn.coupled_gates and model.rnn.weight_w2_l0.shape == (3 * model.rnn.hidden_size, 8)


def test_toy_cell_counts_from_the_command_line(toy, capsys):
    assert main(["count", "--cell", toy, "--spread", "2", "--vocab", "1000"]) == 0
    out = capsys.readouterr().out
    assert "| toy spread=2 | 151,060,480 " in out  # the dense BIGLSTM's recurrent parameters
    with pytest.raises(SystemExit):
        main(["count", "--spread", "x"])
    assert "expected an int or comma-separated ints, got 'x'" in capsys.readouterr().err


def test_toy_cell_in_a_residual_language_model(toy):
    config = ModelConfig(vocab_size=13, embedding_size=8, hidden_size=8, num_layers=2, residual=True, cell=toy,
                         cell_args={"spread": (2, 5)})
    lm = LanguageModel(config).double()
    assert [m.spread for m in lm.rnn] == [(2,), (5,)]  # each layer its own share of the per-layer argument
    hidden, _ = lm(torch.randint(0, 13, (4, 3)))
    assert hidden.shape == (4, 3, 8) and config.spread == (2, 5)


def test_the_cell_options_follow_the_registry(toy, capsys):
    del CELLS[toy]
    try:
        with pytest.raises(SystemExit):
            main(["count", "--cell", toy])
        assert "invalid choice: 'toy'" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["count", "--spread", "2"])
        assert "unrecognized arguments: --spread" in capsys.readouterr().err
    finally:
        CELLS[toy] = SpreadLSTM


def test_register_cell_checks_the_class(toy):
    with pytest.raises(ValueError, match="cell 'toy' is already registered"):
        register_cell(toy, SpreadLSTM)
    with pytest.raises(TypeError, match="expected a subclass of factorlm.nn.base.LSTMBase"):
        register_cell("gru", nn.GRU)
    with pytest.raises(ValueError, match="a cell name must be a word"):
        register_cell("a b", SpreadLSTM)

    class Reserved(SpreadLSTM):
        cell_args = (CellArg("dropout", "clashes with LSTMBase's own argument", example=0.1),)

    class Twice(SpreadLSTM):
        cell_args = SpreadLSTM.cell_args * 2

    class OtherForm(SpreadLSTM):
        cell_args = (CellArg("spread", "one value for the stack", example=2, per_layer=False),)

    class NotDeclared(SpreadLSTM):
        cell_args = [SpreadLSTM.cell_args[0]]

    with pytest.raises(ValueError, match="'dropout' cannot name a cell argument"):
        register_cell("reserved", Reserved)
    with pytest.raises(ValueError, match="declares an argument twice"):
        register_cell("twice", Twice)
    with pytest.raises(ValueError, match="argument 'spread' is already declared by another cell with another form"):
        register_cell("other", OtherForm)
    with pytest.raises(TypeError, match="cell_args must be a tuple of factorlm.nn.cell_args.CellArg"):
        register_cell("notdeclared", NotDeclared)
    assert set(CELLS) == {"lstm", "flstm", "glstm", "circulant", "gflstm", "diagonal", toy}
