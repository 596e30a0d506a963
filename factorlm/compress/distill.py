"""Knowledge distillation (Hinton et al. 2015): train a small student against a trained teacher.

Per target token, with temperature T and weight α (DistillConfig):

    loss = (1 − α)·nll_student(target) + α·T²·KL(softmax(z_teacher/T) ‖ softmax(z_student/T))

(T² keeps the soft term's gradient at the data term's scale as T changes.) The KL is taken

- over the whole vocabulary when the student has the full softmax (``top_k=None``), from one
  (N, V) logit matrix that also gives the data loss;
- over the teacher's k largest logits (``top_k=k``; the default when the student trains with
  sampled softmax), both distributions renormalised over those k words. The teacher's top k
  are found in vocabulary tiles (never N × V logits at once); the student's logits are formed
  for the union U of the batch's top-k ids only ((N, |U|), gathering only those rows of its
  softmax weight, as the sampled softmax does), and its data loss is its own (sampled) loss.

The teacher runs in eval mode without gradients, on the same batches, its recurrent state carried
across batches alongside the student's: ``Trainer.state`` holds the pair (student state, teacher
state), so detaching between windows, the reset at a new epoch, checkpoints and resume carry both
unchanged. Everything else (budgets, checkpoints, resume, torchrun, logs, plots, the final exact
evaluation of the student) is the Trainer's; the loss logged is the mixed one. The checkpoint keeps
the settings and the teacher's path and identity under "distill", so a resume finds the teacher
(``teacher=`` points a resume to a teacher that moved; it must be the same model and step).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from factorlm.config_base import ConfigBase
from factorlm.data import Corpus
from factorlm.errors import CheckpointError, ConfigError
from factorlm.models import LanguageModel, ModelConfig
from factorlm.runs import load_model
from factorlm.train.checkpoint import load_checkpoint
from factorlm.train.config import TrainConfig
from factorlm.train.loop import Trainer
from factorlm.validate import check_fraction, check_int, check_real

__all__ = ["DistillConfig", "DistillTrainer", "DEFAULT_TOP_K", "full_kl", "top_k_kl", "teacher_top_k"]

#: the teacher's logits kept per token when the student trains with sampled softmax and no top_k is given
DEFAULT_TOP_K = 64


@dataclass(frozen=True)
class DistillConfig(ConfigBase):
    kind: ClassVar[str] = "distill"

    teacher: str = ""  # the teacher's checkpoint (a run directory or checkpoint file)
    alpha: float = 0.5  # weight of the teacher's soft targets; 1 - alpha weighs the data loss
    temperature: float = 2.0  # T: both softmaxes at z / T in the KL term
    top_k: int | None = None  # None: all logits with a full-softmax student, else DEFAULT_TOP_K; k: the teacher's top k

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ValueError(f"teacher must name the teacher's checkpoint, got {self.teacher!r}")
        check_fraction("alpha", self.alpha, include_one=True)
        check_real("temperature", self.temperature)
        check_int("top_k", self.top_k, optional=True, note="(None: every logit with a full softmax)")

    def top_k_for(self, student: ModelConfig) -> int | None:
        """The k used for ``student`` (None: all logits)."""
        if self.top_k is not None:
            return self.top_k if self.top_k < student.vocab_size else None
        return min(DEFAULT_TOP_K, student.vocab_size - 1) if student.num_sampled > 0 else None


def full_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) over the last dimension: (..., V), (..., V) -> (...), float32."""
    teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1)


@torch.no_grad()
def teacher_top_k(hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int, *,
                  max_logits: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """The k largest logits of hidden (N, d) · weight (V, d)ᵀ + bias per row: values (N, k) float32
    and ids (N, k) int64, computed in vocabulary tiles of at most ``max_logits`` logits."""
    n, vocab = hidden.shape[0], weight.shape[0]
    block = max(k, max_logits // max(n, 1))
    best_values = best_ids = None
    for start in range(0, vocab, block):
        end = min(vocab, start + block)
        logits = F.linear(hidden, weight[start:end], None if bias is None else bias[start:end]).float()  # (N, b)
        values, ids = logits.topk(min(k, end - start), dim=1)
        ids += start
        if best_values is not None:
            values, ids = torch.cat([best_values, values], 1), torch.cat([best_ids, ids], 1)
            values, order = values.topk(k, dim=1)
            ids = ids.gather(1, order)
        best_values, best_ids = values, ids
    return best_values, best_ids


def top_k_kl(hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher_values: Tensor, teacher_ids: Tensor,
             temperature: float, *, sparse_grad: bool = False) -> Tensor:
    """KL over the teacher's top k, both distributions renormalised over those k words.

    hidden (N, d) the student's softmax input; weight (V, d), bias (V,) its softmax; teacher_values,
    teacher_ids (N, k) -> (N,). Only the rows of the batch's distinct ids are read (sparse_grad:
    the weight's gradient holds only those rows, as the sampled softmax's).
    """
    ids, where = torch.unique(teacher_ids, return_inverse=True)  # (U,), (N, k)
    logits = hidden @ F.embedding(ids, weight, sparse=sparse_grad).t()  # (N, U)
    if bias is not None:
        logits = logits + bias[ids]
    return full_kl(logits.gather(1, where), teacher_values, temperature)


class DistillTrainer(Trainer):
    """A Trainer whose loss mixes the data loss with the teacher's soft targets (module docstring).

    ``DistillTrainer(student_config, train_config, corpus, out_dir, distill=DistillConfig(teacher=...))``
    starts a run; ``DistillTrainer.resume(out_dir, corpus)`` continues one (finding the teacher
    where the checkpoint says). ``init_from`` as Trainer's (a student that starts trained).
    """

    kind = "distill"

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, corpus: Corpus, out_dir, *,
                 distill: DistillConfig, teacher_checkpoint: dict | None = None, device: str | None = None,
                 show_progress: bool = True, init_from: Mapping | None = None) -> None:
        """teacher_checkpoint: the teacher's payload already loaded (read once, not twice)."""
        distill = distill.replace(teacher=str(Path(distill.teacher).resolve()))  # a resume may run elsewhere
        teacher, payload = _load_teacher(distill.teacher, corpus, teacher_checkpoint)  # fails before the run starts
        super().__init__(model_config, train_config, corpus, out_dir, device=device, show_progress=show_progress,
                         init_from=init_from)
        self._attach(teacher, payload, distill)

    @classmethod
    def resume(cls, out_dir, corpus: Corpus, *, teacher: str | None = None, checkpoint: dict | None = None,
               **kwargs) -> "DistillTrainer":
        """Continue the distillation saved in ``out_dir`` (kwargs: as Trainer.resume); ``teacher``:
        where the teacher is now, when it moved (it must be the model and step the run saved)."""
        path = Path(out_dir) / "checkpoint.pt"
        payload = checkpoint if checkpoint is not None else load_checkpoint(path)
        saved = payload.get("distill")
        if not isinstance(saved, Mapping):
            raise CheckpointError(f"{path} is not a distillation run (it has no 'distill' settings); "
                                  f"continue it with factorlm train --resume")
        identity = {key: saved.get(key) for key in ("teacher_step", "teacher_model_config")}
        settings = DistillConfig.from_dict({k: v for k, v in saved.items() if k not in identity})
        if teacher is not None:
            settings = settings.replace(teacher=str(teacher))
        model, teacher_payload = _load_teacher(settings.teacher, corpus, None)
        found = {"teacher_step": teacher_payload.get("step"), "teacher_model_config": teacher_payload["model_config"]}
        if found != identity:
            raise CheckpointError(
                f"teacher {settings.teacher} is not the teacher {path} was distilled from (step "
                f"{found['teacher_step']} of a {found['teacher_model_config'].get('cell')} model, expected step "
                f"{identity['teacher_step']} of a {(identity['teacher_model_config'] or {}).get('cell')} model); "
                f"pass --teacher with the original")
        trainer = super().resume(out_dir, corpus, checkpoint=payload, **kwargs)
        trainer._attach(model, teacher_payload, settings)
        return trainer

    def _attach(self, teacher: LanguageModel, payload: dict, settings: DistillConfig) -> None:
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.distill = settings
        self.teacher_identity = {"teacher_step": payload.get("step"), "teacher_model_config": payload["model_config"]}
        self.top_k = settings.top_k_for(self.model_config)

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int):
        """(student state, teacher state), both zero: the teacher's is carried alongside the student's."""
        return (self.model.init_state(batch_size, device=self.device),
                self.teacher.init_state(batch_size, device=self.device))

    def _payload(self, ranks: list[dict]) -> dict:
        return {**super()._payload(ranks), "distill": {**self.distill.to_dict(), **self.teacher_identity}}

    # ------------------------------------------------------------------- loss
    def compute_loss(self, inputs: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """(1 − α)·data loss + α·T²·KL, summed over the batch's target tokens (module docstring)."""
        student_state, teacher_state = self.state
        hidden, student_state = self.model(inputs, student_state)  # (T, B, p)
        with torch.no_grad():
            teacher_hidden, teacher_state = self.teacher(inputs, teacher_state)
        self.state = (student_state, teacher_state)
        alpha, temp = self.distill.alpha, self.distill.temperature
        softmax, teacher_softmax = self.model.softmax, self.teacher.softmax
        rows, teacher_rows = hidden.reshape(-1, hidden.shape[-1]), teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        if self.top_k is None:  # every logit: one (N, V) matrix gives both terms
            logits = softmax.logits(rows).float()
            data = F.cross_entropy(logits, targets.reshape(-1), reduction="none")
            with torch.no_grad():
                teacher_logits = teacher_softmax.logits(teacher_rows)
            soft = full_kl(logits, teacher_logits, temp)
        else:
            data = self.model.loss(hidden, targets).float().reshape(-1)
            values, ids = teacher_top_k(teacher_rows, teacher_softmax.weight, teacher_softmax.bias, self.top_k)
            soft = top_k_kl(rows, softmax.weight, softmax.bias, values, ids, temp,
                            sparse_grad=getattr(softmax, "sparse_grad", False))
        per_token = (1.0 - alpha) * data + alpha * temp * temp * soft  # (T·B,)
        return (per_token.view(mask.shape) * mask).sum()


def _load_teacher(path: str, corpus: Corpus, checkpoint: dict | None) -> tuple[LanguageModel, dict]:
    """The teacher (eval mode, averaged weights when kept) and its payload; a CheckpointError when
    its vocabulary is not the corpus's."""
    if not path:
        raise ConfigError("distillation needs a teacher checkpoint (--teacher RUN)")
    model, vocab, payload = load_model(path, use_ema=True, checkpoint=checkpoint)
    vocab.check_same(corpus.vocab, name=f"teacher {path}", other_name=f"the data (corpus {corpus.name!r})",
                     hint="; a teacher can only be distilled on the vocabulary it was trained with")
    return model, payload
