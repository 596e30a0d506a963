"""Configs: the preset table, resolve (preset -> config file -> overrides), the shared config base,
and old checkpoints' model configs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from factorlm.configs import MODEL_PRESETS, PAPER_PRESETS, PRESETS, preset, read_config_file, resolve
from factorlm.count import count_model
from factorlm.errors import ConfigError, FactorlmError
from factorlm.models import LanguageModel, ModelConfig
from factorlm.nn import CELLS, count_parameters
from factorlm.train.config import TrainConfig


# ------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_resolves_and_builds_on_the_meta_device(name):
    model, train = resolve(name)
    assert (model, train) == preset(name) == PRESETS[name]
    assert isinstance(model, ModelConfig) and isinstance(train, TrainConfig)
    with torch.device("meta"):
        lm = LanguageModel(model)
    assert next(lm.parameters()).is_meta
    assert count_parameters(lm) == count_model(model)["total_params"] > 0
    # the checkpoint form round-trips
    assert ModelConfig.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    assert TrainConfig.from_dict(json.loads(json.dumps(train.to_dict()))) == train


def test_preset_views_and_paper_arguments():
    assert list(PAPER_PRESETS) == ["biglstm", "biglstm-f512", "biglstm-g2", "biglstm-g4", "biglstm-g8"]
    assert MODEL_PRESETS == {name: model for name, (model, _) in PRESETS.items()}
    assert [PAPER_PRESETS[n].cell_args for n in PAPER_PRESETS] == [{}, {"rank": 512}, {"groups": 2}, {"groups": 4},
                                                                   {"groups": 8}]
    assert PAPER_PRESETS["biglstm-f512"].rank == 512 and PAPER_PRESETS["biglstm-f512"].groups is None
    assert resolve() == preset("debug")
    with pytest.raises(ConfigError, match="unknown preset 'nope'; known presets: debug, ptb-small"):
        resolve("nope")


# ---------------------------------------------------------------- overrides
def test_overrides_and_the_cell_switch_rule():
    model, train = resolve("biglstm-g4", overrides={"model": {"hidden_size": 4096}, "train": {"lr": 0.1}})
    assert (model.cell, model.cell_args, model.hidden_size, train.lr) == ("glstm", {"groups": 4}, 4096, 0.1)
    # switching cell drops the old cell's arguments; the new cell's come with the switch
    model, _ = resolve("biglstm-g4", overrides={"model": {"cell": "flstm", "rank": [256, 128]}})
    assert (model.cell, model.cell_args) == ("flstm", {"rank": (256, 128)})
    model, _ = resolve("biglstm-g4", overrides={"model": {"cell": "lstm"}})
    assert model.cell_args == {} and model.groups is None
    # the same cell keeps its arguments; new ones replace them
    model, _ = resolve("biglstm-g4", overrides={"model": {"cell": "glstm", "cell_args": {"groups": (2, 8)}}})
    assert model.cell_args == {"groups": (2, 8)}
    with pytest.raises(ValueError, match="cell 'flstm' needs rank: F-LSTM factorization rank r"):
        resolve("biglstm-g4", overrides={"model": {"cell": "flstm"}})
    with pytest.raises(ValueError, match="cell 'lstm' takes no argument 'rank'; it takes none beyond torch.nn.LSTM's"):
        resolve("debug", overrides={"model": {"rank": 8}})


def test_a_budget_override_replaces_the_presets_epochs():
    assert preset("debug")[1].epochs == 3
    assert resolve("debug", overrides={"train": {"max_steps": 5}})[1].epochs is None
    assert resolve("debug", overrides={"train": {"max_time": 60.0}})[1].epochs is None
    assert resolve("debug", overrides={"train": {"max_steps": 5, "epochs": 2}})[1].epochs == 2
    assert resolve("debug", overrides={"train": {"lr": 0.5}})[1].epochs == 3


def test_override_errors():
    with pytest.raises(ConfigError, match=r"overrides: unknown model key 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        resolve("debug", overrides={"model": {"hiden_size": 3}})
    with pytest.raises(ConfigError, match=r"overrides: unknown key 'trian' \(did you mean 'train'\?\)"):
        resolve("debug", overrides={"trian": {}})


# -------------------------------------------------------------- config files
def _write(tmp_path, spec, name="run.json"):
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return path


def test_config_file_layers_between_preset_and_overrides(tmp_path):
    path = _write(tmp_path, {"preset": "ptb-small", "model": {"cell": "glstm", "cell_args": {"groups": 2}},
                             "train": {"lr": 0.5, "epochs": 2}})
    model, train = resolve(config_file=path)
    assert (model.cell, model.groups, model.hidden_size, train.lr, train.epochs) == ("glstm", 2, 200, 0.5, 2)
    assert train.batching == "contiguous"  # the rest comes from ptb-small
    model, train = resolve(config_file=path, overrides={"model": {"groups": 4}, "train": {"lr": 2.0}})
    assert (model.groups, train.lr) == (4, 2.0)
    # the flat form of older config files; no "preset": debug
    model, _ = resolve(config_file=_write(tmp_path, {"model": {"cell": "flstm", "rank": 8}}, "flat.json"))
    assert (model.cell, model.cell_args, model.hidden_size) == ("flstm", {"rank": 8}, 64)
    assert resolve("ptb-small", config_file=path) == resolve(config_file=path)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", r"bad.json is not valid JSON: Expecting property name"),
        ("[1, 2]", r'bad.json must hold a JSON object \{"preset": NAME, "model": \{...\}, "train": \{...\}\}, got a list'),
        ({"preset": "debug", "trian": {"lr": 1}}, r"bad.json: unknown top-level key 'trian' \(did you mean 'train'\?\)"),
        ({"preset": 3}, r'bad.json: "preset" must be a preset name, got a number'),
        ({"model": [1]}, r'bad.json: "model" must be an object of settings, got a list'),
        ({"preset": "nope"}, r"unknown preset 'nope'"),
        ({"model": {"hidden": 3}}, r"bad.json: unknown model key 'hidden' \(did you mean 'hidden_size'\?\)"),
        ({"train": {"lr": 1, "momentum": 0.9}}, r"bad.json: unknown train key 'momentum'; known: "),
        ({"model": {"cell": "glstm"}}, r"bad.json: cell 'glstm' needs groups"),
        ({"model": {"dropout": 1.0}}, r"bad.json: dropout must be a number in \[0, 1\), got 1.0"),
        ({"train": {"batch_size": 0}}, r"bad.json: batch_size must be an integer >= 1, got 0"),
    ],
)
def test_config_file_errors_are_one_clear_line(tmp_path, content, match):
    path = _write(tmp_path, content, "bad.json")
    with pytest.raises(ConfigError, match=match) as info:
        resolve(config_file=path)
    assert len(str(info.value).splitlines()) == 1 and isinstance(info.value, FactorlmError)


def test_config_file_missing_and_preset_conflict(tmp_path):
    with pytest.raises(ConfigError, match="config file .*missing.json does not exist"):
        read_config_file(tmp_path / "missing.json")
    path = _write(tmp_path, {"preset": "ptb-small"})
    with pytest.raises(ConfigError, match="names preset 'ptb-small', but preset 'debug' was asked for"):
        resolve("debug", config_file=path)


# --------------------------------------------------------------- the config base
def test_from_dict_is_strict_and_turns_lists_into_tuples():
    with pytest.raises(ConfigError, match=r"unknown train config keys \['lr_rate'\]; known keys: \["):
        TrainConfig.from_dict({"lr_rate": 0.1})
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({"cell": "lstm", "colour": 1})
    with pytest.raises(ConfigError, match="a model config must be a mapping of settings"):
        ModelConfig.from_dict([("cell", "lstm")])
    config = ModelConfig.from_dict({"cell": "glstm", "cell_args": {"groups": [2, 4]}, "hidden_size": 8})
    assert config.cell_args == {"groups": (2, 4)} and config.replace(hidden_size=16).cell_args == {"groups": (2, 4)}
    assert TrainConfig().replace(lr=0.5) == TrainConfig(lr=0.5)


def test_model_config_checks_its_values():
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got 1.0"):
        ModelConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"num_sampled must be an integer >= 0 \(0: full softmax\), got -1"):
        ModelConfig(num_sampled=-1)
    with pytest.raises(ValueError, match="hidden_size must be an integer >= 1, got 0"):
        ModelConfig(hidden_size=0)
    with pytest.raises(ValueError, match=re.escape(f"cell must be one of {tuple(CELLS)}, got 'gru'")):
        ModelConfig(cell="gru")
    with pytest.raises(ValueError, match="cell 'glstm' takes no argument 'rank'; it takes groups"):
        ModelConfig(cell="glstm", cell_args={"groups": 2, "rank": 3})
    with pytest.raises(ValueError, match=r"ema_decay must be a number in \[0, 1\), got 1.0"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1 or None, got 0"):
        TrainConfig(epochs=0)


def test_coupled_gates_travel_from_configs_to_every_layer(tmp_path):
    """coupled_gates: a ModelConfig field (default False, and so for configs saved before it), set by a
    config file or an override, given to every recurrent layer, residual stacks' included."""
    assert ModelConfig().coupled_gates is False and ModelConfig.from_dict(OLD_MODEL_CONFIG).coupled_gates is False
    model, _ = resolve("debug", overrides={"model": {"cell": "glstm", "groups": 2, "coupled_gates": True}})
    assert model.coupled_gates and ModelConfig.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    lm = LanguageModel(model)
    assert lm.rnn.coupled_gates and lm.rnn.num_gates == 3 and lm.rnn.bias_l0.shape == (3 * model.hidden_size,)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "debug", "model": {"coupled_gates": True, "residual": True}}))
    model, _ = resolve(config_file=str(path))
    assert all(layer.coupled_gates for layer in LanguageModel(model).rnn)
    with pytest.raises(ValueError, match="coupled_gates must be true or false, got 'yes'"):
        ModelConfig(coupled_gates="yes")


def test_keyword_form_of_cell_arguments():
    # ModelConfig(rank=...) and config.rank, as when rank and groups were fields
    flstm = ModelConfig(cell="flstm", rank=(3, 5), groups=None)
    assert flstm.cell_args == {"rank": (3, 5)} and flstm.rank == (3, 5) and flstm.groups is None
    assert flstm.replace(rank=7).cell_args == {"rank": 7}
    assert ModelConfig(cell="lstm", rank=2, groups=2).cell_args == {}  # another cell's argument: no effect
    assert hash(flstm) == hash(ModelConfig(cell="flstm", cell_args={"rank": (3, 5)}))
    with pytest.raises(AttributeError, match="no attribute 'colour'"):
        flstm.colour
    with pytest.raises(TypeError, match="colour"):
        ModelConfig(colour=1)


# ------------------------------------------------------------ old checkpoints
#: model_config exactly as checkpoints stored it before cell_args (rank, groups and extra fields)
OLD_MODEL_CONFIG = {
    "vocab_size": 1502, "embedding_size": 16, "hidden_size": 32, "proj_size": 16, "num_layers": 2,
    "cell": "glstm", "rank": None, "groups": [2, 4], "forget_bias": 1.0, "dropout": 0.1, "num_sampled": 64,
    "tie_embeddings": False, "residual": False, "init_scale": None, "extra": {},
}


def test_old_checkpoint_model_configs_still_load():
    config = ModelConfig.from_dict(OLD_MODEL_CONFIG)
    assert (config.cell, config.cell_args, config.hidden_size, config.num_sampled) == ("glstm", {"groups": (2, 4)}, 32, 64)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert "rank" not in config.to_dict() and config.to_dict()["cell_args"] == {"groups": (2, 4)}
    # an argument of another cell had no effect and is dropped; so is an lstm's
    switched = ModelConfig.from_dict({**OLD_MODEL_CONFIG, "cell": "flstm", "rank": 8})
    assert switched.cell_args == {"rank": 8}
    plain = ModelConfig.from_dict({**OLD_MODEL_CONFIG, "cell": "lstm", "rank": 512})
    assert plain.cell_args == {}
    lm = LanguageModel(config)
    assert [lm.rnn.groups] == [(2, 4)]
    with pytest.raises(ConfigError, match="'extra' is no longer used"):
        ModelConfig.from_dict({**OLD_MODEL_CONFIG, "extra": {"x": 1}})


def test_old_checkpoint_loads_for_evaluation(tmp_path):
    """A checkpoint file in the old format (rank/groups/extra, vocab written by hand) loads and runs."""
    from factorlm.data import open_corpus
    from factorlm.runs import load_model
    from factorlm.train.checkpoint import save_checkpoint

    corpus = open_corpus(None)
    config = ModelConfig.from_dict({**OLD_MODEL_CONFIG, "vocab_size": len(corpus.vocab)})
    model = LanguageModel(config)
    vocab = corpus.vocab
    old_vocab = {"words": list(vocab.words), "counts": list(vocab.counts), "boundary": vocab.boundary,
                 "unk": vocab.unk, "fingerprint": vocab.fingerprint()}
    save_checkpoint({"model_config": {**OLD_MODEL_CONFIG, "vocab_size": len(vocab)},
                     "train_config": TrainConfig().to_dict(), "vocab": old_vocab, "model": model.state_dict()},
                    tmp_path / "checkpoint.pt")
    loaded, loaded_vocab, _ = load_model(tmp_path)
    assert loaded.config == config and loaded_vocab == vocab
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
