"""A scan's inputs: its SAEs (paths, or folders of SAE folders), the model they name and the
checks that they fit it. The corpus is read by :func:`famfind.corpus.load_corpus`.
"""

from __future__ import annotations

from pathlib import Path

from famfind.corpus import default_dir
from famfind.errors import FamfindError
from famfind.models.base import AttnModel
from famfind.sae import SAE, load_sae, sae_paths


def resolve_model_spec(sae: SAE, model: str | None, sae_path: Path) -> str:
    """``--model``, else the SAE's ``model_name`` (a path relative to the SAE is resolved)."""
    spec = model or sae.model_name
    if not spec:
        raise FamfindError(sae_path, "SAE metadata has no model_name; pass --model")
    for base in (sae_path if sae_path.is_dir() else sae_path.parent, Path.cwd()):
        cand = base / spec
        if cand.is_dir():
            return str(cand.resolve())
    return spec


def check_compatible(sae: SAE, model: AttnModel) -> None:
    """``d_in == n_heads * d_head`` and the layer exists; raises ``FamfindError`` naming the SAE."""
    c = model.cfg
    if sae.layer >= c.n_layers:
        raise FamfindError(sae.cfg_path or sae.path, f"SAE hook {sae.hook_name} is beyond the model's {c.n_layers} layers")
    if sae.d_in != c.n_heads * c.d_head:
        raise FamfindError(sae.path, f"d_in={sae.d_in} but the model's hook_z has n_heads*d_head = "
                           f"{c.n_heads}*{c.d_head} = {c.n_heads * c.d_head}")


def load_saes(specs: tuple[str, ...], model: str | None, device: str = "cpu",
              hook: str | None = None) -> tuple[list[tuple[str, Path, SAE]], str]:
    """Every SAE the specs name (paths, or folders of SAE folders; none: the embedded default's
    release folder), as ``(name, path, sae)`` in layer order, and the model spec they share.
    ``hook``: the hook of SAEs whose format does not record one (:func:`famfind.sae.load_sae`).
    Names are hook names (plus ``/file name`` when two SAEs share a hook). Raises
    ``FamfindError`` naming the SAE whose ``model_name`` disagrees with the first's (unless
    ``model`` is given)."""
    paths = [q for spec in (specs or (str(default_dir() / "saes"),)) for q in sae_paths(spec)]
    loaded = [(q, load_sae(q, hook).to(device)) for q in paths]
    spec0 = resolve_model_spec(loaded[0][1], model, loaded[0][0])
    if model is None:  # every SAE names the first one's model
        for q, sae in loaded[1:]:
            other = resolve_model_spec(sae, None, q)
            if other != spec0:
                raise FamfindError(q, f"model_name resolves to {other!r}, but the first SAE's to {spec0!r}: "
                                   "SAEs of one scan must share a model (or pass --model)")
    loaded.sort(key=lambda x: x[1].layer)
    hooks = [s.hook_name for _, s in loaded]
    names, out = set(), []
    for q, sae in loaded:
        name = sae.hook_name if hooks.count(sae.hook_name) == 1 else f"{sae.hook_name}/{q.name}"
        while name in names:
            name += "'"
        names.add(name)
        out.append((name, q, sae))
    return out, spec0
