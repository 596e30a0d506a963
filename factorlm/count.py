"""Parameter and multiply-add counts of language models, taken from real modules.

Modules are built on the meta device, so even the 1.8B-parameter BIGLSTM costs no memory.
"""

from __future__ import annotations

import torch

from factorlm.models.config import ModelConfig
from factorlm.models.lm import LanguageModel
from factorlm.nn import count_parameters
from factorlm.nn.registry import cell_class

#: RNN parameter counts in the paper's Table 1 (millions), for side-by-side printing.
PAPER_RNN_PARAMS_M = {
    "biglstm": 151.0,
    "biglstm-f512": 52.5,
    "biglstm-g2": 83.9,
    "biglstm-g4": 50.4,
    "biglstm-g8": 33.6,
}

BIAS_NOTE = (
    "Biases counted: one gate bias of 4n per recurrent layer (the paper's b; torch.nn.LSTM keeps two, "
    "b_ih and b_hh, i.e. 4n more per layer; 3n with coupled input and forget gates, 'cifg'); "
    "F-LSTM's W1 and the projection have none; the softmax has "
    "a bias of V. Shared gates ('shared'): an n-row gate map plus G·n per-gate scales, the G·n bias kept; "
    "a low-rank projection ('hr=r'): r·(n + p) parameters and MACs. MACs: forward multiply-adds per token "
    "(gate maps + projections; pointwise gate math not counted; shared gates: the n-row map + G·n scalings)."
)


def count_model(config: ModelConfig) -> dict:
    """Exact counts for one model config, from a LanguageModel built on the meta device.

    Returns rnn_params, embedding_params, softmax_params (without a tied weight, which counts
    once, under the embedding), total_params, rnn_macs_per_token, softmax_macs_per_token (full
    softmax) and sampled_softmax_macs_per_token.
    """
    with torch.device("meta"):
        # Both softmax heads have the same parameters; the full one also accepts num_sampled >= V.
        model = LanguageModel(config.replace(num_sampled=0))
    groups = {name: sum(p.numel() for p in params) for name, params in model.parameter_groups().items()}
    full = config.output_size * config.vocab_size
    sampled = config.output_size * (config.num_sampled + 1) if config.num_sampled else full
    return {
        "rnn_params": groups["rnn"],
        "embedding_params": groups["embedding"],
        "softmax_params": groups["softmax"],
        "total_params": count_parameters(model),
        "rnn_macs_per_token": model.rnn_macs_per_token(),
        "softmax_macs_per_token": full,
        "sampled_softmax_macs_per_token": sampled,
    }


def _per_layer(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def format_table(rows: list[tuple[str, ModelConfig, dict]]) -> str:
    """A Markdown table of count_model results, exact counts with millions beside them."""
    header = (
        "| model | cell | RNN params | paper | emb + softmax params | total params "
        "| RNN MACs/token | softmax MACs/token (full / sampled) |"
    )
    lines = [header, "|" + "---|" * 8]
    for name, config, c in rows:
        kind = " ".join([config.cell] + [f"{arg.label}={config.cell_args[arg.name]}"
                                         for arg in cell_class(config.cell).cell_args if arg.name in config.cell_args]
                        + (["cifg"] if config.coupled_gates else [])
                        + (["shared"] if config.shared_gates else [])
                        + ([f"hr={_per_layer(config.proj_rank)}"] if config.proj_rank is not None else []))
        paper = PAPER_RNN_PARAMS_M.get(name)
        emb_soft = c["embedding_params"] + c["softmax_params"]
        lines.append(
            f"| {name} | {kind} | {c['rnn_params']:,} ({_millions(c['rnn_params'])}) "
            f"| {f'{paper}M' if paper else '-'} | {emb_soft:,} ({_millions(emb_soft)}) "
            f"| {c['total_params']:,} | {c['rnn_macs_per_token']:,} "
            f"| {c['softmax_macs_per_token']:,} / {c['sampled_softmax_macs_per_token']:,} |"
        )
    return "\n".join(lines)
