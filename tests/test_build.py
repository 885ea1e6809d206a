"""The embedded default's training curriculum (famfind.build.train_model): batches carry the
copied spans each stage promises, stay inside their token sets, and are reproducible."""

from __future__ import annotations

import numpy as np

from famfind.build.train_model import SETS, TrainConfig, _batch


def _longest_copy(x: np.ndarray) -> int:
    """Length of the longest span x[s:s+n] repeated right after itself."""
    best = 0
    for n in range(1, len(x) // 2 + 1):
        for s in range(0, len(x) - 2 * n + 1):
            if np.array_equal(x[s:s + n], x[s + n:s + 2 * n]):
                best = n
                break
    return best


def test_stage_batches():
    cfg = TrainConfig(long_repeats=True)
    train = np.arange(10_000) % 4000 + 50  # a stand-in corpus with no repeats of its own nearby
    rng = np.random.default_rng(0)
    x0 = _batch(cfg, train, rng, 0, 4096).numpy()
    assert x0.shape == (cfg.batch0, 64) and x0.min() >= 1 and x0.max() <= SETS[0]
    assert all(_longest_copy(r) >= 10 for r in x0)  # every warm-up row repeats a 10-30-token span
    x2 = _batch(cfg, train, rng, 2, 4096).numpy()
    assert x2.shape == (cfg.batch, cfg.n_ctx)
    rand = x2[1::2]  # odd rows: random repeats over the stage's token set, in 64-token chunks
    assert rand.max() <= SETS[2] and all(_longest_copy(c) >= 10 for r in rand for c in r.reshape(-1, 64))
    xf = _batch(cfg, train, rng, 6, 4096).numpy()
    assert xf.max() < 4096 and all(_longest_copy(r) >= 10 for r in xf[3::4])  # long random repeats
    assert all(_longest_copy(r) >= 10 for r in xf[1::4])  # natural spans followed by themselves
    assert all(len(set(map(tuple, np.lib.stride_tricks.sliding_window_view(r, 6)))) < len(r) - 5
               for r in xf[2::4])  # natural windows with copied spans repeat 6-grams


def test_seed_per_step_batches_do_not_depend_on_history():
    cfg = TrainConfig(seed_per_step=True)
    train = np.arange(10_000) % 4000 + 50
    a = _batch(cfg, train, np.random.default_rng([cfg.seed, 7]), 6, 4096)
    _batch(cfg, train, np.random.default_rng(123), 6, 4096)
    b = _batch(cfg, train, np.random.default_rng([cfg.seed, 7]), 6, 4096)
    assert np.array_equal(a.numpy(), b.numpy())
