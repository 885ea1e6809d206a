"""Any architecture TransformerLens's ``TransformerBridge`` supports (GPT-NeoX/Pythia, Llama,
Gemma-2, ...), booted offline from a local Hugging Face folder (TL >= 3.9, 4.x).
"""

from __future__ import annotations

from pathlib import Path

import torch

from famfind.errors import FamfindError, first_line
from famfind.models.base import ResidParts
from famfind.models.transformer_lens import TLModel


def bridge_class():
    """TransformerLens's ``TransformerBridge`` (TL >= 3.9 and 4.x), or ``None`` when absent."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    return TransformerBridge


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_tokenizer(p: Path) -> None:
    """Load a checkpoint folder's tokenizer the way the bridge will (transformers'
    ``AutoTokenizer``); raises ``FamfindError`` naming the tokenizer file and the folder when it
    cannot (e.g. a bare ``tokenizer.json`` beside a Gemma config: transformers picks
    GemmaTokenizerFast, which needs an ``<unk>`` token)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return
    import contextlib
    import io
    import warnings

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            AutoTokenizer.from_pretrained(str(p)).encode("a")  # the bridge encodes a test string at boot
    except Exception as e:  # tokenizers and transformers raise bare Exceptions here
        files = [f for f in TOKENIZER_FILES if (p / f).exists()]
        msg = first_line(e) or type(e).__name__
        where = p / files[0] if files else p
        raise FamfindError(where, f"the tokenizer of {p} cannot be loaded by transformers ({msg}); files there: "
                           f"{', '.join(files) or 'none'} (a bare tokenizer.json may need its tokenizer_config.json "
                           "beside it, naming the tokenizer class and its special tokens)") from None


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
        bridge_cls = bridge_class()
        p = Path(path)
        if bridge_cls is None:
            raise FamfindError(p, "not a GPT-2 checkpoint; other architectures run through TransformerLens's "
                               "TransformerBridge: pip install 'famfind[tl]'")
        import contextlib
        import io
        import logging
        import warnings

        if p.is_dir():
            _check_tokenizer(p)
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
            msg = first_line(e)
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

    def resid_parts(self, tokens: torch.Tensor, layer: int) -> ResidParts:
        if self.arch != "gpt2":
            raise FamfindError(self.path, f"recursive DFA needs GPT-2's LayerNorm and learned positions; "
                               f"this model is {self.arch}")
        return super().resid_parts(tokens, layer)

