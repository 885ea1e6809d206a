"""Models famfind scans, one backend per module, chosen by :func:`load_model`:
:mod:`famfind.models.gpt2` (famfind's own GPT-2 forward), :mod:`famfind.models.bridge`
(TransformerLens's ``TransformerBridge``: every other architecture) and
:mod:`famfind.models.transformer_lens` (a ``HookedTransformer`` for a TransformerLens model
name). What detectors may use of any of them: :class:`famfind.models.base.AttnModel`.
"""

from __future__ import annotations

import json
from pathlib import Path

from famfind.errors import FamfindError, reading
from famfind.models.base import AttnModel
from famfind.models.bridge import BridgeModel, bridge_class
from famfind.models.gpt2 import HFGPT2Model
from famfind.models.transformer_lens import TLModel

BACKENDS = ("auto", "famfind", "bridge")


def load_model(spec: str | Path, device: str = "cpu", backend: str = "auto") -> AttnModel:
    """A local Hugging Face checkpoint directory, else a TransformerLens model name.

    ``backend``: ``"auto"`` runs a GPT-2 checkpoint through famfind's own forward
    (:class:`HFGPT2Model`, the fast path) and any other architecture through
    TransformerLens's ``TransformerBridge`` (:class:`BridgeModel`); ``"famfind"`` and
    ``"bridge"`` force one. A name that is not a folder goes to ``HookedTransformer`` (TL 3.x,
    needs the hub) or, where that is gone (TL 4), ``TransformerBridge.boot_transformers``.
    Raises ``FamfindError`` when none works (names the path/name and the reason).
    """
    p = Path(spec)
    if backend not in BACKENDS:
        raise FamfindError(p, f"unknown model backend {backend!r}; use {', '.join(BACKENDS)}")
    if p.is_dir():
        with reading(p, "it as a model checkpoint"):
            if backend == "bridge" or (backend == "auto" and _model_type(p) not in (None, "gpt2")):
                return BridgeModel(p, device)
            return HFGPT2Model(p, device)
    if p.exists():
        raise FamfindError(p, "a model must be a checkpoint directory or a TransformerLens model name")
    try:
        from transformer_lens import HookedTransformer  # noqa: F401  (TL 4 removed it: ImportError)
        has_hooked = True
    except ImportError:
        has_hooked = False
    if backend == "bridge" or (not has_hooked and bridge_class() is not None):
        return BridgeModel(str(spec), device)
    return TLModel(str(spec), device)


def _model_type(p: Path) -> str | None:
    """``model_type`` of a checkpoint folder's ``config.json`` (``None`` when unreadable: the
    GPT-2 runner then reports the problem)."""
    try:
        raw = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return raw.get("model_type") if isinstance(raw, dict) else None
