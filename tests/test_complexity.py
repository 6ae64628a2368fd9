"""benchmarks/complexity.py: the exponent fit, and global attention's measured FLOPs exponent."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import complexity  # noqa: E402


@pytest.mark.parametrize("exponent", [1.0, 4 / 3, 2.0, 2.5])
def test_fit_recovers_a_known_exponent(exponent):
    rng = np.random.default_rng(0)
    tokens = np.array([64, 256, 1024, 4096, 16384, 65536], np.float64)
    cost = 7.0 * tokens**exponent * np.exp(rng.normal(0.0, 0.01, tokens.size))  # 1% noise
    assert complexity.fit_exponent(tokens, cost) == pytest.approx(exponent, abs=0.01)


def test_fit_of_a_sum_tends_to_the_leading_term():
    tokens = np.array([1e2, 1e3, 1e4, 1e5, 1e6])
    cost = 500 * tokens + tokens**2  # linear term dominates at first
    assert complexity.fit_exponent(tokens[-2:], cost[-2:]) == pytest.approx(2.0, abs=0.01)
    assert complexity.fit_exponent(tokens, cost) < 1.9
    with pytest.raises(ValueError, match="two distinct token counts"):
        complexity.fit_exponent([10, 10], [1, 2])


def test_global_attention_flops_grow_quadratically():
    rows = complexity.run_series("global", [32, 64, 128], dim=16, topk=4, window=7, timed=False)
    fit = complexity.exponents(rows)
    assert fit["mixing_fit"] == pytest.approx(2.0, abs=0.02), fit
    assert fit["last"] == pytest.approx(2.0, abs=0.05), fit
    assert [r["tokens"] for r in rows] == [1024, 4096, 16384]


def test_window_attention_is_linear_and_bra_scaled_below_global():
    kw = dict(dim=16, topk=4, window=7, timed=False)
    window = complexity.exponents(complexity.run_series("window", [14, 28, 56], **kw))
    assert window["fit"] == pytest.approx(1.0, abs=0.02), window
    bra = complexity.exponents(complexity.run_series("bra_scaled", [27, 64, 125], **kw))
    assert 1.2 < bra["mixing_fit"] < 1.4, bra
