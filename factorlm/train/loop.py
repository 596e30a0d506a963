"""The training loop: truncated BPTT with the state carried across batches, budgets, checkpoints.

    for each batch (T, B) of B continuous sentence streams:
        token_loss, state = model(inputs, detach(state), targets)   # state carried from the previous batch
        loss = sum over time, mean over batch of -log p              # the paper's / Zaremba's scale
        backward; clip; step; EMA update
    every checkpoint_minutes and at the end: atomic checkpoint (resumable exactly)
    at the end: exact validation (and test) perplexity, loss-curve PNG

Ready for several processes: the model is called once per step with its targets (a
DistributedDataParallel wrapper sees the whole computation), every batcher takes (rank,
world_size), and the two decisions that must be the same on every rank — stop now, and this
epoch's data has run out — go through :meth:`Trainer.agree` (one process: the local answer).
:meth:`Trainer.compute_loss` is the loss step a subclass replaces (e.g. distillation).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from factorlm.data import ContiguousBatcher, Corpus, StreamBatcher, Vocabulary, split_stream
from factorlm.distributed import (ProcessInfo, all_reduce_sum, any_rank, any_rank_each, average_gradients,
                                  gather_to_main, init_processes)
from factorlm.errors import SetupError, TrainingError
from factorlm.evaluate import EvalResult, evaluate_stream
from factorlm.models import LanguageModel, ModelConfig
from factorlm.models.lm import detach_state, map_state
from factorlm.train.checkpoint import load_checkpoint, save_checkpoint
from factorlm.train.config import TrainConfig
from factorlm.train.logging import RunLogger, plot_loss_curve
from factorlm.train.optim import EMA, build_optimizer, clip_parameters, lr_for_epoch, set_lr, sparse_ok


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    elapsed: float = 0.0  # training seconds, summed over resumes
    tokens: int = 0
    last_checkpoint: str | None = None


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """One training run in ``out_dir`` (checkpoint.pt, metrics.jsonl, tensorboard/, loss_curve.png, results.json).

    ``Trainer(model_config, train_config, corpus, out_dir)`` starts a run;
    ``Trainer.resume(out_dir, corpus)`` continues the one saved there.
    """

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, corpus: Corpus, out_dir,
                 *, device: str | None = None, show_progress: bool = True) -> None:
        """Start a new run in ``out_dir`` (refused when it already holds a checkpoint)."""
        checkpoint_path = Path(out_dir) / "checkpoint.pt"
        if checkpoint_path.exists():
            raise FileExistsError(
                f"{checkpoint_path} exists: pass --resume to continue that run, or choose another --out"
            )
        self._setup(model_config.replace(vocab_size=len(corpus.vocab)), train_config, corpus, out_dir,
                    device=device, show_progress=show_progress, payload=None)

    @classmethod
    def resume(cls, out_dir, corpus: Corpus, *, checkpoint: dict | None = None, budgets: dict | None = None,
               device: str | None = None, show_progress: bool = True) -> "Trainer":
        """Continue the run saved in ``out_dir`` exactly where it stopped, with its saved configs.

        ``budgets`` may replace max_steps / max_time / epochs (e.g. a longer run); ``checkpoint``:
        out_dir's checkpoint already loaded by the caller (read once, not twice).
        """
        path = Path(out_dir) / "checkpoint.pt"
        payload = checkpoint if checkpoint is not None else load_checkpoint(path)
        saved_world, world = payload.get("world_size", 1), ProcessInfo.from_env().world_size
        if saved_world != world:  # checked before joining a process group, so every rank fails at once
            raise SetupError(
                f"{path} was written by {saved_world} process(es) and this run has {world}: resume with the same "
                f"count (torchrun with {saved_world} processes in all), since each rank continues its own share "
                f"of the data and its own recurrent state")
        Vocabulary.from_dict(payload["vocab"]).check_same(
            corpus.vocab, name=f"checkpoint {path}", other_name=f"the corpus {corpus.name!r}")
        trainer = cls.__new__(cls)
        trainer._setup(ModelConfig.from_dict(payload["model_config"]),
                       _merge_budgets(TrainConfig.from_dict(payload["train_config"]), budgets), corpus, out_dir,
                       device=device, show_progress=show_progress, payload=payload)
        return trainer

    def _setup(self, model_config: ModelConfig, train_config: TrainConfig, corpus: Corpus, out_dir, *,
               device: str | None, show_progress: bool, payload: dict | None) -> None:
        """What a new and a resumed run share: model, optimizer, batcher, logger (then the saved state)."""
        self.info, self.device = init_processes(pick_device(device))
        self.corpus = corpus
        self.out_dir = Path(out_dir)
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        self.model_config, self.config = model_config, train_config
        torch.manual_seed(train_config.seed + self.info.rank)
        self.model = LanguageModel(model_config).to(self.device)
        self.model.use_sparse_gradients(sparse_ok(train_config))
        self.optimizer = build_optimizer(self.model, train_config)
        self.ema = EMA(self.model, train_config.ema_decay) if train_config.ema_decay > 0 else None
        self.clip_params = clip_parameters(self.model, train_config)
        self.batcher = self._make_batcher()
        self.progress = Progress()
        self.state = None
        self.stop_requested: str | None = None
        self.exchange_seconds = 0.0  # time in the gradient exchange since the last train record
        if payload is not None:
            self._restore(payload)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.logger = RunLogger(self.out_dir, total=train_config.max_steps, enabled=self.info.is_main,
                                show_progress=show_progress)
        self.autocast = self.device.type == "cuda" and train_config.precision in ("auto", "bf16")

    def _make_batcher(self):
        """This rank's training batches: B of the B·world_size rows of every global batch."""
        c, rank, world = self.config, self.info.rank, self.info.world_size
        if c.batching == "contiguous":
            return ContiguousBatcher(lambda: split_stream(self.corpus, "train"), c.batch_size, c.num_steps,
                                     rank=rank, world_size=world)
        return StreamBatcher.from_corpus(self.corpus, "train", c.batch_size, c.num_steps, seed=c.seed,
                                         rank=rank, world_size=world)

    # ------------------------------------------------------------ checkpoints
    def _rank_state(self) -> dict:
        """What differs between ranks: data position, carried recurrent state, random generators."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = map_state(lambda t: t.cpu(), self.state) if self.state is not None else None
        return {"data_state": self.batcher.state_dict(), "rnn_state": state, "rng": rng}

    def _payload(self, ranks: list[dict]) -> dict:
        """The checkpoint: shared weights and counters, and every rank's own state (``ranks``, in
        rank order; rank 0's also at the top level, where one-process checkpoints keep it)."""
        return {
            "model_config": self.model_config.to_dict(),
            "train_config": self.config.to_dict(),
            "vocab": self.corpus.vocab.to_dict(),
            "data_path": getattr(self.corpus, "path", None),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            **ranks[0],
            "ranks": ranks,
            "world_size": self.info.world_size,
            "step": self.progress.step,
            "epoch": self.progress.epoch,
            "elapsed": self.progress.elapsed,
            "tokens": self.progress.tokens,
        }

    def _restore(self, payload: dict) -> None:
        own = payload["ranks"][self.info.rank] if "ranks" in payload else payload
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.ema is not None and payload.get("ema") is not None:
            self.ema.load_state_dict(payload["ema"])
        self.batcher.load_state_dict(own["data_state"])
        state = own.get("rnn_state")
        self.state = map_state(lambda t: t.to(self.device), state) if state is not None else None
        torch.set_rng_state(own["rng"]["torch"])
        if "cuda" in own["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(own["rng"]["cuda"])
        self.progress = Progress(step=payload["step"], epoch=payload["epoch"], elapsed=payload["elapsed"],
                                 tokens=payload["tokens"], last_checkpoint=str(self.checkpoint_path))

    def save(self) -> None:
        """Write the checkpoint (rank 0, with every rank's state gathered); every rank calls it."""
        ranks = gather_to_main(self._rank_state(), self.info)
        if self.info.is_main:
            save_checkpoint(self._payload(ranks), self.checkpoint_path)
        self.progress.last_checkpoint = str(self.checkpoint_path)

    # ------------------------------------------------------------------ loop
    def stop_reason(self) -> str | None:
        """Why this process would stop before the next step (None: go on). Ranks agree via :meth:`agree`."""
        c, p = self.config, self.progress
        if self.stop_requested:
            return self.stop_requested
        if c.max_steps is not None and p.step >= c.max_steps:
            return "max_steps"
        if c.max_time is not None and p.elapsed >= c.max_time:
            return "max_time"
        if c.epochs is not None and p.epoch >= c.epochs:
            return "epochs"
        return None

    def _budget_left(self) -> bool:
        return not self.agree(self.stop_reason() is not None)

    def agree(self, flag: bool) -> bool:
        """True when ``flag`` is true on any process, so that every rank takes the same branch.

        One process: ``flag`` itself. Several processes (torchrun): an all-reduce of the flag
        with MAX; every rank calls it at the same points.
        """
        return any_rank(flag, self.info, self.device)

    def agree_each(self, *flags: bool) -> list[bool]:
        """:meth:`agree` for several flags at once (one collective)."""
        return any_rank_each(list(flags), self.info, self.device)

    def _data_ran_out(self, batch) -> bool:
        """Whether this epoch's data has ended on any rank (batch None: on this one)."""
        return self.agree(batch is None)

    def compute_loss(self, inputs: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """The training loss of one batch, summed over its target tokens (a float32 scalar).

        inputs, targets (T, B) int64; mask (T, B) bool (False on padding). Carries ``self.state``
        to the next batch. Override for another loss (e.g. distillation); the step divides the
        sum by B (sum over time, mean over the batch) before backward.
        """
        token_loss, self.state = self.model(inputs, self.state, targets=targets)
        return (token_loss.float() * mask).sum()

    def train_step(self, batch) -> float:
        """One optimizer step on one batch; returns the mean per-token loss."""
        model, c = self.model, self.config
        inputs, targets = batch.inputs.to(self.device), batch.targets.to(self.device)
        mask = batch.mask.to(self.device)
        if self.state is None:
            self.state = model.init_state(inputs.shape[1], device=self.device)
        self.state = detach_state(self.state)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss_sum = self.compute_loss(inputs, targets, mask)
        mean = loss_sum.item() / max(1, batch.num_tokens)
        if not math.isfinite(mean):
            last = self.progress.last_checkpoint or "none written yet"
            raise TrainingError(
                f"non-finite training loss ({mean}) at step {self.progress.step + 1}; "
                f"the last good checkpoint is kept: {last}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        (loss_sum / inputs.shape[1]).backward()  # sum over time, mean over batch
        if self.info.distributed:  # the mean over ranks: the global batch's gradient
            t0 = time.monotonic()
            average_gradients(self.model.parameters(), self.info)
            self.exchange_seconds += time.monotonic() - t0
        if c.clip_norm is not None and self.clip_params:
            torch.nn.utils.clip_grad_norm_(self.clip_params, c.clip_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(model, step=self.progress.step)
        return mean

    def fit(self) -> dict:
        """Train until a budget ends, then checkpoint, evaluate and plot. Returns the results dict."""
        c, p = self.config, self.progress
        if c.epochs is None and c.max_steps is None and c.max_time is None:
            raise ValueError("no training budget: set epochs, max_steps or max_time")
        self.model.train()
        self._last_save = time.monotonic()
        window = _LossWindow()
        self.logger.message(f"training {self.model_config.cell} on {self.corpus.name}: "
                            f"{sum(q.numel() for q in self.model.parameters()):,} parameters, device {self.device}")
        handlers = self._install_stop_handlers()
        try:
            while self._budget_left():
                set_lr(self.optimizer, lr_for_epoch(c, p.epoch))
                if self._train_epoch(window):  # the epoch's data ran out
                    p.epoch += 1
                    self.state = None  # a new epoch starts new streams
                    if c.epochs is not None or p.step > 0:
                        self._log_validation()
            if window.steps:  # the steps since the last record (a short run may have no other)
                self._record_train(window)
            self.save()
        finally:
            self.logger.close()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        if self.stop_requested:
            raise KeyboardInterrupt(
                f"stopped by {self.stop_requested} at step {p.step}; checkpoint saved to {self.checkpoint_path}, "
                f"continue with --resume"
            )
        return self.finish()

    def _train_epoch(self, window: "_LossWindow") -> bool:
        """Steps of epoch ``progress.epoch`` until its data runs out (True) or a budget ends (False).

        The end of the data is agreed between ranks: when one rank's share runs out, every rank
        ends the epoch (the others drop the batch they had; the next epoch starts afresh).
        """
        c, p = self.config, self.progress
        batches = self.batcher.epoch_batches(p.epoch)
        while True:
            batch = next(batches, None)
            if self._data_ran_out(batch):
                return True
            t0 = time.monotonic()
            loss = self.train_step(batch)
            p.elapsed += time.monotonic() - t0
            p.step += 1
            p.tokens += batch.num_tokens * self.info.world_size  # every rank's batch has the same size
            window.add(loss, batch.num_tokens)
            if p.step % c.log_every == 0:
                self._record_train(window)
            # one agreement for both decisions, so that every rank saves and stops at the same step
            save_due, stop = self.agree_each(time.monotonic() - self._last_save >= c.checkpoint_minutes * 60,
                                             self.stop_reason() is not None)
            if save_due:
                self.save()
                self._last_save = time.monotonic()
            if stop:
                return False

    def _install_stop_handlers(self) -> dict:
        """Ctrl-C / SIGTERM finish the current step, save a checkpoint and stop (never mid-update)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            if self.stop_requested:  # a second signal: stop at once
                raise KeyboardInterrupt
            self.stop_requested = signal.Signals(signum).name
            self.logger.message(f"{self.stop_requested}: finishing this step and saving a checkpoint")

        return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _record_train(self, window: "_LossWindow") -> None:
        """Log the window's loss and words/s (means and sums over ranks; every rank calls this)."""
        p, world = self.progress, self.info.world_size
        loss = all_reduce_sum(window.loss / window.steps, self.info, self.device) / world
        wps = all_reduce_sum(window.words_per_sec(), self.info, self.device)
        extra = {}
        if self.info.distributed:
            extra = {"world_size": world, "exchange_seconds_per_step": self.exchange_seconds / window.steps}
            self.exchange_seconds = 0.0
        self.logger.record("train", p.step, loss=loss, words_per_sec=wps, lr=self.optimizer.param_groups[0]["lr"],
                           epoch=p.epoch, elapsed=p.elapsed, **extra)
        self.logger.progress(p.step, f"epoch {p.epoch} loss {loss:.3f} ppl {math.exp(min(loss, 50)):.1f} "
                             f"{wps:,.0f} w/s", eta=self._eta())
        window.reset()

    def _eta(self) -> float | None:
        c, p = self.config, self.progress
        left = []
        if c.max_time is not None:
            left.append(c.max_time - p.elapsed)
        if c.max_steps is not None and p.step:
            left.append((c.max_steps - p.step) * p.elapsed / p.step)
        return max(0.0, min(left)) if left else None

    def _log_validation(self) -> None:
        if "valid" not in self.corpus.splits:
            return
        result = self.evaluate("valid")
        self.logger.record("valid", self.progress.step, loss=result.loss, perplexity=result.perplexity,
                           elapsed=self.progress.elapsed, epoch=self.progress.epoch)
        self.logger.message(f"epoch {self.progress.epoch}: valid perplexity {result.perplexity:.2f}")
        self.model.train()

    def evaluate(self, split: str) -> EvalResult:
        if self.ema is not None:
            self.ema.swap(self.model)
        try:
            return evaluate_stream(self.model, split_stream(self.corpus, split), batch_size=self.config.eval_batch_size,
                                   num_steps=self.config.num_steps, device=self.device, processes=self.info,
                                   progress=self.logger.enabled and self.logger.show_progress and split)
        finally:
            if self.ema is not None:
                self.ema.swap(self.model)

    def finish(self) -> dict:
        """Exact evaluation on valid/test (every rank takes part), results.json and the loss curve (rank 0)."""
        p = self.progress
        results = {"steps": p.step, "epochs": p.epoch, "train_seconds": p.elapsed, "train_tokens": p.tokens,
                   "words_per_sec": p.tokens / p.elapsed if p.elapsed else None,
                   "checkpoint": str(self.checkpoint_path)}
        optimal = getattr(self.corpus, "optimal_loss", None) or {}
        for split in ("valid", "test"):
            if split in self.corpus.splits:
                r = self.evaluate(split)
                results[split] = r.to_dict()
                if split in optimal:
                    results[split]["optimal_loss"] = optimal[split]
                    results[split]["optimal_perplexity"] = math.exp(optimal[split])
        if not self.info.is_main:
            return results
        (self.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        metrics = self.out_dir / "metrics.jsonl"
        if metrics.exists():
            plot_loss_curve(metrics, self.out_dir / "loss_curve.png", optimal_loss=optimal.get("valid"))
        return results


class _LossWindow:
    """Mean loss and words/sec over the steps since the last train record."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.tokens, self.start = 0.0, 0, 0, time.monotonic()

    def add(self, loss: float, tokens: int) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens

    def words_per_sec(self) -> float:
        return self.tokens / max(time.monotonic() - self.start, 1e-9)


BUDGETS = ("max_steps", "max_time", "epochs")


def _merge_budgets(saved: TrainConfig, budgets: dict | None) -> TrainConfig:
    """On resume the saved recipe wins; budgets given now (e.g. a longer run) replace the saved ones."""
    unknown = set(budgets or {}) - set(BUDGETS)
    if unknown:
        raise ValueError(f"on --resume only the budgets {BUDGETS} can change, not {sorted(unknown)}")
    return saved.replace(**(budgets or {}))
