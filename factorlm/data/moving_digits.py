"""Moving digits: an offline video-prediction task (Srivastava et al. 2015's Moving MNIST, without a download).

Sprites are scikit-learn's 8×8 UCI handwritten digits (``sklearn.datasets.load_digits``, 1,797 images
shipped inside the wheel; the optional extra ``factorlm[vision]``), upscaled bilinearly to
``digit_size`` pixels. Each sequence moves ``num_digits`` of them over a ``canvas`` × ``canvas`` frame
in straight lines, bouncing off the borders, for ``frames_in + frames_out`` frames (overlaps: the
brighter pixel). Values in [0, 1], frames (T, 1, H, W).

Without scikit-learn, ``source="shapes"`` (and ``"auto"``, saying so in one warning line) draws a
bank of procedural sprites instead (filled and hollow squares, discs, rings, crosses, triangles at
seeded sizes): the same task with nothing to install.

Determinism and splits: the sprite bank is split once, by a permutation seeded with ``seed``, into
train / valid / test (80 / 10 / 10 %): no sprite appears in two splits. Sequence ``index`` of a split
is a pure function of (seed, split, index): the same on every machine and call, so a training run
needs no data position beyond its step to resume.

    data = MovingDigits("train", canvas=64, seed=0)
    frames = data.batch(range(16))           # (16, 20, 1, 64, 64) float32
    inputs, targets = frames[:, :10], frames[:, 10:]
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from factorlm.validate import check_int

__all__ = ["MovingDigits", "SOURCES", "SPLITS", "sprite_bank", "have_digits"]

SOURCES = ("auto", "digits", "shapes")
SPLITS = ("train", "valid", "test")
_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
#: procedural sprites in the fallback bank (enough that every split holds many)
_SHAPES_BANK = 600


def have_digits() -> bool:
    """Whether scikit-learn (and so the digits) can be imported."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_source(source: str) -> str:
    """"digits" or "shapes" for a requested source; "auto" picks digits when scikit-learn is there
    (else shapes, with a one-line warning). "digits" without scikit-learn is a one-line error."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "auto":
        if have_digits():
            return "digits"
        warnings.warn("scikit-learn is not installed: moving shapes instead of moving digits "
                      "(pip install 'factorlm[vision]' for the digits)", stacklevel=2)
        return "shapes"
    if source == "digits" and not have_digits():
        raise ValueError("the moving digits need scikit-learn (pip install 'factorlm[vision]'); "
                         "or use the source 'shapes', which needs nothing")
    return source


@functools.lru_cache(maxsize=8)  # the three splits of a run share one bank (loading the digits takes a second)
def sprite_bank(source: str, digit_size: int, seed: int = 0) -> Tensor:
    """Every sprite of ``source`` ("digits" / "shapes"), (M, digit_size, digit_size) float32 in [0, 1]
    (cached: do not modify it in place)."""
    if source == "digits":
        from sklearn.datasets import load_digits

        images = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)  # (1797, 8, 8), 0..16
    else:
        images = _shapes(_SHAPES_BANK, 16, seed)
    sprites = F.interpolate(images[:, None], size=(digit_size, digit_size), mode="bilinear", align_corners=False)
    return sprites[:, 0].clamp_(0.0, 1.0)


def _shapes(count: int, size: int, seed: int) -> Tensor:
    """``count`` procedural sprites (size × size): a kind, an extent and a stroke width each, seeded."""
    rng = np.random.default_rng([seed, 7919])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    out = np.zeros((count, size, size), np.float32)
    for m in range(count):
        kind = m % 6
        r = rng.uniform(0.25, 0.48) * size
        w = rng.uniform(0.08, 0.2) * size
        cy, cx = size / 2 + rng.uniform(-1, 1), size / 2 + rng.uniform(-1, 1)
        dy, dx = yy - cy, xx - cx
        dist = np.hypot(dy, dx)
        box = np.maximum(abs(dy), abs(dx))
        if kind == 0:
            img = box <= r
        elif kind == 1:
            img = (box <= r) & (box >= r - w)
        elif kind == 2:
            img = dist <= r
        elif kind == 3:
            img = (dist <= r) & (dist >= r - w)
        elif kind == 4:
            img = ((abs(dy) <= w / 2) | (abs(dx) <= w / 2)) & (box <= r)
        else:
            img = (dy <= r / 2) & (abs(dx) <= (dy + r) / 1.5)
            img &= dy >= -r
        out[m] = img * rng.uniform(0.6, 1.0)
    return torch.from_numpy(out)


class MovingDigits:
    """One split of the moving-digits task (module docstring).

    split: "train", "valid" or "test"; canvas: frame side (≥ digit_size + 2); digit_size: sprite side
    (default: 24 on a 64 canvas, scaled with the canvas); source: "auto" / "digits" / "shapes";
    speed: pixels per frame (each sequence's sprites get speeds uniform in [speed/2, speed]).
    """

    def __init__(self, split: str, *, canvas: int = 64, digit_size: int | None = None, frames_in: int = 10,
                 frames_out: int = 10, num_digits: int = 2, source: str = "auto", seed: int = 0,
                 speed: float | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.canvas = check_int("canvas", canvas, 4)
        self.digit_size = check_int("digit_size", digit_size if digit_size is not None else
                                    max(3, round(24 * self.canvas / 64)), 2)
        if self.digit_size > self.canvas - 2:
            raise ValueError(f"digit_size {self.digit_size} does not fit a {self.canvas}×{self.canvas} canvas "
                             f"with room to move; use at most {self.canvas - 2}")
        self.frames_in = check_int("frames_in", frames_in)
        self.frames_out = check_int("frames_out", frames_out)
        self.num_digits = check_int("num_digits", num_digits)
        self.seed = check_int("seed", seed, 0)
        self.speed = float(speed) if speed is not None else max(1.0, 3.0 * self.canvas / 64)
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise ValueError(f"speed must be a finite number > 0, got {speed!r}")
        self.split = split
        self.source = resolve_source(source)
        bank = sprite_bank(self.source, self.digit_size, self.seed)
        self.sprites = bank[split_indices(len(bank), self.seed)[split]]

    @property
    def num_frames(self) -> int:
        return self.frames_in + self.frames_out

    def sequence(self, index: int) -> Tensor:
        """Sequence ``index`` (any int ≥ 0): (frames_in + frames_out, 1, canvas, canvas) float32."""
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), check_int("index", index, 0)])
        room = self.canvas - self.digit_size
        frames = torch.zeros(self.num_frames, 1, self.canvas, self.canvas)
        for _ in range(self.num_digits):
            sprite = self.sprites[int(rng.integers(len(self.sprites)))]
            pos = rng.uniform(0, room, size=2)
            angle = rng.uniform(0, 2 * math.pi)
            vel = rng.uniform(self.speed / 2, self.speed) * np.array([math.sin(angle), math.cos(angle)])
            for t in range(self.num_frames):
                y, x = (min(room, max(0, int(round(v)))) for v in pos)
                window = frames[t, 0, y:y + self.digit_size, x:x + self.digit_size]
                torch.maximum(window, sprite, out=window)
                pos = pos + vel
                for axis in range(2):  # bounce: reflect the position and the velocity at a border
                    if pos[axis] < 0:
                        pos[axis], vel[axis] = -pos[axis], -vel[axis]
                    elif pos[axis] > room:
                        pos[axis], vel[axis] = 2 * room - pos[axis], -vel[axis]
        return frames

    def batch(self, indices) -> Tensor:
        """Sequences ``indices`` stacked: (N, frames_in + frames_out, 1, canvas, canvas)."""
        return torch.stack([self.sequence(int(i)) for i in indices])


def split_indices(count: int, seed: int) -> dict[str, np.ndarray]:
    """{split: the bank indices it owns}: a seeded permutation cut 80 / 10 / 10 (disjoint, covering all)."""
    order = np.random.default_rng([seed, 104729]).permutation(count)
    n_train = int(round(_SPLIT_FRACTIONS[0] * count))
    n_valid = int(round(_SPLIT_FRACTIONS[1] * count))
    return {"train": np.sort(order[:n_train]), "valid": np.sort(order[n_train:n_train + n_valid]),
            "test": np.sort(order[n_train + n_valid:])}
