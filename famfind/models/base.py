"""What famfind uses of a model, whatever runs it: the :class:`AttnModel` protocol, its
config, the residual-stream parts recursive DFA reads, and head ablation.

The backends, one module each: :mod:`famfind.models.gpt2` (famfind's own GPT-2 forward, the
fast path), :mod:`famfind.models.transformer_lens` (a TransformerLens ``HookedTransformer``)
and :mod:`famfind.models.bridge` (TransformerLens's ``TransformerBridge``, any other
architecture); :func:`famfind.models.load_model` chooses among them.

Weight shapes follow TransformerLens: ``W_Q/W_K/W_V [n_heads, d_model, d_head]``,
``W_O [n_heads, d_head, d_model]``, ``W_U [d_model, d_vocab]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

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

    def run_attention(self, tokens: torch.Tensor, layers: list[int],
                      attention) -> tuple[dict[int, torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """:meth:`run_hook_zs` of ``layers`` and, from the same forward, ``{layer: (hook_pattern
        [batch, n_heads, query_pos, key_pos], hook_v [batch, pos, n_heads, d_head])}`` of each
        layer in ``attention`` (per query head under grouped-query attention). hook_z is the
        same as :meth:`run_hook_zs` gives."""
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



def ablate_heads(z: torch.Tensor, layer: int, ablate: Ablation | None) -> torch.Tensor:
    """hook_z ``[batch, pos, n_heads, d_head]`` with the ``ablate`` heads of ``layer`` overwritten."""
    if ablate:
        heads = [(h, val) for (lyr, h), val in ablate.items() if lyr == layer]
        if heads:
            z = z.clone()
            for h, val in heads:
                z[:, :, h, :] = val
    return z
