"""Attention-output SAEs: one in-memory form, one loader per on-disk format.

Formats (each loader names the file and the missing key or bad shape on error):

- SAELens directory: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens >= 6 layout,
  and the pre-6 flat layout with ``hook_name``/``hook_point`` at top level);
- a single ``.safetensors``: config in ``cfg.json`` beside it, or as JSON in the
  safetensors metadata under ``"cfg"``;
- Kissane et al. (2024) ``.pt`` state dict + ``*_cfg.json`` (``act_size``, ``dict_size``,
  ``act_name``, ``layer``, ``model_name``), read with ``torch.load(weights_only=True)``.

Encoding matches SAELens exactly: ``x - b_dec`` when ``apply_b_dec_to_input``, then
``relu(x W_enc + b_enc)`` (standard), ``TopK`` + ReLU (topk), or ReLU masked by
``pre > threshold`` (jumprelu).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from famfind.errors import FamfindError
from famfind.validation import KissaneCfg, SAELensCfg, validated

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
HOOK_Z_RE = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")


@dataclass
class SAE:
    """An SAE on an attention ``hook_z`` site (heads concatenated, ``d_in = n_heads*d_head``).

    Tensors: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``,
    ``b_dec [d_in]``, ``threshold [d_sae]`` (jumprelu only).
    """

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    hook_name: str
    architecture: str = "standard"
    apply_b_dec_to_input: bool = True
    k: int | None = None
    threshold: torch.Tensor | None = None
    model_name: str | None = None
    path: str = ""  # the weights file
    cfg: dict = field(default_factory=dict)
    cfg_path: str = ""  # the file the config (hook, architecture) was read from

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def layer(self) -> int:
        m = HOOK_Z_RE.match(self.hook_name)
        if not m:
            raise FamfindError(self.cfg_path or self.path, f"hook {self.hook_name!r} is not an attention hook_z site "
                               "(expected blocks.{L}.attn.hook_z)")
        return int(m.group(1))

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> "SAE":
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device=device, dtype=dtype))
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations, ``[..., d_in] -> [..., d_sae]`` (SAELens semantics)."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        shape = x.shape[:-1]
        pre = torch.addmm(self.b_enc, x.reshape(-1, x.shape[-1]), self.W_enc).view(*shape, -1)  # one fused op
        if self.architecture == "standard":
            return pre.relu_()
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        vals, idx = torch.topk(pre, k=self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction, ``[..., d_sae] -> [..., d_in]``."""
        return acts @ self.W_dec + self.b_dec

    def validate(self) -> None:
        """Check shapes, dtypes, finiteness, architecture and hook; raises ``FamfindError``
        naming ``path`` (a weight tensor with NaN or Inf entries is refused with its count)."""
        if self.W_enc.ndim != 2:
            raise FamfindError(self.path, f"W_enc has shape {list(self.W_enc.shape)}, expected [d_in, d_sae]")
        d_in, d_sae = self.W_enc.shape
        for name, shape in (("W_dec", (d_sae, d_in)), ("b_enc", (d_sae,)), ("b_dec", (d_in,))):
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise FamfindError(self.path, f"{name} has shape {list(got)}, expected {list(shape)} "
                                   f"from W_enc {[d_in, d_sae]}")
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is None:
                continue
            if not t.is_floating_point():
                raise FamfindError(self.path, f"{name} has dtype {t.dtype}, expected a floating-point tensor")
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise FamfindError(self.path, f"{name} has {bad} non-finite values (NaN or Inf) of {t.numel()}")
        if self.architecture == "topk" and self.k and self.k > d_sae:
            raise FamfindError(self.cfg_path or self.path, f"k={self.k} exceeds d_sae={d_sae}")
        if self.architecture not in ARCHITECTURES:
            raise FamfindError(self.cfg_path or self.path, f"unknown architecture {self.architecture!r}; "
                               f"known: {', '.join(ARCHITECTURES)}")
        if self.architecture == "topk" and not self.k:
            raise FamfindError(self.cfg_path or self.path, "topk SAE config has no 'k'")
        if self.architecture == "jumprelu" and (self.threshold is None or
                                                tuple(self.threshold.shape) != (d_sae,)):
            raise FamfindError(self.path, f"jumprelu SAE needs 'threshold' of shape [{d_sae}]")
        _ = self.layer


class SAELoader(Protocol):
    """One on-disk format: ``matches(path)`` says whether it applies, ``load`` reads it."""

    name: str

    def matches(self, path: Path) -> bool: ...

    def load(self, path: Path) -> SAE: ...


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FamfindError(path, "file not found") from None
    except json.JSONDecodeError as e:
        raise FamfindError(path, f"not valid JSON ({e.msg} at line {e.lineno})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except FileNotFoundError:
        raise FamfindError(path, "file not found") from None
    except (SafetensorError, OSError) as e:
        raise FamfindError(path, f"not a readable safetensors file ({e})") from None


def _need(d: dict, key: str, where: Path, what: str = "key"):
    if key not in d:
        raise FamfindError(where, f"missing {what} {key!r}")
    return d[key]


def _from_saelens(cfg, weights: dict[str, torch.Tensor], cfg_path: Path, w_path: Path) -> SAE:
    c = validated(SAELensCfg, cfg, cfg_path)
    if not c.hook:
        raise FamfindError(cfg_path, "missing key 'metadata.hook_name' (or 'hook_name')")
    if c.architecture == "jumprelu" and "threshold" not in weights and "log_threshold" in weights:
        weights["threshold"] = weights["log_threshold"].exp()
    sae = SAE(
        W_enc=_need(weights, "W_enc", w_path, "tensor"), W_dec=_need(weights, "W_dec", w_path, "tensor"),
        b_enc=_need(weights, "b_enc", w_path, "tensor"), b_dec=_need(weights, "b_dec", w_path, "tensor"),
        hook_name=c.hook, architecture=c.architecture, apply_b_dec_to_input=c.apply_b_dec_to_input,
        k=c.k, threshold=weights.get("threshold"), model_name=c.model, path=str(w_path), cfg=cfg,
        cfg_path=str(cfg_path),
    )
    for key, want in (("d_in", c.d_in), ("d_sae", c.d_sae)):
        got = getattr(sae, key) if sae.W_enc.ndim == 2 else None
        if want is not None and got is not None and got != want:
            raise FamfindError(w_path, f"W_enc has {key}={got} but {cfg_path.name} says {want}")
    return sae


class SAELensDirLoader:
    name = "saelens-dir"

    def matches(self, path: Path) -> bool:
        return path.is_dir()

    def load(self, path: Path) -> SAE:
        cfg = _read_json(path / SAELENS_CFG)
        weights, _ = _read_safetensors(path / SAELENS_WEIGHTS)
        return _from_saelens(cfg, weights, path / SAELENS_CFG, path / SAELENS_WEIGHTS)


class SafetensorsFileLoader:
    name = "safetensors"

    def matches(self, path: Path) -> bool:
        return path.suffix == ".safetensors"

    def load(self, path: Path) -> SAE:
        weights, meta = _read_safetensors(path)
        beside = path.parent / SAELENS_CFG
        if "cfg" in meta:
            try:
                cfg = json.loads(meta["cfg"])
            except json.JSONDecodeError:
                raise FamfindError(path, "metadata 'cfg' is not valid JSON") from None
            return _from_saelens(cfg, weights, path, path)
        if beside.exists():
            return _from_saelens(_read_json(beside), weights, beside, path)
        raise FamfindError(path, f"no SAE config: neither {SAELENS_CFG} beside it nor 'cfg' in its metadata")


class KissanePtLoader:
    """Kissane et al. (2024) release format: ``NAME.pt`` + ``NAME_cfg.json``."""

    name = "kissane-pt"

    def matches(self, path: Path) -> bool:
        return path.suffix == ".pt"

    def load(self, path: Path) -> SAE:
        cfg_path = path.with_name(path.stem + "_cfg.json")
        cfg = _read_json(cfg_path)
        c = validated(KissaneCfg, cfg, cfg_path)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FamfindError(path, "file not found") from None
        except Exception as e:  # torch raises several types for a bad/unsafe pickle
            raise FamfindError(path, f"not a loadable weights-only torch file ({type(e).__name__})") from None
        hook = c.act_name
        if not hook.startswith("blocks."):  # Kissane cfgs store the short TL name, e.g. "z"
            hook = f"blocks.{c.layer}.attn.hook_{hook.split('hook_')[-1]}"
        sae = SAE(W_enc=_need(sd, "W_enc", path, "tensor"), W_dec=_need(sd, "W_dec", path, "tensor"),
                  b_enc=_need(sd, "b_enc", path, "tensor"), b_dec=_need(sd, "b_dec", path, "tensor"),
                  hook_name=hook, model_name=c.model_name, path=str(path), cfg=cfg,
                  cfg_path=str(cfg_path))
        if sae.W_enc.ndim == 2 and (sae.d_in, sae.d_sae) != (c.act_size, c.dict_size):
            raise FamfindError(path, f"W_enc is {[sae.d_in, sae.d_sae]} but {cfg_path.name} says "
                               f"act_size={c.act_size}, dict_size={c.dict_size}")
        return sae


LOADERS: tuple[SAELoader, ...] = (SAELensDirLoader(), SafetensorsFileLoader(), KissanePtLoader())


def load_sae(path: str | Path) -> SAE:
    """Load and validate an attention SAE from any supported format.

    Raises ``FamfindError(path, problem)`` for a missing file, unknown format, missing key,
    bad shape, unknown architecture, or a hook that is not ``blocks.{L}.attn.hook_z``.
    """
    p = Path(path)
    if not p.exists():
        raise FamfindError(p, "file not found")
    for loader in LOADERS:
        if loader.matches(p):
            sae = loader.load(p)
            sae.validate()
            return sae
    raise FamfindError(p, "unknown SAE format; expected a SAELens directory, a .safetensors file, "
                       "or a Kissane-format .pt with its _cfg.json")


def sae_paths(path: str | Path) -> list[Path]:
    """The SAEs a path names: itself when a loader reads it, else (a folder of SAE folders or
    files, as a SAELens release lays out one folder per hook) each entry of the folder that is
    an SAE (a folder with ``cfg.json``, a ``.safetensors`` file, a ``.pt`` with its
    ``_cfg.json``), sorted by name. Raises ``FamfindError`` naming the path when it does not
    exist or holds no SAE."""
    p = Path(path)
    if not p.exists():
        raise FamfindError(p, "file not found")
    if not p.is_dir() or (p / SAELENS_CFG).exists():
        return [p]
    found = sorted(q for q in p.iterdir()
                   if (q.is_dir() and (q / SAELENS_CFG).exists()) or q.suffix == ".safetensors"
                   or (q.suffix == ".pt" and q.with_name(q.stem + "_cfg.json").exists()))
    if not found:
        raise FamfindError(p, f"no SAE here: neither {SAELENS_CFG} nor a folder of SAE folders")
    return found


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files in sorted order (hex digest)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
