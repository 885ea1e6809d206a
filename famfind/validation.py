"""Schemas (pydantic) of the files famfind reads, and one way to report a bad one.

Each schema states what a file must hold; :func:`validated` checks a parsed file against one
and turns the first violation into a :class:`~famfind.errors.FamfindError` naming the file,
the key and the problem on one line, e.g.
``scan.toml: [scan] batch_size: Input should be greater than 0 (got 0)``.

- :class:`ConfigFile`: a ``--config`` TOML file (``[scan]``, ``[detectors.<id>]``); its
  ``[scan]`` keys are typed by :class:`famfind.config.ScanConfig` itself.
- :class:`SAELensCfg`: a SAELens ``cfg.json`` (or a safetensors ``"cfg"`` metadata entry);
  :class:`KissaneCfg`: a Kissane et al. (2024) ``*_cfg.json``.
- :class:`GPT2Config`: a Hugging Face GPT-2 ``config.json`` (``n_embd`` a multiple of
  ``n_head``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from famfind.errors import FamfindError

M = TypeVar("M", bound=BaseModel)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
StrictPositiveInt = Annotated[int, Field(strict=True, gt=0)]
StrictNonNegativeInt = Annotated[int, Field(strict=True, ge=0)]


def first_error(e: ValidationError, prefix: str = "") -> str:
    """The first violation of ``e`` as ``<prefix><key path>: <message> (got <value>)``."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in err["loc"])
    got = err.get("input")
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    where = f"{prefix}{loc}: " if loc else prefix
    return f"{where}{err['msg']}" + ("" if err["type"] in ("missing", "extra_forbidden") else f" (got {shown})")


def validated(schema: type[M], data: Any, where, prefix: str = "") -> M:
    """``data`` checked against ``schema``; raises ``FamfindError(where, <first problem>)``."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise FamfindError(where, first_error(e, prefix)) from None


class ConfigFile(BaseModel):
    """A ``--config`` TOML file: a ``[scan]`` table (keys of ``ScanConfig``) and
    ``[detectors.<id>]`` tables (each detector's options)."""

    model_config = ConfigDict(extra="forbid")
    scan: dict[str, Any] = {}
    detectors: dict[str, dict[str, Any]] = {}


class SAELensMetadata(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())  # model_* fields: no warning on pydantic < 2.10
    hook_name: str | None = None
    model_name: str | None = None


class SAELensCfg(BaseModel):
    """The keys famfind reads from a SAELens ``cfg.json`` (any others are kept and ignored):
    SAELens >= 6 nests ``hook_name``/``model_name`` under ``metadata``; older ones have
    ``hook_name`` (or ``hook_point``) and ``model_name`` at top level."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())  # model_* fields: no warning on pydantic < 2.10
    d_in: PositiveInt | None = None
    d_sae: PositiveInt | None = None
    architecture: Literal["standard", "topk", "jumprelu"] = "standard"
    k: PositiveInt | None = None
    apply_b_dec_to_input: bool = True
    reshape_activations: Literal["hook_z", "none"] = "hook_z"
    hook_name: str | None = None
    hook_point: str | None = None
    model_name: str | None = None
    metadata: SAELensMetadata | None = None

    @property
    def hook(self) -> str | None:
        m = self.metadata
        return (m.hook_name if m else None) or self.hook_name or self.hook_point

    @property
    def model(self) -> str | None:
        return (self.metadata.model_name if self.metadata else None) or self.model_name


class KissaneCfg(BaseModel):
    """A Kissane et al. (2024) release ``*_cfg.json``."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())  # model_* fields: no warning on pydantic < 2.10
    act_size: PositiveInt
    dict_size: PositiveInt
    act_name: str
    layer: NonNegativeInt
    model_name: str | None = None


class GPT2Config(BaseModel):
    """The keys of a Hugging Face GPT-2 ``config.json`` the built-in runner uses."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())  # model_* fields: no warning on pydantic < 2.10
    model_type: str
    n_layer: PositiveInt
    n_head: PositiveInt
    n_embd: PositiveInt
    vocab_size: PositiveInt
    n_positions: PositiveInt
    layer_norm_epsilon: Annotated[float, Field(gt=0)] = 1e-5
    activation_function: Literal["gelu_new", "gelu", "relu", "gelu_pytorch_tanh"] = "gelu_new"

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        return self
