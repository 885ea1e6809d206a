"""Shared machinery of the feature families: selection by head attribution, a random
control group, and the rows a family detector returns (public: plugins may use it).

The shape follows Kissane et al. (2024)'s automated induction analysis: *selected* features
have >= ``selection_threshold`` head attribution on one head of the role; *control*
features are a random sample (``control_size``, all if fewer) of live features with less
than ``control_max_attribution`` attribution to every head of the role (per head, as the
selection rule is; with one role head this is the paper's "< 0.1 attribution to the induction
head" of Kissane et al. 2024); both groups get the
same behavioural test; the family is the selected features that pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from famfind.activations import encode_hook
from famfind.plugins import Detection, FamilyMember, Output, Result, Validation


@dataclass(frozen=True)
class FamilyOutcome(Output):
    """A family detector's typed output (one subclass per family detector, so each type
    has one producer). ``selected``/``control``/``passed`` bool ``[d_sae]``; ``score
    [d_sae]`` float, the behaviour test's score (e.g. a pass rate in [0, 1]); ``role_heads``
    the heads selection used, as ``"layer.head"``. The counts are the validation row's."""

    family: str
    selected: torch.Tensor
    control: torch.Tensor
    score: torch.Tensor
    passed: torch.Tensor
    role_heads: list[str] = field(default_factory=list)
    confidence: torch.Tensor | None = None  # [d_sae] members' confidence (families.confidence); None: score
    n_selected: int = field(init=False)
    n_passed: int = field(init=False)
    n_control: int = field(init=False)
    n_control_passed: int = field(init=False)

    def __post_init__(self):
        for k, v in (("n_selected", self.selected), ("n_passed", self.selected & self.passed),
                     ("n_control", self.control), ("n_control_passed", self.control & self.passed)):
            object.__setattr__(self, k, int(v.sum()))

    @property
    def members(self) -> torch.Tensor:
        """bool ``[d_sae]``: the family (selected and passed)."""
        return self.selected & self.passed


@dataclass(frozen=True)
class Groups:
    """``selected``/``control`` bool ``[d_sae]``; ``role_attribution [d_sae]`` = the largest
    attribution to one role head (``0`` when there are no role heads)."""

    selected: torch.Tensor
    control: torch.Tensor
    role_attribution: torch.Tensor


def attribution_groups(attribution: torch.Tensor, heads: list[int], live: torch.Tensor,
                       selection_threshold: float, control_max_attribution: float, control_size: int,
                       generator: torch.Generator) -> Groups:
    """Selected and control features for the role heads ``heads`` (indices in the SAE's layer).

    ``attribution [d_sae, n_heads]`` (rows sum to 1), ``live`` bool ``[d_sae]``.
    """
    if heads:
        on = attribution[:, heads]
        best = on.max(1).values
    else:
        best = torch.zeros(attribution.shape[0])
    selected = live & (best >= selection_threshold) if heads else torch.zeros_like(live)
    return Groups(selected, random_control(live & (best < control_max_attribution), control_size, generator), best)


def random_control(pool: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random sample of ``size`` features (all if fewer) from bool ``pool [d_sae]``."""
    idx = torch.nonzero(pool).flatten()
    pick = idx[torch.randperm(idx.numel(), generator=generator)[:size]]
    out = torch.zeros_like(pool)
    out[pick] = True
    return out


def family_result(kind: type[FamilyOutcome], family: str, groups: Groups, score: torch.Tensor,
                  passed: torch.Tensor, evidence: dict[str, torch.Tensor] | None = None,
                  role_heads: list[str] | None = None, confidence: torch.Tensor | None = None,
                  test: str = "behaviour") -> Result:
    """Detections for the selected and control features (detection score = ``score``),
    family members (selected and passed; confidence = ``confidence``, default ``score``),
    the family's validation row, and the typed output ``kind``. ``role_heads``: the heads
    selection used (``None``: the family is not selected by head role); an empty list (no head
    of the SAE's layer has the role) gives an empty family without a validation row. ``test``:
    what ``passed`` tested (``behaviour`` or ``proxy``; :data:`famfind.plugins.TESTS`).

    ``score [d_sae]`` (float, e.g. a pass rate), ``passed`` bool ``[d_sae]``, ``evidence``:
    per-feature tensors ``[d_sae]`` copied into each detection's evidence.
    """
    confidence = score if confidence is None else confidence
    evidence = evidence or {}
    if role_heads is not None and not role_heads:  # a head-role family, no head of this layer has the role
        none = torch.zeros_like(groups.selected)
        return Result(output=kind(family, none, none, score, torch.zeros_like(none), [], confidence))
    dets, fams = [], []
    for group, mask in (("selected", groups.selected), ("control", groups.control)):
        for f in torch.nonzero(mask).flatten().tolist():
            ev = {"group": group, "role_attribution": round(float(groups.role_attribution[f]), 4)}
            ev.update({k: (round(float(v[f]), 4) if v.is_floating_point() else int(v[f])) for k, v in evidence.items()})
            dets.append(Detection(f, float(score[f]), bool(passed[f]) and group == "selected", ev))
            if group == "selected" and passed[f]:
                fams.append(FamilyMember(family, f, float(confidence[f]), test))
    out = kind(family, groups.selected, groups.control, score, passed, list(role_heads or []), confidence)
    val = Validation(family, out.n_selected, out.n_passed, out.n_control, out.n_control_passed, test=test)
    return Result(output=out, detections=dets, families=fams, validation=[val])


@torch.no_grad()
def mean_ablation(ctx, family: FamilyOutcome, n_sequences: int = 256, off_fraction: float = 0.1,
                  min_fires: int = 3) -> tuple[int, int, list[Detection]]:
    """Mean-ablate a family's role heads and count which members turn off (Kissane et al.
    2024, automated induction analysis: 443 of 450 induction features turn off).

    Every member is encoded on ``n_sequences`` random corpus sequences, clean and with each
    role head's hook_z replaced by its mean over the pass (``ctx.stats.mean_z``). A member is
    *tested* with >= ``min_fires`` clean firings and *turned off* when its ablated firing count
    is <= ``off_fraction`` x the clean count. Returns ``(tested, turned_off, detections)``
    (score = 1 - ablated/clean firings). Needs ``ctx.stats`` (``needs="activations"``)."""
    heads = [(int(n.split(".")[0]), int(n.split(".")[1])) for n in family.role_heads]
    feats = torch.nonzero(family.members).flatten()
    if not heads or feats.numel() == 0:
        return 0, 0, []
    toks_all = ctx.corpus.tokens
    n = min(n_sequences, toks_all.shape[0])
    idx = torch.randperm(toks_all.shape[0], generator=ctx.generator)[:n]
    dev = ctx.config.device
    ablate = {(lyr, h): ctx.stats.mean_z[h].to(dev) for lyr, h in heads}
    clean = torch.zeros(feats.numel(), dtype=torch.long)
    abl = torch.zeros(feats.numel(), dtype=torch.long)
    bs, fd = ctx.config.batch_size, feats.to(dev)
    for s in range(0, n, bs):
        toks = toks_all[idx[s:s + bs]].to(dev)
        clean += (encode_hook(ctx.model, ctx.sae, toks, features=fd)[1] > 0).sum((0, 1)).cpu()
        abl += (encode_hook(ctx.model, ctx.sae, toks, ablate=ablate, features=fd)[1] > 0).sum((0, 1)).cpu()
    tested = clean >= min_fires
    off = tested & (abl <= off_fraction * clean)
    dets = [Detection(int(f), float(1 - abl[i] / max(int(clean[i]), 1)), bool(off[i]),
                      {"clean_fires": int(clean[i]), "ablated_fires": int(abl[i]), "heads": list(family.role_heads)})
            for i, f in enumerate(feats.tolist()) if tested[i]]
    return int(tested.sum()), int(off.sum()), dets


def head_names(layer: int, heads: list[int]) -> list[str]:
    """``["layer.head", ...]``, the way reports name heads."""
    return [f"{layer}.{h}" for h in heads]


def role_heads(scores: torch.Tensor, threshold: float) -> list[int]:
    """Heads (indices) whose score ``[n_heads]`` reaches ``threshold``."""
    return [h for h in range(scores.numel()) if float(scores[h]) >= threshold]


def mode_per_feature(feature: torch.Tensor, key: torch.Tensor, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Most common ``key`` per feature over pairs ``(feature [n], key [n])`` (ties: the
    smallest key). Returns ``(mode [d_sae], count [d_sae])``; features without pairs get
    ``mode = -1``, ``count = 0``. Memory O(n), whatever the key range."""
    mode = torch.full((d_sae,), -1, dtype=torch.long)
    best = torch.zeros(d_sae, dtype=torch.long)
    if feature.numel() == 0:
        return mode, best
    pairs, cnt = torch.unique(torch.stack([feature.long(), key.long()], 1), dim=0, return_counts=True)
    best.scatter_reduce_(0, pairs[:, 0], cnt, reduce="amax")
    is_best = cnt == best[pairs[:, 0]]
    f_best, k_best = pairs[is_best, 0], pairs[is_best, 1]
    lead = torch.ones(f_best.numel(), dtype=torch.bool)
    lead[1:] = f_best[1:] != f_best[:-1]
    mode[f_best[lead]] = k_best[lead]
    return mode, best


def encode_last(model, sae, tokens: torch.Tensor, batch_size: int = 64, device="cpu") -> torch.Tensor:
    """SAE activations at the last position of each prompt, ``[n, d_sae]`` (CPU)."""
    out = [encode_hook(model, sae, tokens[s:s + batch_size].to(device), positions=slice(-1, None))[1][:, 0].cpu()
           for s in range(0, tokens.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, sae.d_sae)


def encode_all(model, sae, tokens: torch.Tensor, features: torch.Tensor, batch_size: int = 64,
               device="cpu") -> torch.Tensor:
    """SAE activations of ``features`` at every position, ``[n, pos, len(features)]`` (CPU)."""
    out = [encode_hook(model, sae, tokens[s:s + batch_size].to(device), features=features.to(device))[1].cpu()
           for s in range(0, tokens.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, tokens.shape[1], features.numel())
