"""``famfind feature SAE FEATURE``: one feature's page in the terminal, read from the database.

What a researcher checks by hand (the seed post's method, Kissane et al. 2024): the mechanism
record and its causal tests (``feature_mechanism``), the families it is in and what each
tested, head attribution, DFA by source on its top examples with the source tokens marked, the
tokens it boosts and suppresses on the direct path, and its top-activating contexts. Every
block is plain text that wraps at the console's width (80 columns in a pipe); stored text is
printed literally, with newlines and tabs shown as ``↵`` and ``→``.
"""

from __future__ import annotations

import json

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from famfind.activations import WINDOW
from famfind.db import table_exists
from famfind.errors import FamfindError
from famfind.reports import rows as _rows, scan_saes, visible

BAR = 20  # characters of a full bar


def resolve_sae(con, scan_id: int, sae: str) -> dict:
    """The scan's SAE named ``sae``: its name (``blocks.1.attn.hook_z``) or its layer (``1``).
    Raises ``FamfindError`` listing the SAEs of the scan."""
    saes = scan_saes(con, scan_id)
    hits = [u for u in saes if u["sae"] == sae or (sae.isdigit() and u["layer"] == int(sae))]
    if len(hits) != 1:
        raise FamfindError("SAE", f"{sae!r} {'matches several' if hits else 'is not in'} scan {scan_id}; "
                           f"its SAEs: {', '.join(u['sae'] for u in saes)} (name or layer)")
    return hits[0]


def render_feature(con, scan_id: int, sae: str, feature: int, console: Console) -> None:
    """Print feature ``feature`` of SAE ``sae`` (name or layer) of scan ``scan_id``. Raises
    ``FamfindError`` for an unknown SAE or a feature outside ``[0, d_sae)``."""
    u = resolve_sae(con, scan_id, sae)
    name = u["sae"]
    if not 0 <= feature < u["d_sae"]:
        raise FamfindError("FEATURE", f"{feature} is outside [0, {u['d_sae']}) of {name}")
    st = _rows(con, "SELECT * FROM features WHERE scan_id = ? AND sae = ? AND feature = ?", scan_id, name, feature)[0]
    head = Text(f"feature {feature} of {name} (layer {u['layer']}), scan {scan_id}\n", style="bold")
    head.append(f"fires at {st['fire_count']:,} positions (density {st['density']:.2e}); mean activation "
                f"{st['mean_act']:.3f}, max {st['max_act']:.3f}" + ("; dead" if st["dead"] else ""))
    console.print(Panel(head, expand=False))
    _mechanism(con, scan_id, name, feature, console)
    _families(con, scan_id, name, feature, console)
    _heads(con, scan_id, name, feature, console)
    _sources(con, scan_id, name, feature, console)
    _logits(con, scan_id, name, feature, console)
    _contexts(con, scan_id, name, feature, console)


def _section(console: Console, title: str) -> None:
    console.print(Text(title, style="bold underline"))


def _mechanism(con, scan_id, name, feature, console) -> None:
    if not table_exists(con, "feature_mechanism"):
        return
    r = _rows(con, "SELECT * FROM feature_mechanism WHERE scan_id = ? AND sae = ? AND feature = ?",
              scan_id, name, feature)
    _section(console, "Mechanism record (DFA by source; tested by token substitution on held-out positions)")
    if not r:
        console.print(Text("no record (a dead feature, or feature_mechanism did not run)"))
        return
    r = r[0]
    if r["mechanism"] is None:
        console.print(Text("no position with a positive DFA source: the feature's bias carries it"))
        return
    toks = ", ".join(repr(visible(t)) for t in r["source_token_strs"][:8])
    more = len(r["source_token_strs"]) - 8
    cur = ", ".join(repr(visible(t)) for t in r["current_token_strs"][:8])
    morec = len(r["current_token_strs"]) - 8
    lines = [
        f"{r['mechanism']} via head {r['top_head']}: reads {{{toks}{', ...' if more > 0 else ''}}} at distance "
        f"{r['top_distance']} (median of the top source; formed on {r['n_formed']} positions)",
        "mass of top sources by distance: " + ", ".join(
            f"{lab} {r[c]:.0%}" for lab, c in (("0", "share_d0"), ("1", "share_d1"), ("2-8", "share_d2_8"),
                                                ("9-32", "share_d9_32"), (">32", "share_d33_plus"))),
        f"source token set: {r['n_source_tokens']} tokens cover 80% of the mass (top token "
        f"{r['top_source_token_share']:.0%}); current tokens: {{{cur}{', ...' if morec > 0 else ''}}} "
        f"({r['n_current_tokens']}, top {r['top_current_token_share']:.0%})",
    ]
    if r["necessity"] is None:
        summ = con.execute("SELECT summary FROM detector_runs WHERE scan_id = ? AND sae = ? AND "
                           "detector = 'feature_mechanism'", [scan_id, name]).fetchone()
        s = json.loads(summ[0]) if summ and summ[0] else {}
        sampled = s.get("n_chosen", s.get("n_records", 0)) < s.get("n_records", 0)
        lines.append(f"untested: {r['n_tested']} held-out positions"
                     + (" (this scan tested a random sample of the records: option max_tested)" if sampled else ""))
    else:
        lines.append(f"necessity {r['necessity']:.2f} on {r['n_tested']} held-out positions (replacing the top "
                     f"source's token removes >= 50%; median drop {r['median_drop']:.0%}); control (a random other "
                     f"source) {r['necessity_control']:.2f}; " + ("validated" if r["validated"] else "not validated"))

    def f2(x):
        return "-" if x is None else f"{x:.2f}"

    lines.append(f"sufficiency (source set planted at distance {r['top_distance']} where it is silent): "
                 f"{f2(r['sufficiency'])} of {r['n_windows']} windows (control {f2(r['sufficiency_control'])}); in "
                 f"context (its current tokens): {f2(r['sufficiency_in_context'])} of {r['n_in_context']} (control "
                 f"{f2(r['sufficiency_in_context_control'])})")
    for line in lines:
        console.print(Text(line))


def _families(con, scan_id, name, feature, console) -> None:
    fams = _rows(con, "SELECT family, test, confidence, is_primary, detector FROM families WHERE scan_id = ? AND "
                      "sae = ? AND feature = ? ORDER BY is_primary DESC, confidence DESC", scan_id, name, feature)
    _section(console, "Families")
    if not fams:
        console.print(Text("in no family"))
    for f in fams:
        console.print(Text(f"{f['family']}{' (primary)' if f['is_primary'] else ''}: {f['test']} test, confidence "
                           f"{f['confidence']:.2f} ({f['detector']})"))


def _bar(x: float) -> str:
    n = max(0, min(BAR, round(x * BAR)))
    return "█" * n + "·" * (BAR - n)


def _heads(con, scan_id, name, feature, console) -> None:
    if not table_exists(con, "head_attribution"):
        return
    att = _rows(con, "SELECT layer, head, attribution FROM head_attribution WHERE scan_id = ? AND sae = ? AND "
                     "feature = ? ORDER BY head", scan_id, name, feature)
    _section(console, "Head attribution (share of the decoder norm per head)")
    for a in att:
        console.print(Text(f"{a['layer']}.{a['head']:<3} {_bar(a['attribution'])} {a['attribution']:.2f}"))


def _marked(tokens: list[str], pos: int, src: dict[int, str]) -> Text:
    """A window's tokens, the firing token in reverse video, source tokens underlined and
    labelled (``[src]``), all literal."""
    t = Text()
    for i, tok in enumerate(tokens):
        s = visible(tok)
        if i == pos:
            t.append(s, style="reverse")
        elif i in src:
            t.append(s, style="underline bold")
            t.append(f"[{src[i]}]", style="dim")
        else:
            t.append(s)
    return t


def _sources(con, scan_id, name, feature, console) -> None:
    if not table_exists(con, "dfa_source"):
        return
    ex = {r["rank"]: r for r in _rows(con, "SELECT rank, seq, pos, act, tokens FROM examples WHERE scan_id = ? AND "
                                           "sae = ? AND feature = ? ORDER BY rank", scan_id, name, feature)}
    src = _rows(con, "SELECT example_rank, source_rank, src_pos, distance, token_str, share FROM dfa_source WHERE "
                     "scan_id = ? AND sae = ? AND feature = ? ORDER BY example_rank, source_rank", scan_id, name, feature)
    if not src:
        return
    _section(console, "DFA by source on the top examples (firing token reversed; sources underlined, "
                      "[rank: share of the heads' pre-activation])")
    by: dict[int, list[dict]] = {}
    for r in src:
        by.setdefault(r["example_rank"], []).append(r)
    for rank, rs in by.items():
        e = ex.get(rank)
        if e is None or e["tokens"] is None:
            continue
        lo = max(0, e["pos"] + WINDOW[0])
        marks = {r["src_pos"] - lo: f"{r['source_rank']}: {r['share']:.2f}" for r in rs
                 if 0 <= r["src_pos"] - lo < len(e["tokens"]) and r["src_pos"] != e["pos"]}
        line = Text(f"{e['act']:.2f}  ")
        line.append(_marked(list(e["tokens"]), e["pos"] - lo, marks))
        console.print(line)
        far = [r for r in rs if not 0 <= r["src_pos"] - lo < len(e["tokens"])]
        top = rs[0]
        console.print(Text(f"      top source {visible(top['token_str'])!r} at distance {top['distance']} (share "
                           f"{top['share']:.2f})" + (f"; {len(far)} outside the window" if far else ""), style="dim"))


def _logits(con, scan_id, name, feature, console) -> None:
    if not table_exists(con, "feature_logits"):
        return
    for direction in ("boost", "suppress"):
        r = _rows(con, "SELECT token_str, logit FROM feature_logits WHERE scan_id = ? AND sae = ? AND feature = ? AND "
                       "direction = ? ORDER BY rank LIMIT 8", scan_id, name, feature, direction)
        if r:
            console.print(Text(f"{'boosts' if direction == 'boost' else 'suppresses'} (direct path): "
                               + ", ".join(f"{visible(x['token_str'])!r} {x['logit']:+.2f}" for x in r)))


def _contexts(con, scan_id, name, feature, console) -> None:
    ex = _rows(con, "SELECT rank, act, tokens, acts FROM examples WHERE scan_id = ? AND sae = ? AND feature = ? "
                    "ORDER BY rank", scan_id, name, feature)
    if not ex:
        return
    _section(console, "Top-activating contexts (activation per token: bold > 50% of max, underline > 0)")
    t = Table(show_header=True, box=None, pad_edge=False)
    t.add_column("act", justify="right", no_wrap=True)
    t.add_column("context", overflow="fold")
    for e in ex:
        mx = max(e["acts"] or [0]) or 1.0
        txt = Text()
        for tok, a in zip(e["tokens"], e["acts"] or [0] * len(e["tokens"])):
            txt.append(visible(tok), style="bold" if a > 0.5 * mx else ("underline" if a > 0 else ""))
        t.add_row(f"{e['act']:.2f}", txt)
    console.print(t)
