"""Why F-LSTM (W = W2·W1) trains badly under plain SGD, and what fixes it: training measurements.

Runs the training recipe of a preset (default ``ptb-small``: SGD lr 1, clip 5 on all gradients)
for a number of steps with the library's own Trainer, and records per step the training loss and
the gradient norm of every parameter group *before* clipping (and the clip factor the global norm
gave), and every ``--every`` steps the singular values of each layer's gate matrix (W2·W1 for
F-LSTM, [W_ih W_hh] for LSTM) and of the factors. Writes one JSON per run; ``--plot`` draws a
figure from several JSONs.

    python benchmarks/flstm_diagnosis.py --data ../shared/data/ptb --cell flstm --rank 100 \\
        --steps 2000 --out /tmp/flstm-runs/diag-f100.json
    python benchmarks/flstm_diagnosis.py --plot a.json b.json --figure benchmarks/results/flstm_diagnosis.png

``--plain-sgd`` turns off the scaled-gradient steps on the factors (TrainConfig.precondition_factors),
giving the behaviour this script diagnosed (BENCHMARKS.md, "Why F-LSTM did not train under SGD").
``--variant`` re-initialises the F-LSTM factors in the script (for comparing candidate
initialisations before one becomes the default): ``uniform`` (every factor U(±init_scale), what
``ptb-small`` gives), ``svd`` (the rank-r truncated SVD of a dense U(±init_scale) draw, split as U·S^½ and
S^½·Vᵀ), ``library`` (whatever the library does now: no change).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def gate_matrix(layer_module, layer: int) -> torch.Tensor:
    """The dense (4n, p_in + p) gate matrix of one layer."""
    w_ih, w_hh, _ = layer_module.dense_gate_weights(layer)
    return torch.cat([w_ih, w_hh], dim=1)


def singular_summary(matrix: torch.Tensor, rank: int | None = None) -> dict:
    s = torch.linalg.svdvals(matrix.detach().double())
    if rank is not None:
        s = s[:rank]
    return {"max": s[0].item(), "median": s[len(s) // 2].item(), "min": s[-1].item(),
            "fro": s.norm().item(), "all": [round(v, 5) for v in s.tolist()]}


def reinit_factors(model, variant: str, scale: float) -> None:
    """Candidate initialisations of the F-LSTM factors (applied after the library's own init)."""
    rnn = model.rnn
    if variant == "library" or not hasattr(rnn, "rank"):
        return
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            w1, w2 = getattr(rnn, f"weight_w1_l{layer}"), getattr(rnn, f"weight_w2_l{layer}")
            if variant == "uniform":
                w1.uniform_(-scale, scale)
                w2.uniform_(-scale, scale)
            elif variant == "svd":
                dense = torch.empty(w2.shape[0], w1.shape[1]).uniform_(-scale, scale)
                u, s, vh = torch.linalg.svd(dense, full_matrices=False)
                r = w1.shape[0]
                root = s[:r].sqrt()
                w2.copy_(u[:, :r] * root)
                w1.copy_(root[:, None] * vh[:r])
            else:
                raise ValueError(f"unknown variant {variant!r}")


def run(args) -> dict:
    from factorlm.data import open_corpus
    from factorlm.configs import preset
    from factorlm.train.loop import Trainer
    from factorlm.train.optim import set_lr

    model_config, train_config = preset(args.preset)
    changes = {"cell": args.cell}
    if args.cell == "flstm":
        changes["rank"] = args.rank
    if args.cell == "glstm":
        changes["groups"] = args.groups
    model_config = model_config.replace(**changes)
    train_changes = {"max_steps": args.steps}
    if args.lr is not None:
        train_changes["lr"] = args.lr
    if args.plain_sgd:
        train_changes["precondition_factors"] = False
    if args.clip is not None:
        train_changes["clip_norm"] = None if args.clip <= 0 else args.clip
    train_config = train_config.replace(**train_changes)
    corpus = open_corpus(args.data)
    out_dir = Path(args.out).with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("checkpoint.pt",):
        (out_dir / stale).unlink(missing_ok=True)
    trainer = Trainer(model_config, train_config, corpus, out_dir, show_progress=False)
    model = trainer.model
    reinit_factors(model, args.variant, model_config.init_scale or 0.1)

    groups: dict[str, list[torch.nn.Parameter]] = {"embedding": [model.embedding.weight],
                                                   "softmax": list(model.softmax.parameters())}
    for name, p in model.rnn.named_parameters():
        groups[f"rnn.{name}"] = [p]
    norms_sq = {name: 0.0 for name in groups}

    def hook_for(name):
        def hook(p):
            norms_sq[name] += p.grad.detach().float().pow(2).sum().item()
        return hook

    for name, params in groups.items():
        for p in params:
            p.register_post_accumulate_grad_hook(hook_for(name))

    record = {"args": vars(args), "model_config": model_config.to_dict(), "train_config": train_config.to_dict(),
              "loss": [], "grad_norm": {name: [] for name in groups}, "total_grad_norm": [], "clip_factor": [],
              "spectra": []}

    def snapshot(step: int) -> None:
        rnn = model.rnn
        entry = {"step": step, "layers": []}
        for layer in range(rnn.num_layers):
            info = {"W": singular_summary(gate_matrix(rnn, layer), getattr(rnn, "rank", [None] * 9)[layer])}
            if hasattr(rnn, "rank"):
                info["W1"] = singular_summary(getattr(rnn, f"weight_w1_l{layer}"))
                info["W2"] = singular_summary(getattr(rnn, f"weight_w2_l{layer}"))
            entry["layers"].append(info)
        record["spectra"].append(entry)

    snapshot(0)
    step, start = 0, time.monotonic()
    clip = train_config.clip_norm
    epoch = 0
    while step < args.steps:
        set_lr(trainer.optimizer, train_config.lr)
        for batch in trainer.batcher.epoch_batches(epoch):
            for name in norms_sq:
                norms_sq[name] = 0.0
            loss = trainer.train_step(batch)
            step += 1
            total = math.sqrt(sum(norms_sq.values()))
            record["loss"].append(loss)
            record["total_grad_norm"].append(total)
            record["clip_factor"].append(min(1.0, clip / total) if clip else 1.0)
            for name in groups:
                record["grad_norm"][name].append(math.sqrt(norms_sq[name]))
            if step % args.every == 0:
                snapshot(step)
                tail = record["loss"][-args.every:]
                print(f"step {step}: loss {sum(tail) / len(tail):.3f}  grad norm {total:.2f}  "
                      f"clip {record['clip_factor'][-1]:.3f}  |W0| s_max "
                      f"{record['spectra'][-1]['layers'][0]['W']['max']:.2f}  "
                      f"({time.monotonic() - start:.0f} s)", flush=True)
            if step >= args.steps:
                break
        epoch += 1
        trainer.state = None
    if args.valid:
        record["valid"] = trainer.evaluate("valid").to_dict()
        print(f"valid perplexity {record['valid']['perplexity']:.2f}")
    Path(args.out).write_text(json.dumps(record) + "\n")
    return record


def smooth(values, window: int = 100):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(paths: list[str], figure: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(p).stem, json.loads(Path(p).read_text())) for p in paths]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    for label, r in runs:
        ax.plot(smooth(r["loss"]), label=label)
    ax.set(title="training loss (100-step mean)", xlabel="step", ylabel="nats/token", ylim=(4.4, 7.5))
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for label, r in runs:
        ax.plot(smooth(r["total_grad_norm"]), label=label)
    ax.axhline(5.0, color="k", lw=0.5, ls="--")
    ax.set(title="global gradient norm before clipping (100-step mean)", xlabel="step", yscale="log")
    ax = axes[1][0]
    for label, r in runs:
        steps = [s["step"] for s in r["spectra"]]
        line, = ax.plot(steps, [s["layers"][0]["W"]["max"] for s in r["spectra"]], label=f"{label} max")
        ax.plot(steps, [s["layers"][0]["W"]["min"] for s in r["spectra"]], ls=":", color=line.get_color())
    ax.set(title="layer 0 gate matrix singular values (max solid, r-th dotted)", xlabel="step", yscale="log")
    ax = axes[1][1]
    for label, r in runs:
        rnn = {k: v for k, v in r["grad_norm"].items() if k.startswith("rnn.")}
        total = [math.sqrt(sum(v[i] ** 2 for v in rnn.values())) for i in range(len(r["loss"]))]
        ax.plot(smooth(total), label=f"{label} rnn")
    ax.set(title="recurrent-layer gradient norm (100-step mean)", xlabel="step", yscale="log")
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    print(f"wrote {figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="corpus directory (default: the built-in corpus)")
    parser.add_argument("--preset", default="ptb-small")
    parser.add_argument("--cell", default="flstm", choices=("lstm", "flstm", "glstm"))
    parser.add_argument("--rank", type=int, default=100)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--variant", default="library", choices=("library", "uniform", "svd"))
    parser.add_argument("--lr", type=float)
    parser.add_argument("--plain-sgd", action="store_true",
                        help="plain SGD on the F-LSTM factors (precondition_factors=False: the behaviour before issue #9)")
    parser.add_argument("--clip", type=float, help="clip norm (<= 0: off)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--valid", action="store_true", help="evaluate valid perplexity at the end")
    parser.add_argument("--out", default="/tmp/flstm-runs/diag.json")
    parser.add_argument("--plot", nargs="+", help="JSON files to plot instead of training")
    parser.add_argument("--figure", default="benchmarks/results/flstm_diagnosis.png")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.figure)
    else:
        run(args)


if __name__ == "__main__":
    main()
