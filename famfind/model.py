"""Models famfind scans: a hook_z runner with TransformerLens-shaped weights.

``HFGPT2Model`` reads a local Hugging Face GPT-2-architecture checkpoint (``config.json``
+ ``model.safetensors``, the embedded default's format) and reimplements its forward in
~60 lines so famfind can stop at the SAE's layer, read ``blocks.{L}.attn.hook_z`` and
``hook_pattern``, and mean-ablate heads, without autograd. ``BridgeModel`` runs a local
checkpoint of any other architecture (Pythia, Llama, Gemma-2, ...) through TransformerLens's
``TransformerBridge`` (TL >= 3.9, 4.x). ``TLModel`` wraps a TransformerLens
``HookedTransformer`` for a model name TransformerLens resolves (needs the hub; TL 3.x).

Weight shapes follow TransformerLens: ``W_Q/W_K/W_V [n_heads, d_model, d_head]``,
``W_O [n_heads, d_head, d_model]``, ``W_U [d_model, d_vocab]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from famfind.errors import FamfindError
from famfind.validation import GPT2Config, validated

Ablation = dict[tuple[int, int], torch.Tensor]  # (layer, head) -> value [d_head] written into hook_z


@dataclass(frozen=True)
class ModelConfig:
    name: str
    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    n_ctx: int


@dataclass
class ResidParts:
    """``blocks.{layer}.hook_resid_pre`` = ``embed + pos + sum_l (z[l] @ W_O[l] + b_O[l] +
    mlp[l])`` over the layers ``l < layer``, each ``[batch, pos, d_model]`` (``z[l]``: hook_z
    ``[batch, pos, n_heads, d_head]``, ``W_O[l] [n_heads, d_head, d_model]``, ``b_O[l]
    [d_model]``); and how ``layer``'s attention reads it: ``ln1(x) = gamma * (x - mean(x)) /
    scale + beta`` with ``scale [batch, pos, 1]`` frozen from the forward (TransformerLens's
    ``ln1.hook_scale``), ``v = ln1(x) @ W_V + b_V`` (``W_V [n_heads, d_model, d_head]``,
    ``b_V [n_heads, d_head]``) and ``pattern [batch, n_heads, query_pos, key_pos]``."""

    embed: torch.Tensor
    pos: torch.Tensor
    z: dict[int, torch.Tensor]
    W_O: dict[int, torch.Tensor]
    b_O: dict[int, torch.Tensor]
    mlp: dict[int, torch.Tensor]
    scale: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    W_V: torch.Tensor
    b_V: torch.Tensor
    pattern: torch.Tensor


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class AttnModel(Protocol):
    """What detectors may use of a model. All runs are ``no_grad``."""

    cfg: ModelConfig
    tokenizer: Tokenizer | None

    def W_Q(self, layer: int) -> torch.Tensor: ...
    def W_K(self, layer: int) -> torch.Tensor: ...
    def W_V(self, layer: int) -> torch.Tensor: ...
    def W_O(self, layer: int) -> torch.Tensor: ...
    def W_U(self) -> torch.Tensor: ...

    def circuit_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W_Q, W_K, W_V, W_O)`` of ``layer`` as TransformerLens's ``from_pretrained``
        processes them (``fold_ln``: ln1's scale folded into W_Q/W_K/W_V, which are then centred
        over d_model; ``center_writing_weights``: W_O centred over d_model): the weights circuit
        analysis (composition scores) reads."""
        ...

    def run_hook_z(self, tokens: torch.Tensor, layer: int, ablate: Ablation | None = None) -> torch.Tensor:
        """``blocks.{layer}.attn.hook_z``, shape ``[batch, pos, n_heads, d_head]``; the
        forward stops there. ``ablate`` overwrites hook_z of (layer, head) at or below it."""
        ...

    def run_hook_zs(self, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """``blocks.{L}.attn.hook_z`` of each of ``layers`` from one forward that stops at the
        deepest: ``{layer: [batch, pos, n_heads, d_head]}``."""
        ...

    def resid_parts(self, tokens: torch.Tensor, layer: int) -> ResidParts:
        """The residual stream entering ``layer`` split into its parts, with what ``layer``'s
        attention does with it (:class:`ResidParts`), for recursive DFA."""
        ...

    def patterns(self, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """``blocks.{L}.attn.hook_pattern`` per layer, ``[batch, n_heads, query_pos, key_pos]``."""
        ...

    def attn_parts(self, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hook_pattern [batch, n_heads, query_pos, key_pos], hook_v [batch, pos, n_heads,
        d_head])`` of ``layer``; ``hook_z[b, q, h] = sum_k pattern[b, h, q, k] * v[b, k, h]``."""
        ...

    def normalized_resid(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        """The residual stream entering ``layer``'s attention after its LayerNorm
        (``blocks.{L}.ln1.hook_normalized``), ``[batch, pos, d_model]``; multiplied by
        ``W_V[h] @ W_O[h]`` it gives head h's OV output (value bias left out)."""
        ...


class HFTokenizer:
    """``tokenizers`` tokenizer from ``tokenizer.json`` (no transformers import needed)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _T

        try:
            self._tok = _T.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise FamfindError(path, f"not a valid tokenizers file ({str(e).splitlines()[0][:120]})") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))

    def token_str(self, i: int) -> str:
        return self._tok.decode([int(i)])

    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary entry ``token`` (e.g. ``<|endoftext|>``), ``None`` if absent."""
        return self._tok.token_to_id(token)


def ablate_heads(z: torch.Tensor, layer: int, ablate: Ablation | None) -> torch.Tensor:
    """hook_z ``[batch, pos, n_heads, d_head]`` with the ``ablate`` heads of ``layer`` overwritten."""
    if ablate:
        heads = [(h, val) for (lyr, h), val in ablate.items() if lyr == layer]
        if heads:
            z = z.clone()
            for h, val in heads:
                z[:, :, h, :] = val
    return z


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


_ACTS = {"gelu_new": _gelu_new, "gelu": F.gelu, "relu": F.relu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _check_gpt2_weights(sd: dict[str, torch.Tensor], c: ModelConfig, d_mlp: int, wfile: Path) -> None:
    """Every tensor the runner reads is in ``sd`` (keys without ``transformer.``) with the
    shape ``config.json`` implies, floating point and finite; raises ``FamfindError`` naming
    ``wfile``, the tensor and the problem."""
    d = c.d_model
    want = {"wte.weight": (c.d_vocab, d), "wpe.weight": (c.n_ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(c.n_layers):
        for name, shape in (("ln_1.weight", (d,)), ("ln_1.bias", (d,)), ("ln_2.weight", (d,)), ("ln_2.bias", (d,)),
                            ("attn.c_attn.weight", (d, 3 * d)), ("attn.c_attn.bias", (3 * d,)),
                            ("attn.c_proj.weight", (d, d)), ("attn.c_proj.bias", (d,)),
                            ("mlp.c_fc.weight", (d, d_mlp)), ("mlp.c_fc.bias", (d_mlp,)),
                            ("mlp.c_proj.weight", (d_mlp, d)), ("mlp.c_proj.bias", (d,))):
            want[f"h.{i}.{name}"] = shape
    if "lm_head.weight" in sd:
        want["lm_head.weight"] = (c.d_vocab, d)
    for name, shape in want.items():
        t = sd.get(name)
        if t is None:
            raise FamfindError(wfile, f"missing tensor {name!r} (config.json says n_layer={c.n_layers})")
        if tuple(t.shape) != shape:
            raise FamfindError(wfile, f"tensor {name!r} has shape {list(t.shape)} but config.json implies "
                               f"{list(shape)} (n_embd={d}, vocab_size={c.d_vocab}, n_positions={c.n_ctx})")
        if not t.is_floating_point():
            raise FamfindError(wfile, f"tensor {name!r} has dtype {t.dtype}, expected floating point")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise FamfindError(wfile, f"tensor {name!r} has {bad} non-finite values (NaN or Inf)")


class HFGPT2Model:
    """A local HF GPT-2-architecture checkpoint, run layer by layer (see module doc).

    Raises ``FamfindError`` naming the file for a missing ``config.json``/weights, a
    non-GPT-2 ``model_type``, or a missing tensor.
    """

    def __init__(self, path: str | Path, device: str = "cpu"):
        from safetensors.torch import load_file

        p = Path(path)
        cpath = p / "config.json"
        if not cpath.exists():
            raise FamfindError(p, "no config.json: not a Hugging Face checkpoint directory")
        try:
            raw = json.loads(cpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FamfindError(cpath, f"not valid JSON ({e})") from None
        if isinstance(raw, dict) and raw.get("model_type") != "gpt2":
            raise FamfindError(cpath, f"model_type {raw.get('model_type')!r} is not GPT-2, which famfind's "
                               "own runner needs; use --model-backend auto or bridge (TransformerBridge)")
        cfg = validated(GPT2Config, raw, cpath)
        wfile = p / "model.safetensors"
        if not wfile.exists():
            raise FamfindError(wfile, "file not found")
        try:
            loaded = load_file(str(wfile))
        except Exception as e:  # safetensors raises its own error types for a corrupt file
            raise FamfindError(wfile, f"not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
        sd = {k.removeprefix("transformer."): v for k, v in loaded.items()}
        d_model, n_heads = cfg.n_embd, cfg.n_head
        self.cfg = ModelConfig(name=str(p), n_layers=cfg.n_layer, n_heads=n_heads,
                               d_head=d_model // n_heads, d_model=d_model, d_vocab=cfg.vocab_size,
                               n_ctx=cfg.n_positions)
        _check_gpt2_weights(sd, self.cfg, raw.get("n_inner") or 4 * d_model, wfile)
        self.sd = {k: v.to(device=device, dtype=torch.float32) for k, v in sd.items()}
        self.eps = cfg.layer_norm_epsilon
        self.act = _ACTS[cfg.activation_function]
        tpath = p / "tokenizer.json"
        self.tokenizer = HFTokenizer(tpath) if tpath.exists() else None
        self.path = p

    # --- weights, TransformerLens shapes -------------------------------------------------
    def _qkv(self, layer: int, i: int) -> torch.Tensor:
        d, H, dh = self.cfg.d_model, self.cfg.n_heads, self.cfg.d_head
        W = self.sd[f"h.{layer}.attn.c_attn.weight"][:, i * d:(i + 1) * d]  # [d_model, n_heads*d_head]
        return W.reshape(d, H, dh).permute(1, 0, 2)

    def W_Q(self, layer: int) -> torch.Tensor:
        return self._qkv(layer, 0)

    def W_K(self, layer: int) -> torch.Tensor:
        return self._qkv(layer, 1)

    def W_V(self, layer: int) -> torch.Tensor:
        return self._qkv(layer, 2)

    def W_O(self, layer: int) -> torch.Tensor:
        W = self.sd[f"h.{layer}.attn.c_proj.weight"]  # [n_heads*d_head, d_model]
        return W.reshape(self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model)

    def W_U(self) -> torch.Tensor:
        return self.sd.get("lm_head.weight", self.sd["wte.weight"]).T

    def circuit_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.sd[f"h.{layer}.ln_1.weight"][None, :, None]  # [1, d_model, 1]
        W_O = self.W_O(layer)
        read = [g * W for W in (self.W_Q(layer), self.W_K(layer), self.W_V(layer))]
        read = [W - W.mean(1, keepdim=True) for W in read]  # LayerNorm centres its input: fold that too
        return (*read, W_O - W_O.mean(-1, keepdim=True))

    # --- forward -------------------------------------------------------------------------
    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.sd[f"{name}.weight"], self.sd[f"{name}.bias"], self.eps)

    def _attn(self, x: torch.Tensor, layer: int, want_pattern: bool):
        B, T, _ = x.shape
        H, dh = self.cfg.n_heads, self.cfg.d_head
        qkv = self._ln(x, f"h.{layer}.ln_1") @ self.sd[f"h.{layer}.attn.c_attn.weight"] \
            + self.sd[f"h.{layer}.attn.c_attn.bias"]
        q, k, v = (t.view(B, T, H, dh).transpose(1, 2) for t in qkv.split(self.cfg.d_model, dim=-1))
        if want_pattern:
            scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            z = pattern @ v
        else:
            pattern = None
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return z.transpose(1, 2), pattern  # z: [batch, pos, n_heads, d_head]

    def _attn_out(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        return z.flatten(-2) @ self.sd[f"h.{layer}.attn.c_proj.weight"] + self.sd[f"h.{layer}.attn.c_proj.bias"]

    def _mlp(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        h = self._ln(x, f"h.{layer}.ln_2") @ self.sd[f"h.{layer}.mlp.c_fc.weight"] + self.sd[f"h.{layer}.mlp.c_fc.bias"]
        return self.act(h) @ self.sd[f"h.{layer}.mlp.c_proj.weight"] + self.sd[f"h.{layer}.mlp.c_proj.bias"]

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.cfg.n_ctx:
            raise FamfindError(self.path, f"sequence length {T} exceeds n_ctx {self.cfg.n_ctx}")
        return self.sd["wte.weight"][tokens] + self.sd["wpe.weight"][:T]

    @torch.no_grad()
    def run_hook_z(self, tokens: torch.Tensor, layer: int, ablate: Ablation | None = None) -> torch.Tensor:
        x = self._embed(tokens)
        for lyr in range(layer + 1):
            z, _ = self._attn(x, lyr, False)
            z = ablate_heads(z, lyr, ablate)
            if lyr == layer:
                return z
            x = x + self._attn_out(z, lyr)
            x = x + self._mlp(x, lyr)
        raise FamfindError(self.path, f"layer {layer} out of range (n_layers={self.cfg.n_layers})")

    @torch.no_grad()
    def run_hook_zs(self, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        last = max(layers)
        if last >= self.cfg.n_layers:
            raise FamfindError(self.path, f"layer {last} out of range (n_layers={self.cfg.n_layers})")
        x, out = self._embed(tokens), {}
        for lyr in range(last + 1):
            z, _ = self._attn(x, lyr, False)
            if lyr in layers:
                out[lyr] = z
            if lyr == last:
                return out
            x = x + self._attn_out(z, lyr)
            x = x + self._mlp(x, lyr)
        return out

    @torch.no_grad()
    def resid_parts(self, tokens: torch.Tensor, layer: int) -> ResidParts:
        if not 0 <= layer < self.cfg.n_layers:
            raise FamfindError(self.path, f"layer {layer} out of range (n_layers={self.cfg.n_layers})")
        T = tokens.shape[1]
        embed, pos = self.sd["wte.weight"][tokens], self.sd["wpe.weight"][:T].expand(tokens.shape[0], -1, -1)
        x = self._embed(tokens)
        zs, W_O, b_O, mlp = {}, {}, {}, {}
        for lyr in range(layer):
            z, _ = self._attn(x, lyr, False)
            zs[lyr], W_O[lyr], b_O[lyr] = z, self.W_O(lyr), self.sd[f"h.{lyr}.attn.c_proj.bias"]
            x = x + self._attn_out(z, lyr)
            mlp[lyr] = self._mlp(x, lyr)
            x = x + mlp[lyr]
        xc = x - x.mean(-1, keepdim=True)
        scale = (xc.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        pattern, _ = self.attn_parts(tokens, layer)
        d, H, dh = self.cfg.d_model, self.cfg.n_heads, self.cfg.d_head
        b_V = self.sd[f"h.{layer}.attn.c_attn.bias"][2 * d:].view(H, dh)
        return ResidParts(embed, pos, zs, W_O, b_O, mlp, scale, self.sd[f"h.{layer}.ln_1.weight"],
                          self.sd[f"h.{layer}.ln_1.bias"], self.W_V(layer), b_V, pattern)

    @torch.no_grad()
    def patterns(self, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        x, out = self._embed(tokens), {}
        for lyr in range(max(layers) + 1):
            z, pat = self._attn(x, lyr, True)
            if lyr in layers:
                out[lyr] = pat
            x = x + self._attn_out(z, lyr)
            x = x + self._mlp(x, lyr)
        return out

    def _resid_pre(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        if not 0 <= layer < self.cfg.n_layers:
            raise FamfindError(self.path, f"layer {layer} out of range (n_layers={self.cfg.n_layers})")
        x = self._embed(tokens)
        for lyr in range(layer):
            z, _ = self._attn(x, lyr, False)
            x = x + self._attn_out(z, lyr)
            x = x + self._mlp(x, lyr)
        return x

    @torch.no_grad()
    def attn_parts(self, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = tokens.shape
        H, dh = self.cfg.n_heads, self.cfg.d_head
        x = self._resid_pre(tokens, layer)
        qkv = self._ln(x, f"h.{layer}.ln_1") @ self.sd[f"h.{layer}.attn.c_attn.weight"] \
            + self.sd[f"h.{layer}.attn.c_attn.bias"]
        q, k, v = (t.view(B, T, H, dh) for t in qkv.split(self.cfg.d_model, dim=-1))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        mask = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
        return scores.masked_fill(~mask, float("-inf")).softmax(-1), v

    @torch.no_grad()
    def normalized_resid(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        return self._ln(self._resid_pre(tokens, layer), f"h.{layer}.ln_1")

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, hook_z_fn=None, layer: int | None = None) -> torch.Tensor:
        """Full forward, ``[batch, pos, d_vocab]``; ``hook_z_fn(z)`` may replace hook_z at ``layer``."""
        x = self._embed(tokens)
        for lyr in range(self.cfg.n_layers):
            z, _ = self._attn(x, lyr, False)
            if hook_z_fn is not None and lyr == layer:
                z = hook_z_fn(z)
            x = x + self._attn_out(z, lyr)
            x = x + self._mlp(x, lyr)
        return self._ln(x, "ln_f") @ self.W_U()


class TLModel:
    """A TransformerLens ``HookedTransformer`` behind the same interface (hub required)."""

    def __init__(self, name: str, device: str = "cpu"):
        try:
            from transformer_lens import HookedTransformer
        except ImportError:
            raise FamfindError(name, "not a local checkpoint, and TransformerLens (< 4, with "
                               "HookedTransformer) is not installed to resolve it") from None
        try:
            self.tl = HookedTransformer.from_pretrained(name, device=device)
        except Exception as e:  # hub/network/unknown-name errors come in many types
            raise FamfindError(name, f"TransformerLens could not load it ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
        self._wrap(name)

    @classmethod
    def from_hooked(cls, hooked, name: str) -> "TLModel":
        """Wrap an already-built ``HookedTransformer`` (e.g. one made offline from weights)."""
        self = cls.__new__(cls)
        self.tl = hooked
        self._wrap(name)
        return self

    def _wrap(self, name: str) -> None:
        c = self.tl.cfg
        self.cfg = ModelConfig(name=name, n_layers=c.n_layers, n_heads=c.n_heads, d_head=c.d_head,
                               d_model=c.d_model, d_vocab=c.d_vocab, n_ctx=c.n_ctx)
        self.tokenizer = _TLTokenizer(self.tl.tokenizer) if self.tl.tokenizer is not None else None

    def W_Q(self, layer: int) -> torch.Tensor:
        return self.tl.W_Q[layer]

    def W_K(self, layer: int) -> torch.Tensor:
        return self.tl.W_K[layer]

    def W_V(self, layer: int) -> torch.Tensor:
        return self.tl.W_V[layer]

    def W_O(self, layer: int) -> torch.Tensor:
        return self.tl.W_O[layer]

    def W_U(self) -> torch.Tensor:
        return self.tl.W_U

    def circuit_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The HookedTransformer's weights as loaded (``from_pretrained`` has processed them)."""
        return self.W_Q(layer), self.W_K(layer), self.W_V(layer), self.W_O(layer)

    @torch.no_grad()
    def run_hook_z(self, tokens: torch.Tensor, layer: int, ablate: Ablation | None = None) -> torch.Tensor:
        store: dict[str, torch.Tensor] = {}
        hooks = []
        for lyr in range(layer + 1):
            def fn(z, hook, lyr=lyr):
                z = ablate_heads(z, lyr, ablate)
                if lyr == layer:
                    store["z"] = z
                return z
            hooks.append((f"blocks.{lyr}.attn.hook_z", fn))
        self.tl.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=layer + 1)
        return store["z"]

    @torch.no_grad()
    def run_hook_zs(self, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        names = {f"blocks.{lyr}.attn.hook_z": lyr for lyr in layers}
        _, cache = self.tl.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=max(layers) + 1)
        return {lyr: cache[n] for n, lyr in names.items()}

    @torch.no_grad()
    def resid_parts(self, tokens: torch.Tensor, layer: int) -> ResidParts:
        """From TransformerLens's cache; LayerNorm weights folded by ``from_pretrained`` read as
        gamma = 1, beta = 0 (an unfolded ``LN`` model's are read from ``blocks.L.ln1``)."""
        tl = self.tl
        names = {"hook_embed", "hook_pos_embed", f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.attn.hook_pattern",
                 *(f"blocks.{lyr}.attn.hook_z" for lyr in range(layer)), *(f"blocks.{lyr}.hook_mlp_out" for lyr in range(layer))}
        _, c = tl.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=layer + 1)
        ln = tl.blocks[layer].ln1
        d = tl.cfg.d_model
        gamma = ln.w if hasattr(ln, "w") else torch.ones(d, device=tokens.device)
        beta = ln.b if hasattr(ln, "b") else torch.zeros(d, device=tokens.device)
        pos = c["hook_pos_embed"].expand(tokens.shape[0], -1, -1)
        return ResidParts(c["hook_embed"], pos, {lyr: c[f"blocks.{lyr}.attn.hook_z"] for lyr in range(layer)},
                          {lyr: tl.W_O[lyr] for lyr in range(layer)}, {lyr: tl.b_O[lyr] for lyr in range(layer)},
                          {lyr: c[f"blocks.{lyr}.hook_mlp_out"] for lyr in range(layer)},
                          c[f"blocks.{layer}.ln1.hook_scale"], gamma, beta, tl.W_V[layer], tl.b_V[layer],
                          c[f"blocks.{layer}.attn.hook_pattern"])

    @torch.no_grad()
    def patterns(self, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        names = [f"blocks.{lyr}.attn.hook_pattern" for lyr in layers]
        _, cache = self.tl.run_with_cache(tokens, names_filter=lambda n: n in names,
                                          stop_at_layer=max(layers) + 1)
        return {lyr: cache[f"blocks.{lyr}.attn.hook_pattern"] for lyr in layers}

    @torch.no_grad()
    def attn_parts(self, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        names = (f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v")
        _, cache = self.tl.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=layer + 1)
        return cache[names[0]], cache[names[1]]

    @torch.no_grad()
    def normalized_resid(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        name = f"blocks.{layer}.ln1.hook_normalized"
        _, cache = self.tl.run_with_cache(tokens, names_filter=lambda n: n == name, stop_at_layer=layer + 1)
        return cache[name]


def _bridge_class():
    """TransformerLens's ``TransformerBridge`` (TL >= 3.9 and 4.x), or ``None`` when absent."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    return TransformerBridge


class BridgeModel(TLModel):
    """A local Hugging Face checkpoint of any architecture TransformerLens's
    ``TransformerBridge`` supports (GPT-NeoX/Pythia, Llama, Gemma-2, ... and GPT-2), booted
    offline from the folder (``TransformerBridge.boot_transformers(path)`` in compatibility
    mode, so hook names and weight shapes are HookedTransformer's, with ``no_processing=True``:
    no LayerNorm folding, centring or value-bias folding, so hook_z and the weights are the
    checkpoint's own, as Hugging Face computes them and as famfind's GPT-2 runner reads them;
    TransformerLens's default processing moves ``b_V`` out of hook_z and changed the default's
    families).

    Grouped-query attention: hook_z, ``W_Q`` and ``W_O`` are per query head (``d_in = n_heads
    * d_head``); ``W_K``/``W_V`` and ``hook_v`` come per key/value head and are repeated to
    the query heads that share them (``repeat_interleave`` over heads, as the attention itself
    does), so every per-head quantity famfind computes is per query head. Mean-ablation writes
    into hook_z, i.e. per query head. :meth:`resid_parts` (recursive DFA) needs GPT-2's
    LayerNorm and learned positions and raises ``FamfindError`` for other architectures.

    Raises ``FamfindError`` naming the folder when TransformerLens is missing or cannot boot it.
    """

    def __init__(self, path: str | Path, device: str = "cpu"):
        bridge_cls = _bridge_class()
        p = Path(path)
        if bridge_cls is None:
            raise FamfindError(p, "not a GPT-2 checkpoint; other architectures run through TransformerLens's "
                               "TransformerBridge: pip install 'famfind[tl]'")
        import contextlib
        import io
        import logging
        import warnings

        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                before = logging.root.manager.disable
                logging.disable(logging.WARNING)  # TransformerLens logs config notes at WARNING
                try:
                    bridge = bridge_cls.boot_transformers(str(p), device=device)
                    bridge.enable_compatibility_mode(no_processing=True)
                finally:
                    logging.disable(before)
        except Exception as e:  # transformers/TransformerLens raise many types for an unsupported model
            msg = str(e).splitlines()[0][:160] if str(e) else ""
            raise FamfindError(p, f"TransformerBridge could not boot it ({type(e).__name__}: {msg})") from None
        bridge.requires_grad_(False)  # famfind never backpropagates; weights read as plain tensors
        self.tl = bridge
        self._wrap(str(p))
        self.path = p
        n_kv = getattr(bridge.cfg, "n_key_value_heads", None) or self.cfg.n_heads
        self.arch = getattr(getattr(bridge.original_model, "config", None), "model_type", None) or "unknown"
        self._rep = self.cfg.n_heads // n_kv

    def _per_query_head(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self._rep == 1 else x.repeat_interleave(self._rep, dim=dim)

    def W_K(self, layer: int) -> torch.Tensor:
        return self._per_query_head(self.tl.W_K[layer], 0)

    def W_V(self, layer: int) -> torch.Tensor:
        return self._per_query_head(self.tl.W_V[layer], 0)

    @torch.no_grad()
    def attn_parts(self, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        pattern, v = super().attn_parts(tokens, layer)
        return pattern, self._per_query_head(v, 2)

    def resid_parts(self, tokens: torch.Tensor, layer: int) -> ResidParts:
        if self.arch != "gpt2":
            raise FamfindError(self.path, f"recursive DFA needs GPT-2's LayerNorm and learned positions; "
                               f"this model is {self.arch}")
        return super().resid_parts(tokens, layer)


class _TLTokenizer:
    def __init__(self, tok):
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._tok.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))

    def token_str(self, i: int) -> str:
        return self._tok.decode([int(i)])

    def token_to_id(self, token: str) -> int | None:
        return self._tok.get_vocab().get(token)


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
    if backend == "bridge" or (not has_hooked and _bridge_class() is not None):
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
