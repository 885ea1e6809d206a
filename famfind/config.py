"""The configuration of a scan (:class:`ScanConfig`): everything a scan depends on, validated
when made and stored as JSON with the scan. The lowest module that needs it: the runner, the
Ray path and the detector API read it from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from famfind.errors import FamfindError
from famfind.validation import StrictNonNegativeInt, StrictPositiveInt, first_error


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid", arbitrary_types_allowed=False))
class ScanConfig:
    """Everything a scan depends on; stored as JSON in the ``scans`` table. Validated when
    made (pydantic): counts are positive integers (strict: ``"5"`` and ``5.0`` are refused),
    ``from_dict`` names the first bad key."""

    sae: tuple[str, ...] | str = ()  # SAE paths or folders of SAE folders (none: the embedded default's)
    hook: str | None = None  # blocks.L.attn.hook_z of SAEs whose format does not record it
    model: str | None = None
    # auto: famfind's own forward for GPT-2 checkpoints, TransformerBridge for other architectures
    model_backend: Literal["auto", "famfind", "bridge"] = "auto"
    corpus: str | None = None
    seq_len: StrictPositiveInt = 128  # the context length gelu-2l's attention SAEs were trained on
    max_tokens: StrictPositiveInt | None = None
    batch_size: StrictPositiveInt = 32
    top_k: StrictPositiveInt = 10
    n_samples: StrictNonNegativeInt = 20  # uniformly sampled firing positions per feature (activation quantiles)
    n_random: StrictNonNegativeInt = 256  # random corpus positions (non-activating contexts)
    shards: StrictPositiveInt = 1  # sequence ranges the pass is split into and merged (the unit of a distributed pass)
    select: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    plugins: tuple[str, ...] = ()
    proxies: tuple[str, ...] = ()  # local .py files of famfind.proxies.Proxy subclasses (beside the installed ones)
    strict_plugins: Annotated[bool, Field(strict=True)] = False
    detector_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: Annotated[int, Field(strict=True)] = 0
    device: Literal["cpu", "cuda", "auto"] | str = "cpu"  # "cuda:1" too; "auto": cuda when available
    autocast: Literal["none", "bf16", "fp16"] = "none"  # the pass's model forward in this precision (SAE encode fp32)
    ray: str | None = None  # "auto" or a Ray cluster address: the pass's shards run on Ray workers

    def __post_init__(self):
        if isinstance(self.sae, str):  # one path
            object.__setattr__(self, "sae", (self.sae,) if self.sae else ())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "scan config", prefix: str = "") -> "ScanConfig":
        """A config from ``{key: value}`` (a TOML ``[scan]`` table, plus CLI values); raises
        ``FamfindError(where, "<prefix><key>: <problem>")`` for an unknown key or a bad value."""
        if not isinstance(d, dict):
            raise FamfindError(where, f"{prefix}expected a table of keys, got {type(d).__name__}")
        d = {k: tuple(str(x) for x in v) if isinstance(v, list) and k != "detector_options" else v
             for k, v in d.items()}
        if isinstance(d.get("sae"), Path):
            d["sae"] = str(d["sae"])
        names = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise FamfindError(where, f"{prefix}unknown key {unknown[0]!r}; known: {', '.join(names)}")
        try:
            return cls(**d)
        except ValidationError as e:
            raise FamfindError(where, first_error(e, prefix)) from None
