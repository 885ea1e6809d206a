"""Attention-output SAEs: one in-memory form, one loader per on-disk format.

Formats (each loader names the file and the missing key or bad shape on error):

- SAELens directory: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens >= 6 layout,
  and the pre-6 flat layout with ``hook_name``/``hook_point`` at top level);
- a single ``.safetensors``: config in ``cfg.json`` beside it, or as JSON in the
  safetensors metadata under ``"cfg"``;
- Kissane et al. (2024) ``.pt`` state dict + ``*_cfg.json`` (``act_size``, ``dict_size``,
  ``act_name``, ``layer``, ``model_name``), read with ``torch.load(weights_only=True)``;
- Gemma Scope native ``params.npz`` (JumpReLU), ``dictionary_learning`` ``ae.pt`` state
  dicts (AutoEncoder, AutoEncoderTopK, JumpReluAutoEncoder) and EleutherAI ``sparsify``
  folders (``cfg.json`` + ``sae.safetensors``, TopK): these do not record their hook, which
  ``load_sae(path, hook=...)`` (``--hook``) supplies.

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

from famfind.errors import FamfindError, first_line, reading
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

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Activations of ``features`` only, ``[..., d_in] -> [..., len(features)]``, equal to
        ``encode(x)[..., features]``. ReLU and JumpReLU features are independent, so only their
        encoder columns are used (``O(len(features))`` instead of ``O(d_sae)`` per position);
        TopK needs every pre-activation and encodes in full."""
        if self.architecture == "topk":
            return self.encode(x)[..., features]
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc[:, features] + self.b_enc[features]
        if self.architecture == "standard":
            return pre.relu_()
        return torch.relu(pre) * (pre > self.threshold[features])

    def encode_pairs(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Activation of ``features[i]`` on row ``x[i]``: ``x [n, d_in]``, ``features [n]`` ->
        ``[n]``, equal to ``encode(x)[arange(n), features]`` (one encoder column per row for
        ReLU and JumpReLU; TopK encodes each row in full)."""
        if self.architecture == "topk":
            return self.encode(x).gather(-1, features[:, None])[:, 0]
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = (x * self.W_enc[:, features].T).sum(-1) + self.b_enc[features]
        if self.architecture == "standard":
            return pre.relu_()
        return torch.relu(pre) * (pre > self.threshold[features])

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
        return path.suffix == ".pt" and path.with_name(path.stem + "_cfg.json").exists()

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


NO_HOOK = "<none>"  # hook_name of a format that does not record its hook, until --hook sets it


def _check_hook(hook: str, where) -> str:
    if not HOOK_Z_RE.match(hook):
        raise FamfindError(where, f"{hook!r} is not an attention hook_z hook (expected blocks.L.attn.hook_z)")
    return hook


class GemmaScopeNpzLoader:
    """Gemma Scope's native release file (Lieberum et al. 2024): ``params.npz`` with ``W_enc
    [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``; JumpReLU,
    encoded as ``relu(pre) * (pre > threshold)`` with ``pre = x W_enc + b_enc`` (no ``b_dec``
    subtracted from the input). The hook is not recorded: ``--hook``."""

    name = "gemma-scope-npz"

    def matches(self, path: Path) -> bool:
        return path.suffix == ".npz" or (path.is_dir() and (path / "params.npz").exists())

    def load(self, path: Path) -> SAE:
        import numpy as np

        path = path / "params.npz" if path.is_dir() else path
        try:
            with np.load(path) as z:
                w = {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        except (OSError, ValueError) as e:
            raise FamfindError(path, f"not a readable .npz file ({first_line(e, 120)})") from None
        return SAE(W_enc=_need(w, "W_enc", path, "array"), W_dec=_need(w, "W_dec", path, "array"),
                   b_enc=_need(w, "b_enc", path, "array"), b_dec=_need(w, "b_dec", path, "array"),
                   threshold=_need(w, "threshold", path, "array"), architecture="jumprelu",
                   apply_b_dec_to_input=False, hook_name=NO_HOOK, path=str(path), cfg_path=str(path),
                   cfg={"format": self.name})


class DictionaryLearningLoader:
    """``dictionary_learning`` (Marks et al.) state dicts, ``ae.pt`` (read with
    ``torch.load(weights_only=True)``), with its ``config.json`` beside it when there:
    ``AutoEncoder`` (``encoder``/``decoder`` Linear weights, ``encoder.bias``, ``bias`` =
    b_dec; ``relu(encoder(x - bias))``), ``AutoEncoderTopK`` (``encoder``/``decoder`` Linear,
    ``b_dec``, buffer ``k``; top-k of ``relu(encoder(x - b_dec))``) and
    ``JumpReluAutoEncoder`` (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``;
    ``relu(pre) * (pre > threshold)``, ``pre = x W_enc + b_enc``: its
    ``apply_b_dec_to_input`` defaults to False and is not saved). The hook is
    not recorded (``submodule_name`` names a module, not a hook_z site): ``--hook``."""

    name = "dictionary-learning-pt"

    def matches(self, path: Path) -> bool:
        return (path.suffix == ".pt" and not path.with_name(path.stem + "_cfg.json").exists()) or \
            (path.is_dir() and (path / "ae.pt").exists())

    def load(self, path: Path) -> SAE:
        path = path / "ae.pt" if path.is_dir() else path
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a bad/unsafe pickle
            raise FamfindError(path, f"not a loadable weights-only torch file ({type(e).__name__})") from None
        if not isinstance(sd, dict):
            raise FamfindError(path, f"holds a {type(sd).__name__}, not a state dict")
        beside = path.parent / "config.json"
        cfg = _read_json(beside) if beside.exists() else {}
        trainer = cfg.get("trainer", {}) if isinstance(cfg.get("trainer"), dict) else {}
        common = dict(hook_name=NO_HOOK, path=str(path), cfg_path=str(beside if beside.exists() else path),
                      cfg={"format": self.name, **cfg}, model_name=trainer.get("lm_name"))
        sd = dict(sd)
        if "W_enc" in sd and "threshold" not in sd:  # W_enc/W_dec/b_enc/b_dec: Kissane's names, not JumpRelu's
            raise FamfindError(path, f"holds W_enc, W_dec, b_enc, b_dec like a Kissane-format SAE, but its config "
                               f"{path.stem}_cfg.json is missing beside it (and it is not a dictionary_learning "
                               "JumpReluAutoEncoder: no 'threshold')")
        if "W_enc" in sd:  # JumpReluAutoEncoder
            return SAE(W_enc=sd["W_enc"], W_dec=_need(sd, "W_dec", path, "tensor"),
                       b_enc=_need(sd, "b_enc", path, "tensor"), b_dec=_need(sd, "b_dec", path, "tensor"),
                       threshold=_need(sd, "threshold", path, "tensor"), architecture="jumprelu",
                       apply_b_dec_to_input=False, **common)  # the class's default
        if "encoder.weight" not in sd:
            raise FamfindError(path, "not a dictionary_learning state dict (no 'encoder.weight' or 'W_enc'), and "
                               f"no Kissane {path.stem}_cfg.json beside it")
        enc, dec = sd["encoder.weight"], _need(sd, "decoder.weight", path, "tensor")
        b_enc = _need(sd, "encoder.bias", path, "tensor")
        if "k" in sd:  # AutoEncoderTopK
            return SAE(W_enc=enc.T.contiguous(), W_dec=dec.T.contiguous(), b_enc=b_enc,
                       b_dec=_need(sd, "b_dec", path, "tensor"), architecture="topk", k=int(sd["k"]), **common)
        return SAE(W_enc=enc.T.contiguous(), W_dec=dec.T.contiguous(), b_enc=b_enc,
                   b_dec=_need(sd, "bias", path, "tensor"), **common)


class SparsifyLoader:
    """EleutherAI ``sparsify`` folders: ``cfg.json`` (``k``, ``num_latents``, ...) +
    ``sae.safetensors`` (``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae,
    d_in]``, ``b_dec``); TopK: top-k of ``relu(encoder(x - b_dec))``. The folder's name is a
    Hugging Face module path, not a hook_z site: ``--hook``."""

    name = "sparsify"

    def matches(self, path: Path) -> bool:
        return path.is_dir() and (path / "sae.safetensors").exists() and (path / SAELENS_CFG).exists()

    def load(self, path: Path) -> SAE:
        cfg = _read_json(path / SAELENS_CFG)
        w, _ = _read_safetensors(path / "sae.safetensors")
        k = cfg.get("k")
        if not isinstance(k, int) or k < 1:
            raise FamfindError(path / SAELENS_CFG, f"'k' must be a positive integer, got {k!r}")
        if cfg.get("multi_topk") or cfg.get("skip_connection") or cfg.get("transcode"):
            raise FamfindError(path / SAELENS_CFG, "multi_topk, skip_connection and transcoder SAEs are not "
                               "attention-output SAEs famfind reads")
        enc = _need(w, "encoder.weight", path / "sae.safetensors", "tensor")
        return SAE(W_enc=enc.T.contiguous(), W_dec=_need(w, "W_dec", path / "sae.safetensors", "tensor"),
                   b_enc=_need(w, "encoder.bias", path / "sae.safetensors", "tensor"),
                   b_dec=_need(w, "b_dec", path / "sae.safetensors", "tensor"), architecture="topk", k=k,
                   hook_name=NO_HOOK, path=str(path / "sae.safetensors"), cfg_path=str(path / SAELENS_CFG),
                   cfg={"format": self.name, **cfg})


LOADERS: tuple[SAELoader, ...] = (SparsifyLoader(), DictionaryLearningLoader(), GemmaScopeNpzLoader(),
                                  SAELensDirLoader(), SafetensorsFileLoader(), KissanePtLoader())


def detect_format(path: str | Path) -> str:
    """The name of the loader that reads ``path`` (see :data:`LOADERS`); ``FamfindError``
    naming the path when none does."""
    p = Path(path)
    if not p.exists():
        raise FamfindError(p, "file not found")
    for loader in LOADERS:
        if loader.matches(p):
            return loader.name
    raise FamfindError(p, "unknown SAE format; expected a SAELens or sparsify directory, a .safetensors file, a "
                       "Kissane-format .pt with its _cfg.json, a dictionary_learning ae.pt or a Gemma Scope params.npz")


def load_sae(path: str | Path, hook: str | None = None) -> SAE:
    """Load and validate an attention SAE from any supported format (:data:`LOADERS`).

    ``hook`` (``blocks.L.attn.hook_z``) is the hook of a format that does not record one
    (Gemma Scope ``params.npz``, dictionary_learning ``ae.pt``, sparsify); for one that does
    it must agree. Raises ``FamfindError(path, problem)`` for a missing file, unknown format,
    missing key, bad shape, unknown architecture, a hook that is not
    ``blocks.{L}.attn.hook_z``, a missing ``hook``, or a ``hook`` that contradicts the file.
    """
    p = Path(path)
    name = detect_format(p)
    with reading(p, f"it as a {name} SAE"):
        sae = next(ld for ld in LOADERS if ld.name == name).load(p)
    if hook is not None:
        _check_hook(hook, "--hook")
        if sae.hook_name == NO_HOOK:
            sae.hook_name = hook
        elif sae.hook_name != hook:
            raise FamfindError(sae.cfg_path or p, f"records hook {sae.hook_name!r} but --hook says {hook!r}")
    if sae.hook_name == NO_HOOK:
        raise FamfindError(p, f"a {name} SAE does not record its hook: pass --hook blocks.L.attn.hook_z")
    sae.validate()
    return sae


def sae_paths(path: str | Path) -> list[Path]:
    """The SAEs a path names: itself when a loader reads it, else (a folder of SAE folders or
    files, as a SAELens release lays out one folder per hook) each entry of the folder that is
    an SAE (a folder with ``cfg.json``, ``ae.pt`` or ``params.npz``; a ``.safetensors``,
    ``.pt`` or ``.npz`` file), sorted by name. Raises ``FamfindError`` naming the path when it does not
    exist or holds no SAE."""
    p = Path(path)
    if not p.exists():
        raise FamfindError(p, "file not found")
    if not p.is_dir() or (p / SAELENS_CFG).exists():
        return [p]
    if any(ld.matches(p) for ld in LOADERS[:3]):  # a sparsify, dictionary_learning or Gemma Scope folder
        return [p]
    found = sorted(q for q in p.iterdir()
                   if (q.is_dir() and ((q / SAELENS_CFG).exists() or (q / "ae.pt").exists()
                                       or (q / "params.npz").exists()))
                   or q.suffix in (".safetensors", ".pt", ".npz"))
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
