"""The training loop: truncated BPTT with the state carried across batches, budgets, checkpoints.

    for each batch (T, B) of B continuous sentence streams:
        token_loss, state = model(inputs, detach(state), targets)   # state carried from the previous batch
        loss = sum over time, mean over batch of -log p              # the paper's / Zaremba's scale
        backward; clip; step; EMA update
    every checkpoint_minutes and at the end: atomic checkpoint (resumable exactly)
    at the end: exact validation (and test) perplexity, loss-curve PNG

Nothing is lost to a failure. Before the first step every split the run will read is read once
(a bad byte in valid.txt stops the run at once, not at the first evaluation). After training has
started, an error saves a checkpoint of the last completed step before it is reported (the data
position, carried state and RNG of that step are kept for this at each step); only a non-finite
loss (the weights are suspect) and a failure inside the weight update keep the last checkpoint
instead. SIGINT / SIGTERM finish the step, save and stop (factorlm.errors.Interrupted).

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from factorlm.compress.masks import MaskHook
from factorlm.data import ContiguousBatcher, Corpus, StreamBatcher, Vocabulary, split_stream
from factorlm.distributed import (ProcessInfo, all_reduce_sum, any_rank, any_rank_each, average_gradients,
                                  gather_to_main, init_processes)
from factorlm.errors import (FactorlmError, Interrupted, OutputError, RunStoppedError, SetupError,
                             TrainingError)
from factorlm.evaluate import EvalResult, evaluate_stream
from factorlm.models import LanguageModel, ModelConfig
from factorlm.models.lm import detach_state, map_state
from factorlm.outputs import ensure_directory
from factorlm.runs import check_weights_fit
from factorlm.train.checkpoint import (CheckpointError, load_checkpoint, remove_stale_temp_files, require_resumable,
                                       save_checkpoint, saved_model_config, saved_train_config)
from factorlm.train.config import TrainConfig
from factorlm.train.hooks import StepHook
from factorlm.train.logging import RunLogger, clear_logs, plot_loss_curve, trim_metrics
from factorlm.train.optim import EMA, build_optimizer, clip_parameters, lr_for_epoch, set_lr, sparse_ok
from factorlm.train.resume import changed_settings, resumed_config

#: errors that are the run's circumstances (data, disk, memory), not a bug: after a checkpoint is
#: saved they are reported in one line (RunStoppedError); any other error keeps its traceback
EXPECTED_ERRORS = (FactorlmError, OSError, ValueError, MemoryError, torch.cuda.OutOfMemoryError)


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    elapsed: float = 0.0  # training seconds, summed over resumes
    tokens: int = 0
    last_checkpoint: str | None = None


def pick_device(name: str | None) -> torch.device:
    """The device ``name`` names (default: cuda when available, else cpu); ValueError for a name
    torch does not know, a GPU this machine lacks, or the meta device (it holds no values)."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise ValueError("the meta device holds no values, so nothing can be computed on it; use cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        have = f"{torch.cuda.device_count()} CUDA GPU(s)" if torch.cuda.is_available() else "no CUDA GPU"
        raise ValueError(f"device {name!r} asked for, but this machine has {have}; use --device cpu")
    return device


class Trainer:
    """One training run in ``out_dir`` (checkpoint.pt, metrics.jsonl, tensorboard/, loss_curve.png, results.json).

    ``Trainer(model_config, train_config, corpus, out_dir)`` starts a run;
    ``Trainer.resume(out_dir, corpus)`` continues the one saved there. ``hooks``
    (factorlm.train.hooks.StepHook) act around every optimizer step: pruning masks
    (factorlm.compress.masks) when the run has them or prunes.
    """

    #: what kind of run this class trains, saved in its checkpoints: a run is resumed by the
    #: class that started it (a distillation by the distillation trainer)
    kind: str = "train"

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, corpus: Corpus, out_dir,
                 *, device: str | None = None, show_progress: bool = True, init_from: Mapping | None = None) -> None:
        """Start a new run in ``out_dir`` (refused when it already holds a checkpoint; logs an
        earlier run left there without a checkpoint are removed, so they describe this run only).

        init_from: start from trained weights instead of fresh ones (fine-tuning,
        factorlm.train.finetune): {"model": a state dict of model_config's model, "prune_masks":
        optional masks to keep, "origin": plain data saved with the run, e.g. the source checkpoint}.
        The optimizer, the EMA and the data position start afresh.
        """
        checkpoint_path = ensure_directory(out_dir, "run directory") / "checkpoint.pt"
        if checkpoint_path.exists():
            raise FileExistsError(
                f"{checkpoint_path} exists: pass --resume to continue that run, or choose another --out"
            )
        self._setup(model_config.replace(vocab_size=len(corpus.vocab)), train_config, corpus, out_dir,
                    device=device, show_progress=show_progress, payload=None, init_from=init_from)

    @classmethod
    def resume(cls, out_dir, corpus: Corpus, *, checkpoint: dict | None = None, budgets: dict | None = None,
               changes: dict | None = None, device: str | None = None, show_progress: bool = True) -> "Trainer":
        """Continue the run saved in ``out_dir`` exactly where it stopped, with its saved configs.

        ``budgets`` / ``changes`` may replace the settings that do not change what is computed
        (factorlm.train.resume.ADJUSTABLE: max_steps / max_time / epochs for a longer run,
        log_every, checkpoint_minutes, eval_batch_size); the changes are announced. ``checkpoint``:
        out_dir's checkpoint already loaded by the caller (read once, not twice).
        """
        path = Path(out_dir) / "checkpoint.pt"
        payload = checkpoint if checkpoint is not None else load_checkpoint(path)
        require_resumable(payload, path)
        kind = payload.get("trainer", "train")
        if kind != cls.kind:
            command = "factorlm distill --resume" if kind == "distill" else f"factorlm {kind} --resume"
            raise CheckpointError(f"{path} holds a {kind} run, which {cls.__name__} cannot continue; "
                                  f"continue it with {command}")
        saved_world, world = payload.get("world_size", 1), ProcessInfo.from_env().world_size
        if saved_world != world:  # checked before joining a process group, so every rank fails at once
            raise SetupError(
                f"{path} was written by {saved_world} process(es) and this run has {world}: resume with the same "
                f"count (torchrun with {saved_world} processes in all), since each rank continues its own share "
                f"of the data and its own recurrent state")
        model_config, saved = saved_model_config(payload, path), saved_train_config(payload, path)
        vocab = Vocabulary.from_dict(payload["vocab"])
        check_weights_fit(model_config, payload, path, vocab_size=len(vocab))
        vocab.check_same(corpus.vocab, name=f"checkpoint {path}", other_name=f"the corpus {corpus.name!r}")
        train_config = resumed_config(saved, {**(budgets or {}), **(changes or {})})
        trainer = cls.__new__(cls)
        trainer._setup(model_config, train_config, corpus, out_dir, device=device, show_progress=show_progress,
                       payload=payload)
        changed = changed_settings(saved, train_config)
        if changed:
            trainer.logger.message(f"resuming at step {trainer.progress.step} with {', '.join(changed)}")
        return trainer

    def _setup(self, model_config: ModelConfig, train_config: TrainConfig, corpus: Corpus, out_dir, *,
               device: str | None, show_progress: bool, payload: dict | None,
               init_from: Mapping | None = None) -> None:
        """What a new and a resumed run share: model, optimizer, batcher, logger (then the saved state)."""
        self.info, self.device = init_processes(pick_device(device))
        self.corpus = corpus
        self.out_dir = Path(out_dir)
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        self.model_config, self.config = model_config, train_config
        self._check_data(show_progress)
        torch.manual_seed(train_config.seed + self.info.rank)
        self.model = LanguageModel(model_config).to(self.device)
        if train_config.qat:  # the same parameters and state dict; only the forward changes
            from factorlm.quant.qat import enable_qat

            enable_qat(self.model)
        self.model.use_sparse_gradients(sparse_ok(train_config))
        self.optimizer = build_optimizer(self.model, train_config)
        self.ema = EMA(self.model, train_config.ema_decay) if train_config.ema_decay > 0 else None
        self.clip_params = clip_parameters(self.model, train_config)
        self.batcher = self._make_batcher()
        self.progress = Progress()
        self.state = None
        self.stop_requested: str | None = None
        self.exchange_seconds = 0.0  # time in the gradient exchange since the last train record
        self._consistent: dict | None = None  # the position after the last completed step (see fit)
        self._updating = False  # inside the weight update: an error there leaves the weights half-stepped
        self._saved_step: int | None = None  # the step of the checkpoint on disk (None: none yet)
        self.origin = None  # what a fine-tuning run started from (init_from["origin"]), kept by every save
        if payload is not None:
            self._restore(payload)
        elif init_from is not None:
            self._start_from(init_from)
        if payload is not None:
            self.hooks = self.make_hooks(payload, f"checkpoint {self.checkpoint_path}")
        else:
            source = ((init_from or {}).get("origin") or {}).get("checkpoint", "the weights given")
            self.hooks = self.make_hooks(init_from, f"checkpoint {source}")
        records, notes = self._prepare_run_dir(payload)
        self.logger = RunLogger(self.out_dir, total=train_config.max_steps, enabled=self.info.is_main,
                                show_progress=show_progress, records=records,
                                purge_step=self.progress.step + 1 if payload is not None else None)
        for note in notes:
            self.logger.message(note)
        self.autocast = self.device.type == "cuda" and train_config.precision in ("auto", "bf16")

    def make_hooks(self, saved: Mapping | None, source: str) -> list[StepHook]:
        """The hooks of this run: pruning masks (those kept under "prune_masks" in ``saved``, the
        checkpoint resumed or what init_from gave, named ``source`` in errors, and the config's
        prune_* schedule). A subclass may add its own."""
        masks = MaskHook.create(self.model, self.config, saved, source)
        return [masks] if masks is not None else []

    def _start_from(self, init: Mapping) -> None:
        """Load trained weights into the new model (fine-tuning); the EMA starts from them."""
        try:
            self.model.load_state_dict(init["model"])
        except (KeyError, RuntimeError) as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"the weights to fine-tune do not fit the model config ({text})") from None
        if self.ema is not None:
            self.ema = EMA(self.model, self.config.ema_decay)
        self.origin = init.get("origin")

    def init_state(self, batch_size: int):
        """The recurrent state a batch of ``batch_size`` new rows starts from (zeros): what
        ``self.state`` holds and carries across batches (a subclass may carry more in it)."""
        return self.model.init_state(batch_size, device=self.device)

    def _check_data(self, show_progress: bool) -> None:
        """Read every split this run will read once now: what would stop it later stops it before
        the first step. Rank 0 alone reads (the ranks share one corpus; torchrun ends the group when
        one process fails)."""
        if not self.info.is_main:
            return
        for split in ["train"] + [s for s in ("valid", "test") if s in self.corpus.splits]:
            self.corpus.check_readable(split, progress=show_progress and self.info.is_main)

    def _prepare_run_dir(self, payload: dict | None) -> tuple[int, list[str]]:
        """Make the run directory consistent before anything is written: remove the temporary
        files of a save that was killed, and keep only logs of this run (a new run starts them
        afresh; a resumed one drops the records written after its checkpoint).

        Returns (metrics.jsonl records kept, notes for the user).
        """
        ensure_directory(self.out_dir, "run directory")
        if not self.info.is_main:
            return 0, []
        notes = []
        stale = remove_stale_temp_files(self.checkpoint_path)
        if stale:
            notes.append(f"removed {len(stale)} temporary file{'s' if len(stale) > 1 else ''} of a checkpoint save "
                         f"that was interrupted")
        if payload is None:
            removed = clear_logs(self.out_dir)
            if removed:
                notes.append(f"removed {', '.join(removed)} of an earlier run in {self.out_dir} that left no checkpoint")
            return 0, notes
        kept, dropped = trim_metrics(self.out_dir, records=payload.get("log_records"), step=payload["step"])
        if dropped:
            notes.append(f"dropped {dropped} metrics record{'s' if dropped > 1 else ''} written after the "
                         f"checkpoint of step {payload['step']}")
        return kept, notes

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
        """What differs between ranks: data position, carried recurrent state (on the CPU) and RNG.

        Inside fit those of the last completed step (they run ahead while a step is in flight, and
        an error may come mid-step)."""
        position = dict(self._consistent or self._position())
        state = position["rnn_state"]
        position["rnn_state"] = map_state(lambda t: t.cpu(), state) if state is not None else None
        return position

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
            "log_records": self.logger.records,  # the metrics.jsonl records this checkpoint covers
            "trainer": self.kind,
            "origin": self.origin,
            **{hook.key: hook.state_dict() for hook in self.hooks if hook.key is not None},
        }

    def _position(self) -> dict:
        """The data position, carried state and RNG now (copies: later steps do not change them)."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"data_state": self.batcher.state_dict(), "rnn_state": self.state, "rng": rng}

    def _mark_consistent(self) -> None:
        """Remember the position after a completed step (or epoch end): what a checkpoint holds.

        Cheap: the data position is a few ints and the rows' pending tokens, the RNG state a few
        KB, and the carried state is replaced (not modified) by the next step, so it is kept by reference.
        """
        self._consistent = self._position()

    def _restore(self, payload: dict) -> None:
        try:
            own = payload["ranks"][self.info.rank] if "ranks" in payload else payload
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.origin = payload.get("origin")
            if self.ema is not None and payload.get("ema") is not None:
                self.ema.load_state_dict(payload["ema"])
            self.batcher.load_state_dict(own["data_state"])
            state = own.get("rnn_state")
            self.state = map_state(lambda t: t.to(self.device), state) if state is not None else None
            torch.set_rng_state(own["rng"]["torch"])
            if "cuda" in own["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(own["rng"]["cuda"])
            self.progress = Progress(step=int(payload["step"]), epoch=int(payload["epoch"]),
                                     elapsed=float(payload["elapsed"]), tokens=int(payload["tokens"]),
                                     last_checkpoint=str(self.checkpoint_path))
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:  # a damaged or hand-made file
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint {self.checkpoint_path} cannot be resumed: {text}") from None
        self._saved_step = self.progress.step

    def save(self) -> None:
        """Write the checkpoint (rank 0, with every rank's state gathered); every rank calls it."""
        ranks = gather_to_main(self._rank_state(), self.info)
        if self.info.is_main:
            save_checkpoint(self._payload(ranks), self.checkpoint_path)
        self.progress.last_checkpoint = str(self.checkpoint_path)
        self._saved_step = self.progress.step

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
            self.state = self.init_state(inputs.shape[1])
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
        for hook in self.hooks:
            hook.before_update(self)
        if c.clip_norm is not None and self.clip_params:
            torch.nn.utils.clip_grad_norm_(self.clip_params, c.clip_norm)
        self._updating = True
        self.optimizer.step()
        for hook in self.hooks:
            hook.after_update(self, self.progress.step + 1)
        if self.ema is not None:
            self.ema.update(model, step=self.progress.step)
        self._updating = False
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
        first_step = p.step
        for hook in self.hooks:
            hook.start(self)
        self._mark_consistent()
        try:
            while self._budget_left():
                set_lr(self.optimizer, lr_for_epoch(c, p.epoch))
                if self._train_epoch(window):  # the epoch's data ran out
                    p.epoch += 1
                    self.state = None  # a new epoch starts new streams
                    self._mark_consistent()
                    if c.epochs is not None or p.step > 0:
                        self._log_validation()
            if window.steps:  # the steps since the last record (a short run may have no other)
                self._record_train(window)
            if self._saved_step != p.step or window.steps:  # not when the last step's save is current
                self.save()
        except (TrainingError, KeyboardInterrupt):  # the weights are suspect / a second signal: stop now
            raise
        except Exception as exc:
            if p.step == first_step:  # nothing trained here: the checkpoint on disk (if any) is current
                raise
            outcome = self._save_after_error(exc)
            if isinstance(exc, EXPECTED_ERRORS):
                raise RunStoppedError(f"{exc}; {outcome}") from exc
            if hasattr(exc, "add_note"):  # Python 3.11+: shown under the traceback
                exc.add_note(f"factorlm: {outcome}")
            raise
        finally:
            self._consistent = None
            self.logger.close()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        if self.stop_requested:
            raise Interrupted(
                f"stopped by {self.stop_requested} at step {p.step}; checkpoint saved to {self.checkpoint_path}, "
                f"continue with --resume", signal.Signals[self.stop_requested])
        try:
            return self.finish()
        except EXPECTED_ERRORS as exc:
            raise RunStoppedError(f"{exc}; training had finished and its checkpoint is saved: "
                                  f"{self.checkpoint_path}") from exc

    def _save_after_error(self, exc: Exception) -> str:
        """Save the last completed step after ``exc`` stopped training; what was saved or kept, as text."""
        kept = (f"the checkpoint of step {self._saved_step} is kept" if self._saved_step is not None
                else "no checkpoint was written")
        if self._updating:
            return f"the error came inside the weight update of step {self.progress.step + 1}, so {kept}"
        if isinstance(exc, OutputError) and exc.path == self.checkpoint_path:  # the save itself failed
            return f"training stopped at step {self.progress.step}, and {kept}"
        if self.info.distributed:  # saving gathers from every rank, and the others are not here
            return f"training stopped at step {self.progress.step} on rank {self.info.rank}, and {kept}"
        try:
            self.save()
        except Exception as again:  # e.g. the disk that failed the logs is full for the checkpoint too
            return f"saving a checkpoint also failed ({again}); {kept}"
        return (f"training stopped at step {self.progress.step}: checkpoint saved to {self.checkpoint_path}, "
                f"continue with --resume")

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
            self._mark_consistent()
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
                raise Interrupted(f"stopped at once by a second signal ({signal.Signals(signum).name}); the last "
                                  f"checkpoint is kept: {self.progress.last_checkpoint or 'none written yet'}", signum)
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

