"""What ModelConfig and TrainConfig share: ``replace``, ``to_dict`` and a strict ``from_dict``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping, TypeVar

from factorlm.errors import ConfigError

C = TypeVar("C", bound="ConfigBase")


class ConfigBase:
    """Base of the frozen config dataclasses. A subclass sets ``kind`` ("model", "train"): the
    section of a config file it is read from, and the word its errors use."""

    kind: ClassVar[str] = "config"

    def replace(self: C, **changes) -> C:
        """A copy with ``changes`` applied (and checked, as a new config is)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain data for checkpoints and JSON: every field, nested values copied."""
        return dataclasses.asdict(self)

    @classmethod
    def accepted_keys(cls) -> set[str]:
        """The keys ``from_dict`` accepts: the field names."""
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[C], data: Mapping) -> C:
        """The config a checkpoint's or a JSON file's dict describes; ConfigError on unknown keys.

        Lists become tuples, also inside nested mappings (JSON has no tuples; per-layer values are
        tuples). Missing keys keep their defaults.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a {cls.kind} config must be a mapping of settings (a JSON object), "
                              f"got {type(data).__name__} {data!r}")
        known = cls.accepted_keys()
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.kind} config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{key: _tuples(value) for key, value in data.items()})


def _tuples(value):
    """Lists -> tuples, recursively, also inside dicts."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value
