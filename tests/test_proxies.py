"""Proxies: each built-in on hand-written text, the corpus marking (documents, kinds,
unparseable documents), the accumulators (binned AUROC, shard-merge equality), and the
context families recovering an SAE with features planted inside comments, strings and
literal blocks (tests/planted_context.py)."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

import planted_context as pc
from famfind.heuristics import proxies as P
from famfind.proxies import Document, Proxy, default_proxies, infer_kind, mark_corpus


def marked(cls, text: str, kind: str | None = None, markup: str | None = None) -> list[str]:
    """The maximal marked stretches of ``text`` (one token per character)."""
    m = cls().mark(Document.from_text(text, kind, markup))
    out, cur = [], ""
    for c, k in zip(text, m):
        if k:
            cur += c
        elif cur:
            out.append(cur)
            cur = ""
    return out + ([cur] if cur else [])


CODE = '''"""Module doc."""
import os  # a comment
def f(a, b=[1, 2]):
    """Doc of f."""
    x = "str" + 'x'
    return (a,
            b)
y = 1
'''


def test_python_proxies():
    assert marked(P.PyComment, CODE) == ["# a comment"]
    assert marked(P.PyString, CODE) == ['"str"', "'x'"]
    assert marked(P.PyDocstring, CODE) == ['"""Module doc."""', '"""Doc of f."""']
    assert marked(P.PyBrackets, CODE) == ["(a, b=[1, 2])", "(a,\n            b)"]
    body = marked(P.PyIndented, CODE)
    assert len(body) == 1 and body[0].startswith('    """Doc of f."""') and "y = 1" not in body[0]


def test_unparseable_code_raises():
    for bad in ('def f(:\n    x = "abc', "x = (1,\n", "s = 'open\n"):
        with pytest.raises(Exception):
            P.PyComment().mark(Document.from_text(bad, kind="code"))


RST = '''Title
=====

Some text with ``literal`` and (parens [x]) and "quoted words". Next sentence here.

Example::

    code here
    more code

.. note::

   A note body.

* item one
  continues
* item two

>>> 1 + 1
2

=====  =====
a      b
=====  =====
1      2
=====  =====

after
'''


def test_rst_and_prose_proxies():
    assert marked(P.CodeBlock, RST) == ["    code here\n    more code", ">>> 1 + 1\n2"]
    assert marked(P.InlineLiteral, RST) == ["``literal``"]
    assert marked(P.RstDirective, RST) == [".. note::\n\n   A note body."]
    assert marked(P.Heading, RST) == ["Title"]
    assert marked(P.ListItem, RST) == ["* item one\n  continues", "* item two"]
    assert marked(P.Table, RST) == ["=====  =====\na      b\n=====  =====\n1      2\n=====  ====="]
    assert marked(P.InQuotes, RST) == ['"quoted words"']
    assert marked(P.InParens, RST) == ["(parens [x])"]
    assert marked(P.InBrackets, RST) == ["(parens [x])"]
    assert marked(P.SentenceStart, RST) == ["Title", "Some", "Next", "Example", "A"]


def test_markdown_proxies():
    md = "# Head\n\nText `code` here.\n\n```\nfenced\n```\n\n- a\n- b\n\n| x | y |\n|---|---|\n| 1 | 2 |\n"
    assert infer_kind(md) == ("prose", "markdown")
    assert marked(P.CodeBlock, md) == ["```\nfenced\n```"]
    assert marked(P.InlineLiteral, md) == ["`code`"]
    assert marked(P.Heading, md) == ["# Head"]
    assert marked(P.ListItem, md) == ["- a", "- b"]
    assert marked(P.Table, md) == ["| x | y |\n|---|---|\n| 1 | 2 |"]


def test_mask_spans_marks_every_overlapping_token():
    doc = Document.from_text("ab cd ef", pieces=["ab", " cd", " ef"])
    assert doc.mask_spans([(4, 5)]).tolist() == [False, True, False]
    assert doc.mask_spans([(2, 3)]).tolist() == [False, True, False]  # the space of " cd"
    assert doc.mask_spans([(0, 8)]).tolist() == [True, True, True]
    assert doc.mask_spans([]).tolist() == [False, False, False]


class CharTokenizer:
    """One token per character (id = code point), ``<|endoftext|>`` = id 0."""

    def token_str(self, i):
        return "" if i == 0 else chr(i)

    def token_to_id(self, s):
        return 0 if s == "<|endoftext|>" else None


def _corpus(texts, T=16):
    ids = [i for t in texts for i in [*map(ord, t), 0]]
    ids += [0] * (-len(ids) % T)
    return torch.tensor(ids).reshape(-1, T)


class Boom(Proxy):
    id = "boom"
    description = "raises on documents containing '#'"

    def mark(self, doc):
        if "#" in doc.text:
            raise ValueError("cannot read #")
        return np.ones(doc.n_tokens, dtype=bool)


def test_mark_corpus_documents_kinds_and_unparsed():
    texts = ["x = 1  # hi\n", "Plain prose (here).\n", 'def f(:\n  "open', "More text.\n"]
    toks = _corpus(texts)
    m = mark_corpus(toks, CharTokenizer(), 128, [P.PyComment(), P.InParens(), P.DocCode(), Boom()], eot=0)
    assert m.n_docs == 4 and m.doc_kinds == {"code": 1, "prose": 3}  # the broken code does not parse: prose
    flat = toks.reshape(-1)
    text = "".join(chr(int(i)) if i else "|" for i in flat)
    got = {pid: "".join(c for c, k in zip(text, m.mask(pid).reshape(-1).tolist()) if k) for pid in m.ids}
    assert got["py_comment"] == "# hi"
    assert got["in_parens"] == "(here)"
    assert got["doc_code"] == "x = 1  # hi\n"
    assert m.docs_unparsed.tolist() == [0, 0, 0, 1] and "cannot read #" in m.errors[3]
    assert got["boom"] == "".join(texts[1:])  # every document it could read
    assert (m.doc.reshape(-1)[flat == 0] == -1).all()  # separators belong to no document
    # declared kinds win over inference; a code document cut by the corpus end is unparsed
    meta = [{"kind": "code"}, {"kind": "prose"}, {"kind": "code"}, {"kind": "prose"}]
    m2 = mark_corpus(toks, CharTokenizer(), 128, [P.PyComment()], meta, eot=0)
    assert m2.doc_kinds == {"code": 2, "prose": 2} and m2.docs_read.tolist() == [2] and m2.docs_unparsed.tolist() == [1]


def test_held_out_halves_alternate_within_each_kind():
    texts = ["a = 1\n", "b = 2\n", "Prose one.\n", "Prose two.\n", "c = 3\n", "Prose three.\n"]
    m = mark_corpus(_corpus(texts), CharTokenizer(), 128, [], eot=0)
    halves = {}
    for d, h in zip(m.doc.reshape(-1).tolist(), m.half.reshape(-1).tolist()):
        if d >= 0:
            halves[d] = h
    assert halves == {0: False, 1: True, 2: False, 3: True, 4: False, 5: False}


def test_binned_auroc_equals_sklearn_on_the_bins():
    from sklearn.metrics import roc_auc_score

    from famfind.heuristics.proxy_scores import binned_auroc

    g = torch.Generator().manual_seed(0)
    B = 5
    hist_all = torch.randint(0, 30, (3, B), generator=g)
    hist_in = (hist_all.float() * torch.rand(2, 3, B, generator=g)).long()
    zeros_all = torch.tensor([50, 10, 0])
    zeros_in = torch.tensor([[20, 3, 0], [0, 10, 0]])
    got = binned_auroc(hist_in, zeros_in, hist_all, zeros_all)
    for p in range(2):
        for f in range(3):
            inside = np.concatenate([[0] * int(zeros_in[p, f]), *[[b + 1] * int(hist_in[p, f, b]) for b in range(B)]])
            out_counts = [int(zeros_all[f] - zeros_in[p, f])] + [int(hist_all[f, b] - hist_in[p, f, b]) for b in range(B)]
            outside = np.concatenate([[b] * n for b, n in enumerate(out_counts)])
            if inside.size and outside.size:
                y = np.r_[np.ones(inside.size), np.zeros(outside.size)]
                assert float(got[p, f]) == pytest.approx(roc_auc_score(y, np.r_[inside, outside]), abs=1e-12)
            else:
                assert float(got[p, f]) == 0.5


@pytest.fixture(scope="module")
def context_paths(tmp_path_factory):
    return pc.build_all(tmp_path_factory.mktemp("planted_context"))


def _scan(paths, **kw):
    from famfind.config import ScanConfig
    from famfind.runner import run_scan

    return run_scan(ScanConfig(sae=str(paths["sae"]), corpus=str(paths["corpus"]), seq_len=64,
                               select=("context_features",), **kw))


@pytest.fixture(scope="module")
def context_scan(context_paths):
    return _scan(context_paths)


TRUTH = {"py_comment": pc.F_COMMENT, "py_string": pc.F_STRING, "code_block": pc.F_BLOCK}


@pytest.mark.parametrize("proxy", sorted(TRUTH))
def test_planted_context_features_are_recovered(context_scan, proxy):
    from famfind.heuristics.context import ContextFamilies

    cf = context_scan.output(ContextFamilies)
    fam = cf.local_context
    members = {int(f) for f in torch.nonzero(fam.members).flatten() if cf.proxies[int(fam.proxy[f])] == proxy}
    truth = set(TRUTH[proxy])
    tp = len(members & truth)
    assert tp / max(len(members), 1) >= 0.95 and tp / len(truth) >= 0.95, (proxy, sorted(members))
    assert fam.n_control > 0 and fam.n_control_passed == 0
    assert not (fam.members[pc.F_CONTROL]).any()


def test_kinds_inferred_without_the_sidecar_give_the_same_families(context_paths, context_scan, tmp_path):
    from famfind.heuristics.context import ContextFamilies

    bare = pc.build_corpus(tmp_path / "bare.npy", sidecar=False)
    res = _scan({**context_paths, "corpus": bare})
    a, b = context_scan.output(ContextFamilies), res.output(ContextFamilies)
    assert torch.equal(a.local_context.members, b.local_context.members)


def test_proxy_accumulators_merge_across_shards(context_paths, context_scan):
    from famfind.heuristics.proxy_scores import ProxyScores

    one = context_scan.output(ProxyScores)
    split = _scan(context_paths, shards=3, batch_size=7).output(ProxyScores)
    for k in ("n_pos", "n_in", "fire", "fire_in", "hist_in"):
        assert torch.equal(getattr(one, k), getattr(split, k)), k
    for k in ("mass", "mass_in"):
        assert torch.allclose(getattr(one, k), getattr(split, k), rtol=1e-9, atol=1e-6), k
    assert torch.allclose(one.auroc, split.auroc, atol=1e-12)


def test_tables_and_a_user_proxy_file(context_paths, tmp_path):
    from famfind.frames import write_scan

    user = tmp_path / "my_proxy.py"
    user.write_text("import numpy as np\nfrom famfind.proxies import Proxy\n\n"
                    "class Hash(Proxy):\n    id = 'at_hash'\n    description = 'a # token'\n    kinds = ('code',)\n\n"
                    "    def mark(self, doc):\n        return np.array([doc.text[a:b] == '#' for a, b in "
                    "zip(doc.offsets[:-1], doc.offsets[1:])])\n")
    broken = tmp_path / "broken_proxy.py"
    broken.write_text("raise RuntimeError('nope')\n")
    logs = []
    from famfind.config import ScanConfig
    from famfind.runner import run_scan

    res = run_scan(ScanConfig(sae=str(context_paths["sae"]), corpus=str(context_paths["corpus"]), seq_len=64,
                              select=("context_features",), proxies=(str(user), str(broken))), log=logs.append)
    assert any("broken_proxy.py" in m and "skipped" in m for m in logs)
    db = tmp_path / "p.duckdb"
    write_scan(db, res)
    con = duckdb.connect(str(db), read_only=True)
    rows = dict(con.execute("SELECT proxy, positions FROM proxies").fetchall())
    assert "at_hash" in rows and rows["at_hash"] > 0 and "py_comment" in rows
    n_hash = int((torch.tensor(np.load(context_paths["corpus"]).astype(np.int64)) == pc.ID["#"]).sum())
    assert rows["at_hash"] == n_hash
    # feature_proxy keeps only pairs above the floor; every planted comment feature is there
    floor = con.execute("SELECT min(mass_precision), min(lift) FROM feature_proxy").fetchone()
    assert floor[0] >= 0.5 and floor[1] >= 1.25
    got = {r[0] for r in con.execute("SELECT feature FROM feature_proxy WHERE proxy = 'py_comment'").fetchall()}
    assert set(pc.F_COMMENT) <= got
    hist = con.execute("SELECT hist_in FROM feature_proxy WHERE proxy = 'py_comment' AND feature = 0").fetchone()[0]
    assert len(hist) == 26 and sum(hist) == con.execute(
        "SELECT fires_in FROM feature_proxy WHERE proxy = 'py_comment' AND feature = 0").fetchone()[0]
    fam = con.execute("SELECT family, proxy, count(*) FROM context_family WHERE grp = 'selected' AND passed "
                      "GROUP BY ALL ORDER BY ALL").fetchall()
    assert ("local_context", "py_comment", 6) in fam and ("local_context", "py_string", 6) in fam
    con.close()
    _check_report(db, tmp_path)


def _check_report(db, tmp_path):
    """The HTML report's context-family plots (family level and on the members' cards) hold
    the stored histograms, and the page renders them in Chromium."""
    import re
    import shutil
    import subprocess

    from famfind.db import connect
    from famfind.reports.html import load_cards, render_html

    con = connect(db, read_only=True)
    try:
        page = render_html(con, 1, tmp_path / "r.html")[0]
    finally:
        con.close()
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', page.read_text(), re.S).group(1))
    fams = {(r["family"], r["proxy"]): r for r in data["context_families"]}
    com = fams[("local_context", "py_comment")]
    assert com["members"] == 6 and len(com["hist_in"]) == len(com["hist_all"]) == len(data["hist_centres"]) == 26
    assert sum(com["hist_in"]) == sum(com["hist_all"]) > 0  # comment features fire only inside comments
    cards = {f["feature"]: f for f in load_cards(page)}
    assert all(cards[f]["proxy"][0] == "py_comment" and sum(cards[f]["proxy"][4]) > 0 for f in pc.F_COMMENT)
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        return
    dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and not [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert dom.stdout.count('<div class="ctxfam"><b>local_context</b>') == len(data["context_families"]) >= 3
    assert 'title="specificity plot: py_comment"' in dom.stdout and 'title="expected-value plot: py_comment"' in dom.stdout


def test_installed_proxies_are_the_documented_builtins():
    reg = default_proxies()
    assert not reg.errors
    assert set(reg.ids()) == {"py_comment", "py_string", "py_docstring", "py_brackets", "py_indented", "code_block",
                              "inline_literal", "rst_directive", "heading", "list_item", "table", "in_quotes",
                              "in_parens", "in_brackets", "sentence_start", "doc_code", "doc_prose", "doc_start"}
    assert {e.cls.context for e in reg.entries.values()} == {"local", "high_level"}


def test_shipped_eval_docs_metadata_matches_the_data_card():
    from famfind.corpus import default_dir

    docs = json.loads((default_dir() / "eval_tokens.docs.json").read_text())["documents"]
    toks = np.load(default_dir() / "eval_tokens.npy")
    assert len(docs) == int((toks == 0).sum())  # one entry per <|endoftext|>-terminated document
    card = (default_dir() / "DATA_CARD.md").read_text()
    n_prose, n_code = sum(d["kind"] == "prose" for d in docs), sum(d["kind"] == "code" for d in docs)
    assert f"| held-out | {n_prose} |" in card and f"| {n_code} |" in card


def test_candidate_families_find_the_unexplained_prose_features(context_paths):
    """The planted prose-word features fire only in prose documents but read their own token
    (no family's mechanism fits): they are in no family, cluster together, and the candidate's
    best proxy is the document kind, validated on the held-out documents; the mixed controls'
    candidate is not validated."""
    import polars as pl

    from famfind.config import ScanConfig
    from famfind.runner import run_scan

    res = run_scan(ScanConfig(sae=str(context_paths["sae"]), corpus=str(context_paths["corpus"]), seq_len=64,
                              select=("candidate_families",),
                              detector_options={"candidate_families": {"min_size": 4, "features_per_cluster": 8}}))
    df = res.sae().results["candidate_families"].tables["candidate_families"]
    val = df.filter(pl.col("validated"))
    assert val.height == 1, df
    row = val.row(0, named=True)
    assert set(row["features"]) == set(pc.F_PROSE) and row["proxy"] == "doc_prose"
    assert row["mass_precision_b"] >= 0.8 and row["mass_precision_b"] >= 2 * row["control_mass_precision_b"]
    families = {m.feature for r in res.sae().results.values() for m in r.families}
    assert not families & {f for fs in df["features"].to_list() for f in fs}  # candidates hold no family member


def test_readme_proxy_example_runs():
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(import re\n\nfrom famfind.proxies import Proxy\n.*?)```", readme, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    text = "def f(x):\n    return x + 1\n"
    assert marked(ns["AfterReturn"], text, kind="code") == ["return x + 1"]
