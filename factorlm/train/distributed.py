"""Process-group facts for the training loop: which rank this is, and whether it is the main one.

The loop is written for torchrun (data sharded by rank, I/O on rank 0 only); running several
processes arrives with the multi-GPU issue, so for now more than one process is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "ProcessInfo":
        info = cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
        if info.world_size > 1:
            raise NotImplementedError(
                f"WORLD_SIZE={info.world_size}: multi-process (torchrun) training is not supported yet; "
                f"run one process"
            )
        return info
