"""The bad-input contract, case by case: every bad SAE, model, tokenizer, corpus, config, CLI
option, database, SQL statement, hostile text, plugin, interrupt and kill gives exit 1 (2 for
a usage error, 130 for Ctrl-C), one stderr line naming the file or option and the problem, no
traceback, and no rows (no database file when the scan was to create it).

Scans run on the planted model/SAE (tests/planted.py) with the cheapest detector selection
that reaches the code under test; interrupts, kills and locks run ``famfind`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli_util import check, n_scans, one_line
from famfind.cli import app

FAST = ("--select", "head_attribution")  # weights only: a scan in about a second


@pytest.fixture()
def runner():
    return CliRunner()


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- SAE -----------------------------------------------------------------------------------

def _sae_cfg(p):
    return json.loads((p / "cfg.json").read_text())


def _sae_with(tmp, planted, cfg=None, weights=None) -> Path:
    d = copy_dir(planted["sae"], tmp / "sae")
    if cfg is not None:
        c = cfg(_sae_cfg(d))
        (d / "cfg.json").write_text(c if isinstance(c, str) else json.dumps(c))
    if weights is not None:
        w = load_file(str(d / "sae_weights.safetensors"))
        weights(w)
        save_file(w, str(d / "sae_weights.safetensors"))
    return d


def _set(d, k, v):
    d[k] = v
    return d


def _nan(w, name, n, val):
    w[name].view(-1)[:n] = val


SAE_CASES = {
    "cfg_not_an_object": (dict(cfg=lambda c: "[1, 2]"), ["cfg.json", "Input should be a valid dictionary"]),
    "d_in_not_a_number": (dict(cfg=lambda c: _set(c, "d_in", "wide")), ["cfg.json", "d_in", "valid integer"]),
    "unknown_architecture": (dict(cfg=lambda c: _set(c, "architecture", "gated")), ["cfg.json", "architecture"]),
    "topk_without_k": (dict(cfg=lambda c: _set(c, "architecture", "topk")), ["cfg.json", "no 'k'"]),
    "hook_not_hook_z": (dict(cfg=lambda c: _set(c, "metadata", {**c["metadata"], "hook_name": "blocks.1.hook_resid_post"})),
                        ["cfg.json", "not an attention hook_z site"]),
    "weights_garbage": (dict(cfg=lambda c: c), ["sae_weights.safetensors", "not a readable safetensors file"]),
    "tensor_missing": (dict(weights=lambda w: w.pop("b_enc")), ["sae_weights.safetensors", "missing tensor 'b_enc'"]),
    "nan_in_W_enc": (dict(weights=lambda w: _nan(w, "W_enc", 7, float("nan"))),
                     ["sae_weights.safetensors", "W_enc has 7 non-finite values"]),
    "inf_in_W_dec": (dict(weights=lambda w: _nan(w, "W_dec", 2703, float("inf"))),
                     ["sae_weights.safetensors", "W_dec has 2703 non-finite values"]),
    "integer_weights": (dict(weights=lambda w: w.__setitem__("b_dec", w["b_dec"].long())),
                        ["sae_weights.safetensors", "b_dec has dtype torch.int64"]),
}


@pytest.mark.parametrize("case", SAE_CASES)
def test_bad_sae(runner, planted_paths, tmp_path, seq64, case):
    kw, needles = SAE_CASES[case]
    d = _sae_with(tmp_path, planted_paths, **kw)
    if case == "weights_garbage":
        (d / "sae_weights.safetensors").write_bytes(b"\x00garbage" * 10)
    db = tmp_path / "x.duckdb"
    r = runner.invoke(app, ["scan", str(d), "--corpus", str(planted_paths["corpus"]), "--config", seq64,
                            "--db", str(db), *FAST])
    check(r, 1, str(d), *needles)
    assert not db.exists()


def _kissane(tmp, cfg: bool, garbage: bool = False) -> Path:
    """A Kissane-format ``sae.pt`` (W_enc, W_dec, b_enc, b_dec), with or without ``sae_cfg.json``."""
    p = tmp / "k" / "sae.pt"
    p.parent.mkdir()
    if garbage:
        p.write_bytes(b"PK\x03\x04 not a torch zip")
    else:
        torch.save({"W_enc": torch.zeros(256, 8), "W_dec": torch.zeros(8, 256), "b_enc": torch.zeros(8),
                    "b_dec": torch.zeros(256)}, p)
    if cfg:
        (p.parent / "sae_cfg.json").write_text(json.dumps({"act_name": "z", "layer": 1, "act_size": 256, "dict_size": 8}))
    return p


def _sparsify_garbage(tmp) -> Path:
    d = tmp / "sp"
    d.mkdir()
    (d / "cfg.json").write_text(json.dumps({"num_latents": 8, "k": 2, "d_in": 256}))
    (d / "sae.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{oops}")
    return d


LOADER_CASES = {  # each loader that can raise from a third-party library: one line naming the file
    "kissane_pt_without_its_cfg": (lambda t: _kissane(t, cfg=False), ["sae.pt", "sae_cfg.json is missing"]),
    "kissane_pt_garbage": (lambda t: _kissane(t, cfg=True, garbage=True), ["sae.pt", "torch file"]),
    "gemma_scope_npz_garbage": (lambda t: ((t / "params.npz").write_bytes(b"PK\x03\x04garbage"), t / "params.npz")[1],
                                ["params.npz", "cannot read it as a gemma-scope-npz SAE", "BadZipFile"]),
    "sparsify_weights_garbage": (_sparsify_garbage, ["sae.safetensors"]),
}


@pytest.mark.parametrize("case", LOADER_CASES)
def test_sae_loader_errors_name_their_file(runner, planted_paths, tmp_path, seq64, case):
    make, needles = LOADER_CASES[case]
    path = make(tmp_path)
    db = tmp_path / "x.duckdb"
    r = runner.invoke(app, ["scan", str(path), "--corpus", str(planted_paths["corpus"]), "--config", seq64,
                            "--hook", "blocks.1.attn.hook_z", "--model", str(planted_paths["model"]), "--db", str(db),
                            *FAST])
    check(r, 1, *needles)
    assert not db.exists()


def test_a_tokenizer_transformers_cannot_load_names_its_file(runner, planted_paths, tmp_path):
    """A bare tokenizer.json beside a Gemma config: transformers picks GemmaTokenizerFast, which
    needs ``<unk>``; the error names the tokenizer file and its folder."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the [test] extra")
    pytest.importorskip("transformer_lens.model_bridge", reason="the bridge needs TransformerLens >= 3.9")
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path / "gemma2"
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=64)
    transformers.Gemma2ForCausalLM(cfg).save_pretrained(d)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    db = tmp_path / "x.duckdb"
    r = runner.invoke(app, ["scan", str(planted_paths["sae_l0"]), "--model", str(d), "--corpus",
                            str(planted_paths["corpus"]), "--db", str(db), *FAST])
    check(r, 1, str(d / "tokenizer.json"), "cannot be loaded by transformers", "<unk>")
    assert not db.exists()


def test_a_corrupt_parquet_corpus_names_its_file(runner, planted_paths, tmp_path, seq64):
    p = tmp_path / "c.parquet"
    p.write_bytes(b"PAR1 this is not parquet PAR1")
    r = runner.invoke(app, ["scan", str(planted_paths["sae"]), "--corpus", str(p), "--config", seq64,
                            "--db", str(tmp_path / "x.duckdb"), *FAST])
    check(r, 1, "c.parquet")


# --- model and tokenizer --------------------------------------------------------------------

def _model_with(tmp, planted, cfg=None, weights=None, tokenizer=None) -> Path:
    d = copy_dir(planted["model"], tmp / "model")
    if cfg is not None:
        (d / "config.json").write_text(json.dumps(cfg(json.loads((d / "config.json").read_text()))))
    if weights is not None:
        w = load_file(str(d / "model.safetensors"))
        out = weights(w)
        if isinstance(out, bytes):
            (d / "model.safetensors").write_bytes(out)
        else:
            save_file(w, str(d / "model.safetensors"))
    if tokenizer is not None:
        (d / "tokenizer.json").write_text(tokenizer)
    return d


MODEL_CASES = {
    "n_layer_null": (dict(cfg=lambda c: _set(c, "n_layer", None)), ["config.json", "n_layer", "valid integer"]),
    "n_head_zero": (dict(cfg=lambda c: _set(c, "n_head", 0)), ["config.json", "n_head", "greater than 0"]),
    "n_embd_not_divisible": (dict(cfg=lambda c: _set(c, "n_embd", 250)),
                             ["config.json", "n_embd=250 is not a multiple of n_head=4"]),
    "config_disagrees_with_weights": (dict(cfg=lambda c: _set(c, "n_embd", 128)),
                                      ["model.safetensors", "'wte.weight' has shape [64, 256]", "[64, 128]"]),
    "config_not_json": (dict(cfg=None), ["config.json", "not valid JSON"]),
    "weights_garbage": (dict(weights=lambda w: b"\x00\x01not safetensors"),
                        ["model.safetensors", "not a readable safetensors file"]),
    "tensor_missing": (dict(weights=lambda w: w.pop("transformer.h.0.attn.c_attn.weight")),
                       ["model.safetensors", "missing tensor 'h.0.attn.c_attn.weight'"]),
    "nan_weights": (dict(weights=lambda w: _nan(w, "transformer.h.1.mlp.c_fc.weight", 4, float("nan"))),
                    ["model.safetensors", "'h.1.mlp.c_fc.weight' has 4 non-finite values"]),
    "tokenizer_invalid": (dict(tokenizer="{not a tokenizer"), ["tokenizer.json", "not a valid tokenizers file"]),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model(runner, planted_paths, tmp_path, seq64, case):
    kw, needles = MODEL_CASES[case]
    d = _model_with(tmp_path, planted_paths, **kw)
    if case == "config_not_json":
        (d / "config.json").write_text("{")
    db = tmp_path / "x.duckdb"
    r = runner.invoke(app, ["scan", str(planted_paths["sae"]), "--model", str(d), "--corpus",
                            str(planted_paths["corpus"]), "--config", seq64, "--db", str(db), *FAST])
    line = check(r, 1, *needles)
    assert "sae" not in line.split(":")[2]  # blamed on the model's file, not the SAE
    assert not db.exists()


# --- corpus ---------------------------------------------------------------------------------

def _parquet(path: Path, values) -> Path:
    import polars as pl

    pl.DataFrame({"text": values}).write_parquet(path)
    return path


CORPUS_CASES = {
    "float_npy_not_whole": (lambda t: (np.save(t / "c.npy", np.array([1.0, 2.7] * 100)), t / "c.npy")[1],
                            ["c.npy", "token ids must be integers; 100 of 200 float64 values are not whole numbers"]),
    "nan_npy": (lambda t: (np.save(t / "c.npy", np.array([1.0, np.nan] * 100)), t / "c.npy")[1],
                ["c.npy", "not whole numbers"]),
    "string_npy": (lambda t: (np.save(t / "c.npy", np.array(["a", "b"] * 100)), t / "c.npy")[1],
                   ["c.npy", "token ids must be integers, got dtype <U1"]),
    "npy_garbage": (lambda t: ((t / "c.npy").write_bytes(b"not numpy"), t / "c.npy")[1],
                    ["c.npy", "not a readable .npy token array"]),
    "ids_out_of_vocab": (lambda t: (np.save(t / "c.npy", np.full(200, 9999, dtype=np.uint16)), t / "c.npy")[1],
                         ["c.npy", "token ids must lie in [0, 64)"]),
    "too_short": (lambda t: (np.save(t / "c.npy", np.arange(10)), t / "c.npy")[1],
                  ["c.npy", "fewer than one sequence of 64"]),
    "parquet_int_text": (lambda t: _parquet(t / "c.parquet", [1, 2, 3]),
                         ["c.parquet", "column 'text' has type BIGINT, expected strings"]),
    "parquet_no_text": (lambda t: (__import__("polars").DataFrame({"body": ["x"]}).write_parquet(t / "c.parquet"),
                                   t / "c.parquet")[1], ["c.parquet", "cannot read a 'text' column"]),
    "jsonl_bad_line": (lambda t: ((t / "c.jsonl").write_text('{"text": "a"}\n{oops\n'), t / "c.jsonl")[1],
                       ["c.jsonl", "line 2 is not valid JSON"]),
    "text_without_tokenizer": (lambda t: ((t / "c.txt").write_text("hello " * 100), t / "c.txt")[1],
                               ["c.txt", "the model has no tokenizer"]),
    "missing": (lambda t: t / "nope.npy", ["nope.npy", "file not found"]),
}


@pytest.mark.parametrize("case", CORPUS_CASES)
def test_bad_corpus(runner, planted_paths, tmp_path, seq64, case):
    make, needles = CORPUS_CASES[case]
    corpus = make(tmp_path)
    db = tmp_path / "x.duckdb"
    r = runner.invoke(app, ["scan", str(planted_paths["sae"]), "--corpus", str(corpus), "--config", seq64,
                            "--db", str(db), *FAST])
    check(r, 1, *needles)
    assert not db.exists()


def test_whole_float_corpus_is_read(runner, planted_paths, tmp_path, seq64):
    """A float .npy whose values are all whole numbers is a token array (read exactly)."""
    toks = np.load(planted_paths["corpus"])
    np.save(tmp_path / "f.npy", toks.astype(np.float32))
    db = tmp_path / "x.duckdb"
    r = runner.invoke(app, ["scan", str(planted_paths["sae"]), "--corpus", str(tmp_path / "f.npy"), "--config",
                            seq64, "--db", str(db), "-q", *FAST])
    assert r.exit_code == 0, r.output
    con = duckdb.connect(str(db), read_only=True)
    n = con.execute("SELECT n_tokens FROM scans").fetchall()[0][0]
    con.close()
    assert n == toks.size // 64 * 64


# --- config file and CLI options --------------------------------------------------------------

CONFIG_CASES = {
    "scan_not_a_table": ("scan = 5\n", ["'scan' must be a table"]),
    "detectors_not_tables": ("[detectors]\nhead_roles = 3\n", ["detectors.head_roles", "valid dictionary"]),
    "max_tokens_string": ("[scan]\nmax_tokens = \"1000\"\n", ["[scan] max_tokens", "valid integer", "'1000'"]),
    "max_tokens_float": ("[scan]\nmax_tokens = 1000.5\n", ["[scan] max_tokens", "valid integer", "1000.5"]),
    "max_tokens_negative": ("[scan]\nmax_tokens = -5\n", ["[scan] max_tokens", "greater than 0", "-5"]),
    "batch_size_zero": ("[scan]\nbatch_size = 0\n", ["[scan] batch_size", "greater than 0"]),
    "batch_size_negative": ("[scan]\nbatch_size = -2\n", ["[scan] batch_size", "greater than 0"]),
    "batch_size_string": ("[scan]\nbatch_size = \"big\"\n", ["[scan] batch_size", "valid integer"]),
    "seq_len_zero": ("[scan]\nseq_len = 0\n", ["[scan] seq_len", "greater than 0"]),
    "shards_bool": ("[scan]\nshards = true\n", ["[scan] shards", "valid integer"]),
    "unknown_key": ("[scan]\nbogus = 1\n", ["[scan] unknown key 'bogus'", "batch_size"]),
    "unknown_section": ("[scna]\nseq_len = 64\n", ["unknown section [scna]"]),
    "not_toml": ("[scan\n", ["not valid TOML"]),
    "detector_option_type": ("[scan]\nseq_len = 64\n[detectors.induction_behaviour]\nn_sequences = \"many\"\n",
                             ["induction_behaviour", "n_sequences='many' is not a valid int"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_file(runner, planted_paths, tmp_path, case):
    text, needles = CONFIG_CASES[case]
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    db = tmp_path / "x.duckdb"
    r = runner.invoke(app, ["scan", str(planted_paths["sae"]), "--corpus", str(planted_paths["corpus"]),
                            "--config", str(cfg), "--db", str(db)])
    line = check(r, 1, *needles)
    if case != "detector_option_type":
        assert "bad.toml" in line
    assert not db.exists()


OPTION_CASES = {
    "max_tokens_negative": (["--max-tokens", "-5"], ["--max-tokens", "1"]),  # click: "x>=1" or "greater than or equal to 1"
    "max_tokens_zero": (["--max-tokens", "0"], ["--max-tokens"]),
    "max_tokens_text": (["--max-tokens", "lots"], ["--max-tokens", "valid integer"]),
    "lock_timeout_negative": (["--lock-timeout", "-1"], ["--lock-timeout"]),
    "unknown_option": (["--no-such-option"], ["No such option"]),
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_usage_errors_are_one_line_exit_2(runner, planted_paths, tmp_path, case):
    extra, needles = OPTION_CASES[case]
    db = tmp_path / "x.duckdb"
    r = runner.invoke(app, ["scan", str(planted_paths["sae"]), "--db", str(db), *extra])
    check(r, 2, "famfind: usage error:", *needles)
    assert not db.exists()


def test_other_option_errors(runner, planted_paths, tmp_path, seq64):
    db = tmp_path / "x.duckdb"
    base = ["scan", str(planted_paths["sae"]), "--corpus", str(planted_paths["corpus"]), "--db", str(db)]
    check(runner.invoke(app, [*base, "--set", "nodot=1"]), 1, "--set", "DETECTOR.KEY=VALUE")
    check(runner.invoke(app, [*base, "--config", seq64, "--select", "no_such"]), 1, "'no_such'", "unknown; known:")
    cfg = tmp_path / "long.toml"
    cfg.write_text("[scan]\nseq_len = 65\n")
    check(runner.invoke(app, [*base, "--config", str(cfg), *FAST]), 1, "seq_len", "n_ctx=64")
    check(runner.invoke(app, [*base, "--config", seq64, "--device", "tpu", *FAST]), 1, "device", "'tpu'", "cpu, cuda")
    # a choice among fixed values is a usage error (exit 2), like a negative --max-tokens
    check(runner.invoke(app, [*base, "--config", seq64, "--autocast", "fp8", *FAST]), 2, "--autocast", "'fp8'", "'bf16'")
    check(runner.invoke(app, [*base, "--config", seq64, "--model-backend", "tl5", *FAST]), 2, "--model-backend",
          "'bridge'")
    bad = tmp_path / "fp8.toml"  # in a --config file it is bad input in that file (exit 1, naming it)
    bad.write_text("[scan]\nseq_len = 64\nautocast = \"fp8\"\n")
    check(runner.invoke(app, [*base, "--config", str(bad), *FAST]), 1, "fp8.toml", "autocast", "'bf16'")
    if not torch.cuda.is_available():
        check(runner.invoke(app, [*base, "--config", seq64, "--device", "cuda", *FAST]), 1, "device", "no CUDA GPU")
    check(runner.invoke(app, ["sql", "SELECT 1", "--json", "--csv"]), 2, "--json and --csv are exclusive")
    check(runner.invoke(app, ["label", "--features", "x", "--db", str(db)]), 1, "database not found")
    assert not db.exists()


def test_a_ray_address_where_no_cluster_answers_fails_fast(planted_paths, seq64, tmp_path):
    """``--ray HOST:PORT`` with nothing there: one line naming the address within ~30 s (Ray's
    own log lines kept off the terminal), exit 1, nothing written."""
    pytest.importorskip("ray", reason="ray is in the test extra: pip install '.[test]'")
    db = tmp_path / "r.duckdb"
    t0 = time.time()
    code, out, err = finish(famfind_proc(["scan", str(planted_paths["sae"]), "--corpus", str(planted_paths["corpus"]),
                                          "--config", seq64, "--db", str(db), "--ray", "127.0.0.1:1", *FAST]))
    assert code == 1 and time.time() - t0 < 30
    one_line(err, out, "--ray", "no Ray cluster answered at '127.0.0.1:1'")
    assert not db.exists()


# --- database and SQL --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stored(planted_paths, tmp_path_factory, seq64):
    """A database holding one fast planted scan (copy it before writing)."""
    db = tmp_path_factory.mktemp("stored") / "s.duckdb"
    r = CliRunner().invoke(app, ["scan", str(planted_paths["sae"]), "--corpus", str(planted_paths["corpus"]),
                                 "--config", seq64, "--db", str(db), "-q", *FAST])
    assert r.exit_code == 0, r.output
    return db


def test_bad_database(runner, planted_paths, tmp_path, seq64, stored):
    args = ["scan", str(planted_paths["sae"]), "--corpus", str(planted_paths["corpus"]), "--config", seq64, *FAST]
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"this is not a database" * 100)
    check(runner.invoke(app, [*args, "--db", str(junk)]), 1, "junk.duckdb", "cannot open as a DuckDB database")
    assert junk.read_bytes() == b"this is not a database" * 100
    check(runner.invoke(app, [*args, "--db", str(tmp_path / "no" / "dir" / "x.duckdb")]), 1, "x.duckdb",
          "does not exist")
    check(runner.invoke(app, [*args, "--db", str(tmp_path)]), 1, str(tmp_path))
    newer = tmp_path / "newer.duckdb"
    shutil.copy(stored, newer)
    con = duckdb.connect(str(newer))
    con.execute("INSERT INTO schema_version VALUES (99, now(), '9.9')")
    con.close()
    check(runner.invoke(app, [*args, "--db", str(newer)]), 1, "newer.duckdb", "written by a newer famfind")
    check(runner.invoke(app, ["report", "--db", str(newer)]), 1, "written by a newer famfind")
    assert n_scans(newer) == 1


def test_sql_cannot_write_and_prints_stored_text_literally(runner, stored, tmp_path):
    db = tmp_path / "s.duckdb"
    shutil.copy(stored, db)
    for q in ("DELETE FROM scans", "DROP TABLE features", "INSERT INTO scans (scan_id) VALUES (9)",
              "CREATE TABLE t (x INT)"):
        check(runner.invoke(app, ["sql", q, "--db", str(db)]), 1, "s.duckdb", "SQL error")
    assert n_scans(db) == 1
    check(runner.invoke(app, ["sql", "SELECT * FROM no_such_table", "--db", str(db)]), 1, "SQL error")
    hostile = "[/] [bold red]x[/bold red] [link=file:///etc/passwd]y[/link] </script><!--"
    r = runner.invoke(app, ["sql", f"SELECT '{hostile}' AS \"[/b]\"", "--db", str(db)], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert hostile in r.stdout and "[/b]" in r.stdout


# --- hostile text in corpora and labels ----------------------------------------------------------

HOSTILE = ("[/] [bold]bold?[/bold] [/INST] </script><script>alert(1)</script> <!-- a comment "
           "<img src=x onerror=alert(2)> & &amp; \u2028 `${x}` {{x}} ")


@pytest.fixture(scope="module")
def hostile_scan(tmp_path_factory):
    """The embedded default's layer-1 SAE scanned on a text corpus of hostile strings, with a
    hostile label stored beside it: (db, scan_id)."""
    from famfind.corpus import default_sae
    from famfind.schema import LABELS

    if not (default_sae(1) / "cfg.json").exists():
        pytest.skip("embedded default artefacts are not built")
    d = tmp_path_factory.mktemp("hostile")
    (d / "hostile.txt").write_text((HOSTILE + "def f(x):\n    return x  # [/]\n") * 40)
    db = d / "h.duckdb"
    r = CliRunner().invoke(app, ["scan", str(default_sae(1)), "--corpus", str(d / "hostile.txt"), "--db", str(db),
                                 "-q", "--select", "feature_logits", "--select", "clusters"])
    assert r.exit_code == 0, r.output
    sid = int(r.stdout.strip())
    con = duckdb.connect(str(db))
    con.execute(LABELS.ddl())
    fam = con.execute("SELECT family FROM families WHERE scan_id = ? LIMIT 1", [sid]).fetchall()
    con.execute("INSERT INTO labels (scan_id, sae, kind, target, label, description, status, score) VALUES "
                "(?, 'blocks.1.attn.hook_z', 'cluster', ?, ?, ?, 'ok', 0.5)",
                [sid, fam[0][0] if fam else "cluster_0", "[/INST] <!-- label", HOSTILE])
    con.close()
    return db, sid


def test_hostile_text_is_printed_literally(runner, hostile_scan):
    db, _ = hostile_scan
    r = runner.invoke(app, ["sql", "SELECT context FROM examples", "--db", str(db)], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    assert "[/]" in r.stdout and "[/INST]" in r.stdout
    r = runner.invoke(app, ["report", "--db", str(db)], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["sql", "SELECT label FROM labels", "--db", str(db), "--csv"])
    assert r.stdout.splitlines()[1] == "[/INST] <!-- label"


def test_hostile_text_cannot_break_the_html_report(runner, hostile_scan, tmp_path):
    import re

    db, _ = hostile_scan
    out = tmp_path / "r.html"
    r = runner.invoke(app, ["report", "--db", str(db), "--html", str(out)])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    data = re.search(r'<script id="famfind-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert "<" not in data and ">" not in data
    parsed = json.loads(data)
    assert HOSTILE.strip() in json.dumps(parsed, ensure_ascii=False) or "[/INST] <!-- label" in json.dumps(
        parsed, ensure_ascii=False)
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not found (.ci/run installs Debian's chromium when it can)")
    dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                          "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console  # no script error, and no alert() ran (it would log nothing: see next)
    assert "<img src=\"x\"" not in dom.stdout and "onerror=\"alert" not in dom.stdout
    assert "[/INST] &lt;!-- label" in dom.stdout  # the label is shown, as text
    assert re.search(r'class="card" data-feature="\d+"', dom.stdout)  # the page rendered its cards


# --- plugins ---------------------------------------------------------------------------------

PLUGINS = {
    "syntax_error": "def broken(:\n",
    "raises_at_import": "raise RuntimeError('plugin exploded at import')\n",
    "no_detector": "x = 1\n",
}


@pytest.mark.parametrize("case", PLUGINS)
def test_plugin_that_cannot_load_is_skipped(runner, planted_paths, tmp_path, seq64, case):
    p = tmp_path / f"{case}.py"
    p.write_text(PLUGINS[case])
    db = tmp_path / "x.duckdb"
    base = ["scan", str(planted_paths["sae"]), "--corpus", str(planted_paths["corpus"]), "--config", seq64,
            "--db", str(db), "--plugin", str(p), *FAST]
    r = runner.invoke(app, [*base, "-q"])
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warn) == 1 and str(p) in warn[0] and "skipped" in warn[0]
    assert n_scans(db) == 1
    check(runner.invoke(app, [*base, "--strict-plugins"]), 1, str(p))
    assert n_scans(db) == 1


def test_missing_proxy_file_is_refused_before_loading(runner, planted_paths, tmp_path, seq64):
    db = tmp_path / "x.duckdb"
    missing = tmp_path / "no_such_proxy.py"
    r = runner.invoke(app, ["scan", str(planted_paths["sae"]), "--corpus", str(planted_paths["corpus"]), "--config",
                            seq64, "--db", str(db), "--proxy", str(missing), *FAST])
    check(r, 1, str(missing), "proxy file not found")
    assert not db.exists()


MALFORMED = '''
import polars as pl
from famfind.plugins import Column, Detection, FamilyMember, Heuristic, Result, Table

T = Table("bad_rows", (Column("feature", "INTEGER", "f"),), "rows")

class TableNotAFrame(Heuristic):
    id = "table_not_a_frame"
    needs = "weights"
    tables = (T,)

    def run(self, ctx):
        return Result(tables={"bad_rows": [1, 2, 3]})

class WrongRowType(Heuristic):
    id = "wrong_row_type"
    needs = "weights"

    def run(self, ctx):
        return Result(detections=[FamilyMember("x", 1, 1.0)])

class WrongFieldType(Heuristic):
    id = "wrong_field_type"
    needs = "weights"

    def run(self, ctx):
        return Result(detections=[Detection(feature="three", score=1.0, passed=True)])

class EvidenceNotJson(Heuristic):
    id = "evidence_not_json"
    needs = "weights"

    def run(self, ctx):
        return Result(detections=[Detection(feature=1, score=1.0, passed=True, evidence={"x": object()})])

class NotAResult(Heuristic):
    id = "not_a_result"
    needs = "weights"

    def run(self, ctx):
        return {"detections": []}
'''


def test_malformed_results_fail_only_their_detector(runner, planted_paths, tmp_path, seq64):
    p = tmp_path / "malformed.py"
    p.write_text(MALFORMED)
    db = tmp_path / "m.duckdb"
    bad = ("table_not_a_frame", "wrong_row_type", "wrong_field_type", "evidence_not_json", "not_a_result")
    sel = [x for h in (*bad, "head_attribution") for x in ("--select", h)]
    r = runner.invoke(app, ["scan", str(planted_paths["sae"]), "--corpus", str(planted_paths["corpus"]),
                            "--config", seq64, "--db", str(db), "--plugin", str(p), "-q", *sel])
    assert r.exit_code == 0, r.output
    con = duckdb.connect(str(db), read_only=True)
    runs = dict(con.execute("SELECT detector, status FROM detector_runs").fetchall())
    errors = dict(con.execute("SELECT detector, error FROM detector_runs").fetchall())
    n_attr = con.execute("SELECT count(*) FROM head_attribution").fetchall()[0][0]
    con.close()
    assert runs == {**{h: "failed" for h in bad}, "head_attribution": "ok"}
    assert "not a polars.DataFrame" in errors["table_not_a_frame"]
    assert "holds a FamilyMember, not Detection" in errors["wrong_row_type"]
    assert "Result.detections[0].feature is 'three'" in errors["wrong_field_type"]
    assert "not JSON" in errors["evidence_not_json"]
    assert "returned dict" in errors["not_a_result"]
    assert n_attr > 0  # the good detector's rows are stored


# --- interrupts, kills and concurrent scans (subprocesses) --------------------------------------

def famfind_proc(args, wrapper: str = "", env=None, **kw) -> subprocess.Popen:
    """``famfind ARGS`` in a subprocess; ``wrapper``: Python run first (e.g. patches)."""
    code = wrapper + "\nimport sys\nfrom famfind.cli import run\nsys.argv = ['famfind', *sys.argv[1:]]\nrun()\n"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "200", **(env or {})}, **kw)


def finish(proc, timeout=300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture()
def scan_args(planted_paths, seq64):
    return ["scan", str(planted_paths["sae"]), "--corpus", str(planted_paths["corpus"]), "--config", seq64, *FAST]


SELF_SIGINT_PLUGIN = '''
import os, signal
from famfind.plugins import Heuristic, Result

class CtrlC(Heuristic):
    id = "ctrl_c"
    needs = "weights"

    def run(self, ctx):
        os.kill(os.getpid(), signal.SIGINT)
        return Result()
'''


def test_ctrl_c_during_the_scan_writes_nothing(scan_args, tmp_path, stored):
    p = tmp_path / "ctrl_c.py"
    p.write_text(SELF_SIGINT_PLUGIN)
    db = tmp_path / "new.duckdb"
    code, out, err = finish(famfind_proc([*scan_args, "--db", str(db), "--plugin", str(p), "--select", "ctrl_c"]))
    assert code == 130
    one_line(err, out, "famfind: interrupted; nothing was written")
    assert not db.exists() and not list(tmp_path.glob(".new.duckdb*"))
    shutil.copy(stored, tmp_path / "old.duckdb")
    code, out, err = finish(famfind_proc([*scan_args, "--db", str(tmp_path / "old.duckdb"), "--plugin", str(p),
                                          "--select", "ctrl_c"]))
    assert code == 130 and "nothing was written" in err
    assert n_scans(tmp_path / "old.duckdb") == 1


def signal_in_write(table: str, sig: str) -> str:
    """Patch run before famfind: send ``signal.<sig>`` to itself when the write reaches
    ``table`` (inside the transaction)."""
    return f'''
import os, signal
import famfind.db as db
_orig = db.ensure_table
def ensure_table(con, table):
    if table.name == {table!r}:
        os.kill(os.getpid(), signal.{sig})
    return _orig(con, table)
db.ensure_table = ensure_table
'''


# a Ctrl-C that arrives while the scan's rows are being inserted (held until the transaction ends)
SIGINT_IN_WRITE = signal_in_write("features", "SIGINT")

# a Ctrl-C that arrives just after the transaction committed
SIGINT_AFTER_COMMIT = '''
import os, signal
import famfind.db as db
_orig = db._insert
def _insert(*a, **k):
    sid = _orig(*a, **k)
    os.kill(os.getpid(), signal.SIGINT)
    return sid
db._insert = _insert
'''


def test_ctrl_c_during_the_write_rolls_back(scan_args, tmp_path, stored):
    db = tmp_path / "new.duckdb"
    code, out, err = finish(famfind_proc([*scan_args, "--db", str(db)], SIGINT_IN_WRITE))
    assert code == 130, err
    one_line(err, out, "interrupted; nothing was written")
    assert not db.exists() and not list(tmp_path.glob(".new.duckdb*"))
    old = tmp_path / "old.duckdb"
    shutil.copy(stored, old)
    code, out, err = finish(famfind_proc([*scan_args, "--db", str(old)], SIGINT_IN_WRITE))
    assert code == 130 and "nothing was written" in err
    assert n_scans(old) == 1


def test_ctrl_c_after_the_commit_says_the_scan_was_written(scan_args, tmp_path, stored, runner, monkeypatch):
    old = tmp_path / "old.duckdb"
    shutil.copy(stored, old)
    code, out, err = finish(famfind_proc([*scan_args, "--db", str(old)], SIGINT_AFTER_COMMIT))
    assert code == 130, err
    one_line(err, out, f"interrupted; scan 2 was written to {old}")
    assert n_scans(old) == 2
    # a new database: the commit happens in a file beside it; Ctrl-C before it appears at the path
    db = tmp_path / "new.duckdb"
    code, out, err = finish(famfind_proc([*scan_args, "--db", str(db)], SIGINT_AFTER_COMMIT))
    assert code == 130 and "nothing was written" in err
    assert not db.exists() and not list(tmp_path.glob(".new.duckdb*"))
    # Ctrl-C while the report prints: the scan is stored, and the message says so
    import famfind.reports.terminal as terminal

    def interrupted_render(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(terminal, "render", interrupted_render)
    r = runner.invoke(app, [*scan_args, "--db", str(old)])
    check(r, 130, f"interrupted; scan 3 was written to {old}")
    assert n_scans(old) == 3


KILL_IN_WRITE = signal_in_write("examples", "SIGKILL")


def test_kill_9_during_the_write_leaves_nothing(scan_args, tmp_path, stored):
    db = tmp_path / "new.duckdb"
    code, _, _ = finish(famfind_proc([*scan_args, "--db", str(db)], KILL_IN_WRITE))
    assert code == -signal.SIGKILL
    assert not db.exists()  # only the killed scan's temp file, which the next scan removes
    code, out, err = finish(famfind_proc([*scan_args, "--db", str(db), "-q"]))
    assert code == 0, err
    assert out.strip() == "1" and n_scans(db) == 1 and not list(tmp_path.glob(".new.duckdb*"))
    old = tmp_path / "old.duckdb"
    shutil.copy(stored, old)
    code, _, _ = finish(famfind_proc([*scan_args, "--db", str(old)], KILL_IN_WRITE))
    assert code == -signal.SIGKILL
    assert n_scans(old) == 1


HOLD_LOCK = '''
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
'''


def hold_lock(db: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_locked_database_fails_fast(scan_args, tmp_path, stored):
    db = tmp_path / "s.duckdb"
    shutil.copy(stored, db)
    holder = hold_lock(db, 120)
    try:
        marker = tmp_path / "computed"
        plugin = tmp_path / "mark.py"
        plugin.write_text(textwrap.dedent(f'''
            from pathlib import Path
            from famfind.plugins import Heuristic, Result
            class Mark(Heuristic):
                id = "mark"
                needs = "weights"
                def run(self, ctx):
                    Path({str(marker)!r}).touch()
                    return Result()
            '''))
        code, out, err = finish(famfind_proc([*scan_args, "--db", str(db), "--plugin", str(plugin),
                                              "--select", "mark"]))
        assert code == 1
        one_line(err, out, "s.duckdb", "locked by another process", f"PID {holder.pid}")
        assert not marker.exists()  # refused before computing anything
    finally:
        holder.kill()
        holder.wait()
    assert n_scans(db) == 1


# takes the lock itself once the scan is computing (after the check at start)
LOCK_DURING_SCAN = '''
import os, subprocess, sys
from famfind.plugins import Heuristic, Result

class LockIt(Heuristic):
    id = "lock_it"
    needs = "weights"

    def run(self, ctx):
        p = subprocess.Popen([sys.executable, "-c", os.environ["HOLD_LOCK"], os.environ["LOCK_DB"],
                              os.environ["LOCK_SECONDS"]], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert p.stdout.readline().strip() == "locked"
        return Result()
'''


@pytest.mark.heavy  # slow end-to-end: .ci/run runs it after the README's command (-m heavy)
def test_a_lock_taken_mid_scan_is_waited_for_then_the_scan_is_saved(scan_args, tmp_path, stored, runner):
    plugin = tmp_path / "lock_it.py"
    plugin.write_text(LOCK_DURING_SCAN)
    db = tmp_path / "s.duckdb"
    shutil.copy(stored, db)
    env = {"HOLD_LOCK": HOLD_LOCK, "LOCK_DB": str(db)}
    # released after 3 s, waited for up to 60 s: stored
    code, out, err = finish(famfind_proc([*scan_args, "--db", str(db), "--plugin", str(plugin), "--select",
                                          "lock_it", "-q"], env={**env, "LOCK_SECONDS": "3"}))
    assert code == 0, err
    assert out.strip() == "2" and n_scans(db) == 2
    # held for 20 s, waited for 1 s: saved beside the database, then imported
    t0 = time.time()
    code, out, err = finish(famfind_proc([*scan_args, "--db", str(db), "--plugin", str(plugin), "--select",
                                          "lock_it", "--lock-timeout", "1"], env={**env, "LOCK_SECONDS": "20"}))
    assert time.time() - t0 < 19  # it did not wait for the holder
    line = one_line(err, out, "s.duckdb", "locked by another process", "still locked after 1 s",
                    "famfind import")
    assert code == 1
    saved = Path(line.split("saved to ")[1].split(" (import")[0])
    assert saved.parent == tmp_path and (saved / "famfind_scan.json").is_file()
    deadline = time.time() + 90
    while time.time() < deadline:  # wait for the holder (a grandchild) to let go
        try:
            duckdb.connect(str(db)).close()
            break
        except duckdb.IOException:
            time.sleep(0.5)
    r = runner.invoke(app, ["import", str(saved), "--db", str(db)])
    assert r.exit_code == 0, r.output
    assert "as scan 3" in r.stderr and n_scans(db) == 3
    con = duckdb.connect(str(db), read_only=True)
    same = con.execute("""SELECT count(*) FROM (SELECT feature, head, attribution FROM head_attribution WHERE scan_id = 2
                          EXCEPT SELECT feature, head, attribution FROM head_attribution WHERE scan_id = 3)""").fetchall()
    n3 = con.execute("SELECT count(*) FROM head_attribution WHERE scan_id = 3").fetchall()[0][0]
    con.close()
    assert same[0][0] == 0 and n3 > 0
    check(runner.invoke(app, ["import", str(tmp_path), "--db", str(db)]), 1, "not a saved famfind scan")
    assert n_scans(db) == 3


def test_usage_error_of_the_real_executable():
    """The installed entry point (not only CliRunner) prints one line for a usage error."""
    r = subprocess.run([sys.executable, "-m", "famfind", "scan", "--max-tokens", "-5"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    one_line(r.stderr, r.stdout, "usage error", "--max-tokens")
