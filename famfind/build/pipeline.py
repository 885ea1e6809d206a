"""``famfind build-default``: rebuild the embedded default from scratch, print the bars.

Steps (fixed seeds; each resumes from what ``build_dir`` already holds):
1-2. corpus + BPE tokenizer (:mod:`famfind.build.corpus`);
3. model (:mod:`famfind.build.train_model`), checkpointed every 250 steps;
4. one SAE per layer (:mod:`famfind.build.train_sae`), laid out as a SAELens release
   (``saes/blocks.L.attn.hook_z/``);
5. bars on held-out tokens (:mod:`famfind.build.bars`) and the cards;
``install=True`` copies model/, saes/, eval_tokens.npy and the cards to famfind/data/default.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from famfind.build.bars import measure
from famfind.corpus import default_dir


def build_all(build_dir: Path, install: bool = False, log=print) -> dict:
    from famfind.build.corpus import build_corpus
    from famfind.build.train_model import train_model
    from famfind.build.train_sae import SAETrainConfig, train_sae

    build_dir = Path(build_dir)
    if not (build_dir / "corpus.json").exists():
        log("building corpus + tokenizer")
        build_corpus(build_dir)
    if not (build_dir / "model" / "model.safetensors").exists():
        log("training model (resumable)")
        train_model(build_dir, log=log)
    shutil.copy(build_dir / "tokenizer.json", build_dir / "model" / "tokenizer.json")
    n_layers = json.loads((build_dir / "model" / "config.json").read_text())["n_layer"]
    for layer in range(n_layers):
        cfg = SAETrainConfig(layer=layer)
        if not (build_dir / "saes" / cfg.hook / "sae_weights.safetensors").exists():
            log(f"training the {cfg.hook} SAE")
            train_sae(build_dir, cfg, log=log)
    bars = measure(build_dir, build_dir / "train_tokens.npy")
    (build_dir / "bars.json").write_text(json.dumps(bars, indent=1))
    write_cards(build_dir)
    log(json.dumps(bars, indent=1))
    if install:
        dst = default_dir()
        for sub in ("model", "saes"):
            shutil.rmtree(dst / sub, ignore_errors=True)
            shutil.copytree(build_dir / sub, dst / sub)
        for f in ("eval_tokens.npy", "eval_tokens.docs.json", "bars.json", "DATA_CARD.md", "MODEL_CARD.md", "SAE_CARD.md", "train_history.json",
                  *(q.name for q in build_dir.glob("sae_history_L*.json")), "LICENSE-python-docs.txt"):
            shutil.copy(build_dir / f, dst / f)
    return bars


def _tick(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def write_cards(d: Path) -> None:
    """DATA_CARD.md, MODEL_CARD.md, SAE_CARD.md from corpus.json, bars.json, training logs."""
    c = json.loads((d / "corpus.json").read_text())
    b = json.loads((d / "bars.json").read_text())
    th = json.loads((d / "train_history.json").read_text())
    m, met = b["model"], b["met"]
    tr, ho = c["train"], c["heldout"]
    (d / "DATA_CARD.md").write_text(f"""# Data card: famfind embedded-default corpus

| source (Debian bookworm package) | version | licence | role |
|---|---|---|---|
| `python3.11-doc`: reST sources of the Python 3.11 docs (`html/_sources/**/*.rst.txt`) | {c['packages']['python3.11-doc']} | PSF License v2 (docs; see LICENSE-python-docs.txt) | prose |
| `libpython3.11-stdlib`: CPython 3.11 standard library (`usr/lib/python3.11/**/*.py`), sampled to ~20% of characters | {c['packages']['libpython3.11-stdlib']} | PSF License v2 | code |

| split | prose docs | prose bytes | code docs | code bytes | tokens |
|---|---|---|---|---|---|
| train | {tr['prose']['documents']} | {tr['prose']['bytes']:,} | {tr['code']['documents']} | {tr['code']['bytes']:,} | {tr['tokens']:,} |
| held-out | {ho['prose']['documents']} | {ho['prose']['bytes']:,} | {ho['code']['documents']} | {ho['code']['bytes']:,} | {ho['tokens']:,} |

Split: whole documents, seeded permutation (seed {c['seed']}); the model, tokenizer and SAE
never see a held-out document. Tokenizer: byte-level BPE, vocab {c['vocab_size']}, trained on
the train split only (`model/tokenizer.json`; `<|endoftext|>` = id 0).

`eval_tokens.npy`: the held-out split as a 1-D `uint16` array, documents joined by
`<|endoftext|>`; `famfind scan` cuts it into 128-token sequences.
`eval_tokens.docs.json`: per held-out document, in order, its `kind` (`code` or `prose`),
`markup` (`python` or `rst`) and source path: the document metadata the proxies of
`famfind scan` read (document kind, where Python's tokenizer or the reST rules apply).
Rebuild: `famfind build-default --build-dir build/default` (fetches the two packages with
`apt-get download`; a later Debian security update changes the package versions above).
""")
    tc = th["config"]
    status = ("A layer-1 induction head formed during training." if met["induction_score >= 0.5"] else
              "**No induction head formed** with this recipe on this run; see the issue #2 notes.")
    notes = [f"step {h['step']}: {h['note']}" for h in th["history"] if "note" in h]
    last = [h for h in th["history"] if "loss" in h][-1]
    (d / "MODEL_CARD.md").write_text(f"""# Model card: famfind embedded default (2-layer GELU transformer)

GPT-2 architecture (Hugging Face `GPT2LMHeadModel` checkpoint: `config.json` +
`model.safetensors` + `tokenizer.json`), {tc['n_layers']} layers, d_model
{tc['d_model']}, {tc['n_heads']} heads (d_head {tc['d_model'] // tc['n_heads']}),
MLP 4x with GELU, learned positions, n_ctx {tc['n_ctx']}, vocab {c['vocab_size']}, untied unembedding.
Trained on the train split of DATA_CARD.md for {tc['steps']} steps (recipe below).

## Bars (held-out tokens)

| bar | value | target | |
|---|---|---|---|
| best layer-1 induction score (head {m['induction_head']}) | {m['induction_score_best']} | >= 0.5 | {_tick(met['induction_score >= 0.5'])} |
| loss on 2nd copy / 1st copy of repeated held-out text | {m['repeat_loss_second_copy']} / {m['repeat_loss_first_copy']} = {m['repeat_loss_ratio']} | <= 0.5 | {_tick(met['repeat_loss_ratio <= 0.5'])} |
| held-out loss (nats/token) vs unigram baseline | {m['heldout_loss']} vs {m.get('unigram_loss', 'n/a')} | below baseline | {_tick(m['heldout_loss'] < m.get('unigram_loss', 1e9))} |

Layer-1 induction scores per head: {m['induction_scores_layer1']}; layer-0 previous-token
scores: {m['previous_token_scores_layer0']}. The induction score is the mean attention from each
token of the second copy of a repeated random-token sequence (50 tokens, whole vocabulary) to
the token after its first copy. Re-measure: `python -m famfind.build.bars`.

## Recipe

{status}

`famfind/build/train_model.py` (every evaluation logged in `train_history.json`):
initialisation as TransformerLens does it (normal, std 0.8/sqrt(d_model) = {tc['init_std']:.4f}; untied
unembedding), then a curriculum:

1. *attention-only warm-up*: every MLP's output projection is zero and frozen; {tc['batch0']} x 64-token
   sequences of random tokens from [1, 65) with one 10-30-token span copied right after
   itself; loss over those 65 logits; until a layer-1 head's induction score on that token
   set reaches {tc['advance_at']};
2. *widening*: MLPs trainable; {tc['batch']} x {tc['n_ctx']} tokens a step, half natural text, half random
   repeats over token sets of 128, 256, ... ids, each stage ending when the induction score on
   its set reaches {tc['advance_at']};
3. *final*: 50% natural text, 25% natural text with spans copied later in the window, 25%
   random repeats over the whole vocabulary, to step {tc['steps']}; from step {tc.get('long_natural_from')} one natural
   quarter is a natural span of 10-128 tokens followed by itself.

AdamW lr {tc['lr']}, weight decay {tc['weight_decay']}, gradient clipping 1.0, seed {tc['seed']}.
Stage changes: {'; '.join(notes) or 'none'}. The run was trained to step 5000, then extended (resumes
re-seed the batch stream at steps {tc.get('reseed_at')}, recorded in the config so a rebuild repeats them).
Last logged evaluation: {last}.

Why this recipe: with GPT-2's initialisation (std 0.02, tied embeddings) the same warm-up grew
no induction head in 17k steps; natural text alone, none in 3k steps (issue #2 notes).
""")
    write_sae_card(d, b)


def write_sae_card(d: Path, b: dict | None = None) -> None:
    """SAE_CARD.md (one section per SAE of ``saes/``) from bars.json and the training logs."""
    b = b or json.loads((d / "bars.json").read_text())
    met = b["met"]
    parts = ["# SAE card: famfind embedded default, one SAE per layer\n",
             "A SAELens-style release folder, `saes/`, with one SAE folder per hook (`cfg.json` +",
             "`sae_weights.safetensors`, `reshape_activations = hook_z`; `sae_lens.SAE.load_from_disk` reads",
             "each). `famfind scan` with no argument scans both in one pass.\n"]
    for hook, s in b["saes"].items():
        layer = s["layer"]
        hist = d / f"sae_history_L{layer}.json"
        if not hist.exists() and layer == 1:
            hist = d / "sae_history.json"  # the first release's name
        sc = json.loads(hist.read_text())["config"]
        lo_hi = [k for k in met if k.startswith(f"{hook}: L0")][0].split(": ", 1)[1]
        parts.append(f"""## `{hook}`

ReLU ("standard") SAE on the concatenated heads of layer {layer}'s `hook_z` (d_in {s['d_sae'] // sc['expansion']},
d_sae {s['d_sae']}, {sc['expansion']}x). Trained on hook_z of the train split: L2 reconstruction + L1
penalty with unit-norm decoder rows (Bricken et al. 2023), Adam lr {sc['lr']}, {sc['steps']} steps x
{sc['batch']} tokens, dead-feature resampling every {sc['resample_every']} steps; the L1 coefficient was
steered toward L0 = {sc['target_l0']} during the first {int(sc['l1_tune_frac'] * 100)}% of steps, then frozen
(training log: `{hist.name}`).{(chr(10) * 2 + json.loads(hist.read_text())['note']) if 'note' in json.loads(hist.read_text()) else ''}

| bar ({s['n_tokens']:,} held-out tokens) | value | target | |
|---|---|---|---|
| L0 | {s['l0']} | {lo_hi.removeprefix('L0 in ')} | {_tick(met[f'{hook}: {lo_hi}'])} |
| loss recovered (splicing the reconstruction at layer {layer} vs zero-ablating its hook_z) | {s['loss_recovered']:.1%} | >= 70% | {_tick(met[f'{hook}: loss_recovered >= 0.70'])} |
| dead features (never fire on the held-out set) | {s['dead_fraction']:.1%} | <= 40% | {_tick(met[f'{hook}: dead_fraction <= 0.40'])} |

CE clean {s['ce_clean']}, with SAE {s['ce_with_sae']}, zero-ablated {s['ce_zero_ablated']};
explained variance {s['explained_variance']}.
""")
    parts.append("Re-measure: `python -m famfind.build.bars`.\n")
    (d / "SAE_CARD.md").write_text("\n".join(parts))
