"""A comparison's report: results.md, results.csv and three figures.

- loss_vs_time.png, loss_vs_steps.png: every model's training loss (log scale) against training
  time and against optimizer steps, on shared axes (the paper's Figure 2: per step the big model
  wins, per hour the factorized ones may);
- ppl_vs_params.png: held-out perplexity against recurrent parameters.

A row (factorlm.compare.run) holds: model, description, split, perplexity, rnn_params,
total_params, steps, words_per_sec, train_seconds, note, and metrics (the path of its run's
metrics.jsonl, for the curves).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from factorlm.machine import machine_line

#: results.csv columns, in order
CSV_COLUMNS = ("model", "description", "split", "perplexity", "rnn_params", "total_params", "steps",
               "words_per_sec", "train_seconds", "note")


def write_report(rows: list[dict], meta: dict, out_dir) -> None:
    """results.md, results.csv and the three PNGs for the rows so far."""
    out_dir = Path(out_dir)
    (out_dir / "results.md").write_text(results_markdown(rows, meta))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    curves = {row["model"]: read_train_curve(row["metrics"]) for row in rows}
    plot_loss_curves(curves, out_dir / "loss_vs_time.png", x="time")
    plot_loss_curves(curves, out_dir / "loss_vs_steps.png", x="steps")
    plot_ppl_vs_params(rows, out_dir / "ppl_vs_params.png")


def results_markdown(rows: list[dict], meta: dict) -> str:
    """The table, with the budget, data, machine and versions above it; ratios against the first row."""
    first = rows[0] if rows else None
    lines = [
        "# factorlm compare",
        "",
        f"- data: {meta['data']} (vocabulary {meta['vocab_size']:,})",
        f"- budget per model: {meta['budget']}",
        f"- device: {meta['device']}; machine: {machine_line(meta['machine'])}",
        f"- command: `{meta['machine'].get('command', '')}`",
        "",
        f"| model | cell | {rows[0]['split'] if rows else 'test'} ppl | RNN params | all params | steps "
        "| words/s | training s | steps × first | RNN params ÷ first |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['description']} | {row['perplexity']:.2f} | {row['rnn_params']:,} "
            f"| {row['total_params']:,} | {row['steps']:,} | {row['words_per_sec']:,.0f} | {row['train_seconds']:.0f} "
            f"| {row['steps'] / max(1, first['steps']):.2f} | {first['rnn_params'] / max(1, row['rnn_params']):.2f} |"
        )
    notes = [f"- {row['model']}: {row['note']}" for row in rows if row.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def read_train_curve(metrics_path) -> dict[str, list[float]]:
    """{'steps', 'time' (training seconds), 'loss'} of a run's train records (empty lists if none)."""
    curve = {"steps": [], "time": [], "loss": []}
    path = Path(metrics_path)
    if not path.exists():
        return curve
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("kind") == "train" and math.isfinite(record.get("loss", math.nan)):
            curve["steps"].append(record["step"])
            curve["time"].append(record["elapsed"])
            curve["loss"].append(record["loss"])
    return curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(curves: dict[str, dict], png_path, *, x: str) -> None:
    """Training loss (log scale) of every model against ``x``: "time" or "steps"."""
    plt = _pyplot()
    longest = max((c["time"][-1] for c in curves.values() if c["time"]), default=0.0)
    unit, scale = ("hours", 3600.0) if longest >= 7200 else ("minutes", 60.0) if longest >= 120 else ("seconds", 1.0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        xs = curve["steps"] if x == "steps" else [t / scale for t in curve["time"]]
        ax.plot(xs, curve["loss"], label=name, lw=1.2, marker="." if len(xs) < 20 else None)
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_formatter(FormatStrFormatter("%.3g"))
    ax.set_xlabel("optimizer steps" if x == "steps" else f"training {unit}")
    ax.set_ylabel("training loss (nats / token, log scale)")
    ax.set_title(f"training loss against {'steps' if x == 'steps' else 'time'}")
    ax.grid(alpha=0.3, which="both")
    if curves:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def plot_ppl_vs_params(rows: list[dict], png_path) -> None:
    """Held-out perplexity against recurrent parameters, one labelled point per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.scatter([row["rnn_params"] / 1e6], [row["perplexity"]], s=30)
        ax.annotate(row["model"], (row["rnn_params"] / 1e6, row["perplexity"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=9)
    split = rows[0]["split"] if rows else "test"
    ax.set_xlabel("recurrent-layer parameters (millions)")
    ax.set_ylabel(f"{split} perplexity (exact)")
    ax.set_title(f"{split} perplexity against RNN parameters, same budget")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
