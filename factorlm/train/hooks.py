"""What a Trainer runs around each optimizer step besides the step itself: ``StepHook``.

A hook acts on the weights (or their gradients, or the optimizer's state) at fixed points of
:meth:`factorlm.train.loop.Trainer.train_step`, and may keep state in every checkpoint under its
own key, so that a resumed run continues with it:

    fit starts                      hook.start(trainer)              (new and resumed runs alike)
    backward, gradient averaging
                                    hook.before_update(trainer)
    clipping, optimizer.step()
                                    hook.after_update(trainer, step) (step: 1-based, this one)
    EMA update
    checkpoint                      payload[hook.key] = hook.state_dict()

Pruning masks are the first (factorlm.compress.masks.MaskHook). This module imports nothing
from factorlm, so a hook's module need not import the training loop.
"""

from __future__ import annotations


class StepHook:
    """Base of the hooks a Trainer runs; every method is a no-op here."""

    #: the checkpoint entry holding :meth:`state_dict` (None: the hook keeps nothing there)
    key: str | None = None

    def start(self, trainer) -> None:
        """Before the first step of ``Trainer.fit`` (on a new run and on a resumed one)."""

    def before_update(self, trainer) -> None:
        """After backward and the gradient exchange, before clipping and the optimizer step."""

    def after_update(self, trainer, step: int) -> None:
        """After optimizer step ``step`` (counted from 1 over the whole run), before the EMA update."""

    def state_dict(self):
        """What the checkpoint keeps under :attr:`key` (plain data and tensors)."""
        return None
