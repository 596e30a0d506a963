"""The video-prediction model: patches → encoder conv → ConvLSTM stack → decoder conv → next frame.

    x_t (N, 1, H, W) ─ pixel_unshuffle(P) → (N, P², H/P, W/P) ─ conv 3×3, ReLU → (N, E, H/P, W/P)
        ─ ConvLSTM layers → h_t (N, C_last, H/P, W/P) ─ conv 1×1 → (N, P², H/P, W/P)
        ─ pixel_shuffle(P), sigmoid → x̂_{t+1} (N, 1, H, W)

The frames_in given frames run through the stack in one call (the ConvLSTM convolves their input
side at once); each later frame is predicted from the model's own previous prediction
(no teacher forcing: test and training see the same thing), the state carried.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from factorlm.nn.convlstm import ConvLSTM
from factorlm.video.config import VideoConfig

__all__ = ["VideoPredictor", "count_video_model", "format_counts"]


class VideoPredictor(nn.Module):
    def __init__(self, config: VideoConfig) -> None:
        super().__init__()
        self.config = config
        p2 = config.patch ** 2
        self.encoder = nn.Conv2d(p2, config.encoder_channels, 3, padding=1)
        self.rnn = ConvLSTM(config.encoder_channels, config.hidden_channels, config.kernel_size,
                            num_layers=len(config.hidden_channels), batch_first=True, gates=config.gates,
                            groups=config.groups, rank=config.rank, peephole=config.peephole)
        self.decoder = nn.Conv2d(config.hidden_channels[-1], p2, 1)
        with torch.no_grad():  # start from near-black frames, as most pixels are: not from sigmoid(0) = grey
            self.decoder.bias.fill_(-3.0)

    def _encode(self, frames: Tensor) -> Tensor:
        """(N, T, 1, H, W) -> (N, T, E, H/P, W/P)."""
        n, t = frames.shape[:2]
        z = F.pixel_unshuffle(frames.flatten(0, 1), self.config.patch)
        z = F.relu(self.encoder(z))
        return z.view(n, t, *z.shape[1:])

    def _decode(self, h: Tensor) -> Tensor:
        """(N, T, C, H/P, W/P) -> (N, T, 1, H, W) in (0, 1)."""
        n, t = h.shape[:2]
        y = F.pixel_shuffle(self.decoder(h.flatten(0, 1)), self.config.patch)
        return torch.sigmoid(y).view(n, t, *y.shape[1:])

    def forward(self, inputs: Tensor, frames_out: int | None = None) -> Tensor:
        """inputs (N, frames_in, 1, H, W) -> the next frames_out frames (N, frames_out, 1, H, W)."""
        frames_out = self.config.frames_out if frames_out is None else frames_out
        h, state = self.rnn(self._encode(inputs))
        frame = self._decode(h[:, -1:])
        predictions = [frame]
        for _ in range(frames_out - 1):
            h, state = self.rnn(self._encode(frame), state)
            frame = self._decode(h)
            predictions.append(frame)
        return torch.cat(predictions, dim=1)


def count_video_model(config: VideoConfig) -> dict:
    """Exact parameter counts (from the modules, built on the meta device) and multiply-adds per frame
    (ConvLSTM: :meth:`ConvLSTM.macs_per_frame`; the encoder's 3×3 and the decoder's 1×1 convolutions)
    of the model ``config`` describes, at its canvas."""
    with torch.device("meta"):
        model = VideoPredictor(config)
    side = config.canvas // config.patch
    pixels = side * side
    params = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("encoder", "rnn", "decoder")}
    macs = {"encoder": model.encoder.weight.numel() * pixels, "rnn": model.rnn.macs_per_frame(side, side),
            "decoder": model.decoder.weight.numel() * pixels}
    return {"convlstm_params": params["rnn"], "encoder_params": params["encoder"], "decoder_params": params["decoder"],
            "total_params": sum(params.values()),
            "convlstm_macs_per_frame": macs["rnn"], "encoder_macs_per_frame": macs["encoder"],
            "decoder_macs_per_frame": macs["decoder"], "total_macs_per_frame": sum(macs.values()),
            "grid": f"{side}x{side}"}


def format_counts(config: VideoConfig, counts: dict) -> str:
    """A Markdown table of count_video_model's counts."""
    kind = config.gates + (f" G={config.groups}" if config.groups else "") + (f" r={config.rank}" if config.rank else "")
    rows = [("ConvLSTM", counts["convlstm_params"], counts["convlstm_macs_per_frame"]),
            ("encoder 3×3", counts["encoder_params"], counts["encoder_macs_per_frame"]),
            ("decoder 1×1", counts["decoder_params"], counts["decoder_macs_per_frame"]),
            ("total", counts["total_params"], counts["total_macs_per_frame"])]
    lines = [f"model: ConvLSTM gates {kind}, hidden {list(config.hidden_channels)}, kernel {config.kernel_size}"
             f"{', peephole' if config.peephole else ''}, on a {counts['grid']} grid of {config.patch}×{config.patch} "
             f"patches", "", "| part | parameters | multiply-adds per frame |", "|---|---|---|"]
    lines += [f"| {name} | {p:,} | {m:,} |" for name, p, m in rows]
    return "\n".join(lines)
