"""A TransformerLens ``HookedTransformer`` behind famfind's :class:`famfind.models.base.AttnModel`
(a model name TransformerLens resolves: needs the hub, TL 3.x; or one built offline and
wrapped with :meth:`TLModel.from_hooked`). :class:`famfind.models.bridge.BridgeModel` builds
on it.
"""

from __future__ import annotations

import torch

from famfind.errors import FamfindError, first_line
from famfind.models.base import Ablation, ModelConfig, ResidParts, ablate_heads


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
                               f"{first_line(e)})") from None
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
        return self.run_attention(tokens, layers, ())[0]

    @torch.no_grad()
    def run_attention(self, tokens: torch.Tensor, layers: list[int], attention) -> tuple[dict, dict]:
        names = {f"blocks.{lyr}.attn.hook_z" for lyr in layers}
        names |= {f"blocks.{lyr}.attn.hook_{h}" for lyr in attention for h in ("pattern", "v")}
        _, cache = self.tl.run_with_cache(tokens, names_filter=lambda n: n in names,
                                          stop_at_layer=max((*layers, *attention)) + 1)
        return ({lyr: cache[f"blocks.{lyr}.attn.hook_z"] for lyr in layers},
                {lyr: (cache[f"blocks.{lyr}.attn.hook_pattern"],
                       self._per_query_head(cache[f"blocks.{lyr}.attn.hook_v"], 2)) for lyr in attention})

    def _per_query_head(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``x`` with its key/value-head axis ``dim`` repeated to the query heads (identity
        without grouped-query attention; :class:`famfind.models.bridge.BridgeModel` repeats)."""
        return x

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
        return cache[names[0]], self._per_query_head(cache[names[1]], 2)

    @torch.no_grad()
    def normalized_resid(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        name = f"blocks.{layer}.ln1.hook_normalized"
        _, cache = self.tl.run_with_cache(tokens, names_filter=lambda n: n == name, stop_at_layer=layer + 1)
        return cache[name]



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

