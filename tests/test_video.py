"""Moving digits (determinism, disjoint splits, the shapes fallback), SSIM on hand-computable cases, and
``factorlm video`` end to end: train, resume (equal to an uninterrupted run), metrics, strip, errors."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from factorlm.cli import main
from factorlm.data import moving_digits
from factorlm.data.moving_digits import MovingDigits, split_indices, sprite_bank
from factorlm.video.metrics import FrameMetrics, gaussian_window, ssim

TINY = ["--canvas", "8", "--patch", "2", "--encoder-channels", "2", "--hidden-channels", "2", "--kernel-size", "3",
        "--frames-in", "3", "--frames-out", "2", "--batch-size", "2", "--valid-sequences", "2",
        "--test-sequences", "3", "--source", "shapes", "--log-every", "1", "--quiet"]


# ------------------------------------------------------------------- data
def test_sequences_are_a_pure_function_of_seed_split_and_index():
    a = MovingDigits("train", canvas=16, source="shapes", seed=3)
    b = MovingDigits("train", canvas=16, source="shapes", seed=3)
    torch.testing.assert_close(a.batch([0, 5]), b.batch([0, 5]))
    assert not torch.equal(a.sequence(0), a.sequence(1))
    assert not torch.equal(a.sequence(0), MovingDigits("train", canvas=16, source="shapes", seed=4).sequence(0))
    frames = a.sequence(7)
    assert frames.shape == (20, 1, 16, 16) and frames.min() >= 0 and frames.max() <= 1
    # the sprites stay whole on the canvas (bouncing, never clipped): each frame holds the same mass
    mass = frames.sum(dim=(1, 2, 3))
    one_sprite = MovingDigits("train", canvas=16, source="shapes", seed=3, num_digits=1).sequence(7).sum(dim=(1, 2, 3))
    torch.testing.assert_close(one_sprite, one_sprite[:1].expand(20))
    assert (mass > 0).all()


def test_splits_are_disjoint_in_sprite_images():
    parts = split_indices(1797, seed=0)
    together = np.concatenate(list(parts.values()))
    assert len(together) == len(set(together.tolist())) == 1797
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [1438, 180, 179]
    pytest.importorskip("sklearn")
    bank = sprite_bank("digits", 6, 0)
    train = MovingDigits("train", canvas=16, digit_size=6, source="digits")
    test = MovingDigits("test", canvas=16, digit_size=6, source="digits")
    assert len(train.sprites) + len(test.sprites) + len(MovingDigits("valid", canvas=16, digit_size=6,
                                                                     source="digits").sprites) == len(bank)
    # no test image equals a train image (the UCI set holds no exact duplicates at this size)
    distances = torch.cdist(test.sprites.flatten(1), train.sprites.flatten(1))
    assert distances.min() > 0


def test_without_scikit_learn_auto_falls_back_to_shapes_in_one_warning(monkeypatch):
    monkeypatch.setattr(moving_digits, "have_digits", lambda: False)
    with pytest.warns(UserWarning, match=r"scikit-learn is not installed: moving shapes instead of moving digits"):
        data = MovingDigits("valid", canvas=16, source="auto")
    assert data.source == "shapes"
    with pytest.raises(ValueError, match=r"the moving digits need scikit-learn \(pip install 'factorlm\[vision\]'\)"):
        MovingDigits("valid", canvas=16, source="digits")
    with pytest.raises(ValueError, match="digit_size 15 does not fit a 16×16 canvas with room to move; use at most 14"):
        MovingDigits("valid", canvas=16, digit_size=15, source="shapes")


# ------------------------------------------------------------------ SSIM
def test_ssim_of_identical_images_is_one_and_of_constants_is_the_luminance_term():
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    a, b = 0.2, 0.7  # constant images: no variance, SSIM = (2ab + C1) / (a² + b² + C1)
    c1 = 0.01 ** 2
    got = ssim(torch.full((1, 1, 11, 11), a, dtype=torch.float64), torch.full((1, 1, 11, 11), b, dtype=torch.float64))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)


def test_ssim_with_one_window_position_is_the_formula_with_gaussian_weights():
    torch.manual_seed(5)
    x, y = torch.rand(2, 1, 1, 7, 7, dtype=torch.float64)
    g = gaussian_window(7, 1.5)
    assert g.sum().item() == pytest.approx(1.0) and torch.equal(g, g.flip(0))
    assert g[2].item() / g[3].item() == pytest.approx(math.exp(-1 / (2 * 1.5 ** 2)))
    w = torch.outer(g, g)  # one 7×7 window over the 7×7 image: weighted statistics, by hand
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cov = (w * (x - mx) * (y - my)).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    want = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert ssim(x, y, window=7).item() == pytest.approx(want.item(), rel=1e-10)
    with pytest.raises(ValueError, match="the SSIM window must be odd"):
        gaussian_window(6, 1.5)
    with pytest.raises(ValueError, match="images of 7×7 are smaller than the SSIM window 11"):
        ssim(x, y)


def test_frame_metrics_are_per_frame_means():
    truth = torch.rand(3, 2, 1, 8, 8, dtype=torch.float64)
    pred = truth.clone()
    pred[:, 1] += 0.1
    m = FrameMetrics()
    m.add(pred[:2], truth[:2])
    m.add(pred[2:], truth[2:])
    r = m.result()
    assert r["sequences"] == 3
    assert r["mse"] == pytest.approx([0.0, 0.01]) and r["mae"] == pytest.approx([0.0, 0.1])
    assert r["ssim"][0] == pytest.approx(1.0) and r["ssim"][1] < 1.0
    assert r["mse_mean"] == pytest.approx(0.005)


# ------------------------------------------------------------- end to end
def _weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def test_video_trains_resumes_exactly_and_reports(tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["video", "--out", str(whole), "--max-steps", "3", *TINY]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "test (3 sequences): MSE" in out and "| 5 |" in out
    results = json.loads((whole / "results.json").read_text())
    assert len(results["test"]["ssim"]) == 2 and results["counts"]["total_params"] > 0
    assert (whole / "strip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["video", "--out", str(split), "--max-steps", "1", *TINY]) == 0
    assert main(["video", "--out", str(split), "--resume", "--max-steps", "3", "--quiet"]) == 0
    a, b = _weights(whole), _weights(split)
    assert b["step"] == 3 and b["format"] == "factorlm-video-checkpoint"
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0)
    records = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    capsys.readouterr()
    assert main(["video", "--out", str(split), "--resume", "--max-steps", "4", "--gates", "separable"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("factorlm video: error: a resumed run continues the saved one unchanged, but the command "
                          "line asks for gates='separable' (saved: 'dense')") and "\n" not in err
    assert main(["video", "--out", str(split), "--max-steps", "1", *TINY]) == 2
    assert "checkpoint.pt exists: pass --resume to continue that run" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(split)]) == 2  # the LM tools refuse it in one line
    assert "is a 'factorlm-video-checkpoint' file, not a 'factorlm-checkpoint' one" in capsys.readouterr().err


def test_video_count_and_one_line_errors(tmp_path, capsys):
    assert main(["video", "--count", "--gates", "grouped", "--groups", "4"]) == 0
    out = capsys.readouterr().out
    # hidden 32, 32, k 5 on 16×16 patches of 4×4, encoder 16: layer 0 C = 48, layer 1 C = 64, G = 4
    rnn = 128 * 48 * 25 // 4 + 128 + 128 * 64 * 25 // 4 + 128
    assert f"| ConvLSTM | {rnn:,} | {(rnn - 256) * 256:,} |" in out
    cases = [
        (["video", "--out", str(tmp_path / "r"), "--max-steps", "1", "--kernel-size", "4"],
         "kernel_size must be odd (padding k // 2 keeps the image size only for odd k), got 4"),
        (["video", "--out", str(tmp_path / "r")], "no training budget: give --max-steps N or --max-time SECONDS"),
        (["video", "--out", str(tmp_path / "r"), "--max-steps", "1", "--canvas", "10"],
         "canvas 10 must be a multiple of patch 4"),
        (["video", "--out", str(tmp_path / "r"), "--max-steps", "1", "--rank", "4"],
         "rank=4 applies to gates='bottleneck' only, not gates='dense'"),
        (["video", "--out", str(tmp_path / "r"), "--max-steps", "1", "--canvas", "8", "--patch", "2", "--digit-size", "7"],
         "digit_size 7 does not fit a 8×8 canvas with room to move; use at most 6"),
        (["video", "--max-steps", "1"], "--out must name the run directory, got None"),
        (["video", "--out", str(tmp_path / "none"), "--resume", "--max-steps", "1"], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "r").exists()  # nothing was made for a run that could not start


def test_warnings_are_not_raised_by_a_tiny_model():
    from factorlm.video.config import VideoConfig
    from factorlm.video.model import VideoPredictor

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = VideoPredictor(VideoConfig(canvas=8, patch=2, hidden_channels=(2,), kernel_size=3, frames_out=3))
    assert model(torch.rand(1, 2, 1, 8, 8)).shape == (1, 3, 1, 8, 8)
