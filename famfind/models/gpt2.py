"""famfind's own GPT-2 forward (the fast path): a local Hugging Face GPT-2-architecture
checkpoint (``config.json`` + ``model.safetensors`` + ``tokenizer.json``, the embedded
default's format), reimplemented in ~60 lines so famfind can stop at the SAE's layer, read
``blocks.{L}.attn.hook_z`` and ``hook_pattern``, and mean-ablate heads, without autograd.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from famfind.errors import FamfindError, first_line
from famfind.models.base import Ablation, ModelConfig, ResidParts, ablate_heads
from famfind.validation import GPT2Config, validated


class HFTokenizer:
    """``tokenizers`` tokenizer from ``tokenizer.json`` (no transformers import needed)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _T

        try:
            self._tok = _T.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise FamfindError(path, f"not a valid tokenizers file ({first_line(e, 120)})") from None

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



_GELU_C = math.sqrt(2.0 / math.pi)


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``cat([arange(s, s + c) for s, c in zip(starts, counts)])``, vectorised."""
    offset = torch.cumsum(counts, 0) - counts
    return torch.arange(int(counts.sum()), device=starts.device) + torch.repeat_interleave(starts - offset, counts)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (HF's
    NewGELUActivation, TransformerLens's gelu_new). Without autograd it runs in place on one
    buffer: the same operations on the same operands (multiplying by 0.5 is exact), so the
    result is bitwise equal to the formula's, at about a third of its time on CPU."""
    if torch.is_grad_enabled() and x.requires_grad:
        return 0.5 * x * (1.0 + torch.tanh(_GELU_C * (x + 0.044715 * x.pow(3))))
    y = x.pow(3)
    return y.mul_(0.044715).add_(x).mul_(_GELU_C).tanh_().add_(1.0).mul_(x).mul_(0.5)


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


@dataclass
class SpanCache:
    """A clean run that :meth:`HFGPT2Model.hook_z_spans` edits: ``q0`` layer 0's queries and
    ``kv[l]`` layer ``l``'s keys and values, each ``[batch, n_heads, pos, d_head]``."""

    q0: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    # layer 0's clean attention, for layers >= 1 (``None`` for a layer-0 cache): per query
    # position the largest score ``max0 [batch, n_heads, pos]`` and its key ``top0``, the softmax
    # denominator ``den0 [batch, n_heads, pos]`` and numerator ``num0 [batch, n_heads, pos,
    # d_head]`` (values weighted by exp(score - max0)), and both without the top key (``den0_x``,
    # ``num0_x``, summed without it: no cancellation when an edit removes that key)
    max0: torch.Tensor | None = None
    top0: torch.Tensor | None = None
    den0: torch.Tensor | None = None
    num0: torch.Tensor | None = None
    den0_x: torch.Tensor | None = None
    num0_x: torch.Tensor | None = None


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
            raise FamfindError(wfile, f"not a readable safetensors file ({first_line(e, 120)})") from None
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

    def _attn(self, x: torch.Tensor, layer: int, want_pattern: bool, want_v: bool = False):
        """``(z [batch, pos, n_heads, d_head], pattern or None)``; ``want_v``: also ``v [batch, pos,
        n_heads, d_head]`` and the pattern, with z still from SDPA (the pass's hook_z is the same
        whether a detector reads attention or not)."""
        B, T, _ = x.shape
        H, dh = self.cfg.n_heads, self.cfg.d_head
        qkv = self._ln(x, f"h.{layer}.ln_1") @ self.sd[f"h.{layer}.attn.c_attn.weight"] \
            + self.sd[f"h.{layer}.attn.c_attn.bias"]
        q, k, v = (t.view(B, T, H, dh).transpose(1, 2) for t in qkv.split(self.cfg.d_model, dim=-1))
        pattern = None
        if want_pattern or want_v:
            scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        z = pattern @ v if want_pattern and not want_v else F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if want_v:
            return z.transpose(1, 2), pattern, v.transpose(1, 2)
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
        return self.run_attention(tokens, layers, ())[0]

    @torch.no_grad()
    def run_attention(self, tokens: torch.Tensor, layers: list[int], attention) -> tuple[dict, dict]:
        last = max(layers)
        if last >= self.cfg.n_layers:
            raise FamfindError(self.path, f"layer {last} out of range (n_layers={self.cfg.n_layers})")
        x, out, att = self._embed(tokens), {}, {}
        for lyr in range(last + 1):
            if lyr in attention:
                z, pattern, v = self._attn(x, lyr, False, want_v=True)
                att[lyr] = (pattern, v)
            else:
                z, _ = self._attn(x, lyr, False)
            if lyr in layers:
                out[lyr] = z
            if lyr == last:
                return out, att
            x = x + self._attn_out(z, lyr)
            x = x + self._mlp(x, lyr)
        return out, att

    @torch.no_grad()
    def prefix_cache(self, tokens: torch.Tensor, layer: int, batch_size: int = 32) -> SpanCache:
        """The clean run of ``tokens [batch, pos]`` that :meth:`hook_z_spans` and
        :meth:`hook_z_at` edit (:class:`SpanCache`), ``batch_size`` sequences per forward."""
        B, T = tokens.shape
        H, dh = self.cfg.n_heads, self.cfg.d_head
        parts = []
        for b in range(0, B, batch_size):
            x, kv, q0 = self._embed(tokens[b:b + batch_size]), [], None
            n = x.shape[0]
            for lyr in range(layer + 1):
                qkv = self._ln(x, f"h.{lyr}.ln_1") @ self.sd[f"h.{lyr}.attn.c_attn.weight"] \
                    + self.sd[f"h.{lyr}.attn.c_attn.bias"]
                q, k, v = (t.view(n, T, H, dh).transpose(1, 2) for t in qkv.split(self.cfg.d_model, dim=-1))
                kv += [k, v]
                q0 = q if lyr == 0 else q0
                if lyr == layer:
                    break
                z = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
                x = x + self._attn_out(z, lyr)
                x = x + self._mlp(x, lyr)
            part = [q0, *kv]
            if layer > 0:  # layer 0's softmax sums, with and without each query's top key
                sc = (q0 @ kv[0].transpose(-1, -2) / math.sqrt(dh)).masked_fill(
                    ~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
                mx, top = sc.max(-1)
                w = sc.sub_(mx[..., None]).exp_()
                den, num = w.sum(-1), w @ kv[1]
                w.scatter_(-1, top[..., None], 0.0)
                part += [mx, top, den, num, w.sum(-1), w @ kv[1]]
            parts.append(part)
        cols = [torch.cat(c) for c in zip(*parts)]
        kv = [(cols[1 + 2 * i], cols[2 + 2 * i]) for i in range(layer + 1)]
        return SpanCache(cols[0], kv, *cols[2 * layer + 3:]) if layer > 0 else SpanCache(cols[0], kv)

    def _w_q_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``c_attn`` split into its query part and its key-value part (weights, biases), contiguous."""
        split = self.__dict__.setdefault("_c_attn_split", {})
        if layer not in split:
            W, b, d = self.sd[f"h.{layer}.attn.c_attn.weight"], self.sd[f"h.{layer}.attn.c_attn.bias"], self.cfg.d_model
            split[layer] = (W[:, :d].contiguous(), b[:d].contiguous(), W[:, d:].contiguous(), b[d:].contiguous())
        return split[layer]

    @torch.no_grad()
    def hook_z_at(self, cache: SpanCache, rows: torch.Tensor, pos: torch.Tensor, edit_at: torch.Tensor,
                  edit_tok: torch.Tensor, max_floats: int = 1 << 24) -> torch.Tensor:
        """Layer 0's hook_z of edited sequences at single positions, ``[n, n_heads, d_head]``:
        row ``i`` is cached sequence ``rows[i]`` (:meth:`prefix_cache`) with token
        ``edit_tok[i]`` at ``edit_at[i]`` (-1: none), read at ``pos[i]``. The model's input is
        position-wise, so an edit changes layer 0's query, key and value at its own position
        only: each row's scores against its sequence's clean keys, with the edited key's score
        put in, then the clean values plus the edited value's correction. Rows of one sequence
        share one matmul against its keys (no key is copied per row); ``max_floats`` bounds the
        score block of one matmul."""
        n = rows.numel()
        H, dh, d = self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model
        q0, (k0, v0) = cache.q0, cache.kv[0]
        T = q0.shape[2]
        out = torch.empty(n, H, dh, device=q0.device)
        if n == 0:
            return out
        scale = 1 / math.sqrt(dh)
        edited = edit_at >= 0
        xe = self.sd["wte.weight"][edit_tok.clamp_min(0)] + self.sd["wpe.weight"][edit_at.clamp_min(0)]
        qkv = self._ln(xe, "h.0.ln_1") @ self.sd["h.0.attn.c_attn.weight"] + self.sd["h.0.attn.c_attn.bias"]
        qe, ke, ve = (t.view(n, H, dh) for t in qkv.split(d, dim=-1))
        q = torch.where((edited & (pos == edit_at))[:, None, None], qe, q0[rows, :, pos])  # [n, H, dh]
        se = (q * ke).sum(-1) * scale  # the edited key's score [n, H]
        order = torch.argsort(rows, stable=True)
        seqs, counts = torch.unique_consecutive(rows[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n, device=rows.device) - torch.repeat_interleave(starts, counts)  # within its sequence
        by_size = torch.argsort(counts, descending=True, stable=True)  # similar sizes share a padded block
        cnt = counts[by_size].tolist()
        keys = torch.arange(T, device=rows.device)
        i = 0
        while i < len(cnt):  # sequences whose padded score block fits max_floats
            j, top = i + 1, cnt[i]
            while j < len(cnt) and (j - i + 1) * top * H * T <= max_floats:
                j += 1
            g = by_size[i:j]
            u = torch.repeat_interleave(torch.arange(j - i, device=rows.device), counts[g])
            idx = _ranges(starts[g], counts[g])
            sel, rk = order[idx], rank[idx]  # the rows, and their rank within their sequence
            s = seqs[g]
            Q = torch.zeros(j - i, top, H, dh, device=q0.device)
            Q[u, rk] = q[sel]
            scores = Q.transpose(1, 2) @ k0[s].transpose(-1, -2) * scale  # [U, H, R, T]
            P = torch.full((j - i, top), T - 1, dtype=torch.long, device=rows.device)
            P[u, rk] = pos[sel]
            at = edit_at[sel]
            ok = torch.nonzero(edited[sel] & (at <= pos[sel])).flatten()
            scores[u[ok], :, rk[ok], at[ok]] = se[sel[ok]]
            pat = scores.masked_fill(keys[None, None, None, :] > P[:, None, :, None], float("-inf")).softmax(-1)
            z = pat @ v0[s]  # [U, H, R, dh]
            z[u[ok], :, rk[ok]] += pat[u[ok], :, rk[ok], at[ok]][..., None] * (ve[sel[ok]] - v0[s[u[ok]], :, at[ok]])
            out[sel] = z[u, :, rk]
            i = j
        return out

    def _layer0_span(self, cache: SpanCache, rows: torch.Tensor, pos: torch.Tensor, edit_at: torch.Tensor,
                     edit_tok: torch.Tensor, z_edit: torch.Tensor) -> torch.Tensor:
        """Layer 0's hook_z ``[E, S, n_heads, d_head]`` of edited sequences at positions ``pos
        [E, S]``. A position after the edit keeps its query; only its score on the edited key and
        that key's value change, so its output is the clean softmax sums (:class:`SpanCache`)
        without the old key's term (the sums kept without the top key when the edit removes it,
        else a subtraction of at most half the sum) and with the new key's term. The edited
        position itself (its query changes too) is ``z_edit [E, n_heads, d_head]``
        (:meth:`hook_z_at`); positions before the edit, or in an unedited sequence, are clean."""
        E, S = pos.shape
        H, dh = self.cfg.n_heads, self.cfg.d_head
        r, t = rows.repeat_interleave(S), pos.flatten()
        e = edit_at.repeat_interleave(S)
        out = cache.num0[r, :, t] / cache.den0[r, :, t, None]  # clean [E*S, H, dh]
        after = torch.nonzero((e >= 0) & (t > e)).flatten()
        if after.numel():
            ed = torch.nonzero(edit_at >= 0).flatten()  # each edit's new key and value, once
            xe = self.sd["wte.weight"][edit_tok[ed]] + self.sd["wpe.weight"][edit_at[ed]]
            _, _, Wkv, bkv = self._w_q_kv(0)
            k_new, v_new = torch.zeros(E, 2, H, dh, device=pos.device).index_copy_(
                0, ed, (self._ln(xe, "h.0.ln_1") @ Wkv + bkv).view(-1, 2, H, dh)).unbind(1)
            ei = torch.div(after, S, rounding_mode="floor")  # the edit of each row
            ra, ta, ea = r[after], t[after], e[after]
            q = cache.q0[ra, :, ta]  # [n, H, dh]
            scale = 1 / math.sqrt(dh)
            m = cache.max0[ra, :, ta]
            w_old = ((q * cache.kv[0][0][ra, :, ea]).sum(-1) * scale - m).exp()  # [n, H]
            s_new = (q * k_new[ei]).sum(-1) * scale
            is_top = cache.top0[ra, :, ta] == ea[:, None]
            den = torch.where(is_top, cache.den0_x[ra, :, ta], cache.den0[ra, :, ta] - w_old)
            num = torch.where(is_top[..., None], cache.num0_x[ra, :, ta],
                              cache.num0[ra, :, ta] - w_old[..., None] * cache.kv[0][1][ra, :, ea])
            m2 = torch.maximum(m, s_new)
            keep, w_new = (m - m2).exp(), (s_new - m2).exp()
            out[after] = (num * keep[..., None] + w_new[..., None] * v_new[ei]) / (den * keep + w_new)[..., None]
        at = torch.nonzero((e >= 0) & (t == e)).flatten()
        out[at] = z_edit[torch.div(at, S, rounding_mode="floor")]
        return out.view(E, S, H, dh)

    @torch.no_grad()
    def hook_z_spans(self, cache: SpanCache, rows: torch.Tensor, starts: torch.Tensor, spans: torch.Tensor,
                     layer: int, edit_at: torch.Tensor, edit_tok: torch.Tensor, q_rows: torch.Tensor,
                     z_edit: torch.Tensor) -> torch.Tensor:
        """hook_z at ``layer >= 1`` of edited sequences at the positions a caller reads, computed
        only where the edit changes anything: ``[edits, Q, n_heads, d_head]`` at positions
        ``starts[e] + q_rows[e, j]``. Sequence ``e`` is cached sequence ``rows[e]``
        (:meth:`prefix_cache`) with token ``edit_tok[e]`` at ``edit_at[e]`` (-1: none); ``spans
        [edits, S]`` are its (edited) tokens from ``starts[e]``, which is at or before the edit and
        the first read; ``z_edit [edits, n_heads, d_head]`` is layer 0's hook_z at each edited
        position (:meth:`hook_z_at`, which is also the whole answer for a layer-0 SAE). Exact up
        to float rounding: the model is causal and its input position-wise, so layer 0 changes
        only through the edited key (see :meth:`_layer0_span`); later layers recompute the span
        with the clean keys and values before it; the SAE's layer computes queries at ``q_rows``
        only. Raises ``ValueError`` for ``layer`` 0."""
        if layer == 0:
            raise ValueError("hook_z_spans is for layers >= 1; a layer-0 read is one hook_z_at row")
        E, S = spans.shape
        H, dh, d = self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model
        dev = spans.device
        T = cache.q0.shape[2]
        pos = (starts[:, None] + torch.arange(S, device=dev)).clamp_max(T - 1)  # [E, S] absolute positions
        x = self.sd["wte.weight"][spans] + self.sd["wpe.weight"][pos]
        x = x + self._attn_out(self._layer0_span(cache, rows, pos, edit_at, edit_tok, z_edit), 0)
        x = x + self._mlp(x, 0)
        Pb = min(int(starts.max()), T)  # cached keys any edit of the batch reads
        cached_ok = torch.arange(Pb, device=dev)[None, :] < starts[:, None]  # [E, Pb]
        span_idx = torch.arange(S, device=dev)
        for lyr in range(1, layer + 1):
            h = self._ln(x, f"h.{lyr}.ln_1")
            Wq, bq, Wkv, bkv = self._w_q_kv(lyr)
            k, v = (h @ Wkv + bkv).view(E, S, 2, H, dh).permute(2, 0, 3, 1, 4)  # [E, H, S, dh] each
            qi = span_idx[None, :].expand(E, S) if lyr < layer else q_rows.clamp_max(S - 1)  # span rows queried
            hq = h.gather(1, qi[:, :, None].expand(E, qi.shape[1], d))
            q = (hq @ Wq + bq).view(E, -1, H, dh).transpose(1, 2)
            kc, vc = cache.kv[lyr]
            K = torch.cat([kc[rows, :, :Pb], k], 2)  # [E, H, Pb + S, dh]
            V = torch.cat([vc[rows, :, :Pb], v], 2)
            keep = torch.cat([cached_ok[:, None, :].expand(E, qi.shape[1], Pb),
                              span_idx[None, None, :] <= qi[:, :, None]], -1)[:, None]
            z = F.scaled_dot_product_attention(q, K, V, attn_mask=keep).transpose(1, 2)
            if lyr == layer:
                return z
            x = x + self._attn_out(z, lyr)
            x = x + self._mlp(x, lyr)
        raise FamfindError(self.path, f"layer {layer} out of range (n_layers={self.cfg.n_layers})")

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

