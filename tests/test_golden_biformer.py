"""BiFormer against the official PyTorch outputs in ../shared/golden (golden/README.md's bar)."""

import pytest
from support.golden import beyond_train_bar, eval_case, train_case

EVAL_CASES = ["opts_a", "opts_b", "opts_c_autopad", "opts_d", "biformer_tiny", "biformer_small", "biformer_base"]
FULL_SIZE = {"biformer_tiny", "biformer_small", "biformer_base"}


def _params(cases, scan_blocks):
    """(case, scan_blocks) pairs, the full-size models marked slow."""
    return [pytest.param(c, scan_blocks, marks=pytest.mark.slow) if c in FULL_SIZE else (c, scan_blocks) for c in cases]


@pytest.mark.parametrize("case, scan_blocks", _params(EVAL_CASES, False) + _params(["opts_b", "opts_c_autopad"], True))
def test_eval_logits_and_routes(case, scan_blocks):
    err, same, total = eval_case(case, scan_blocks)
    print(f"{case}: logits rel L2 {err:.2e}, routes {same}/{total}")
    assert err <= 1e-4, f"{case}: logits relative L2 error {err:.3e} > 1e-4"
    assert same >= 0.999 * total, f"{case}: only {same}/{total} routed rows pick the official region set"


@pytest.mark.slow
@pytest.mark.parametrize("scan_blocks", [False, True])
def test_train_gradients_and_running_stats(scan_blocks):
    logits_err, errors, counts = train_case("biformer_tiny_train", scan_blocks)
    print(f"logits {logits_err:.1e}", {k: f"{v:.1e}" for k, v in errors.items()})
    assert logits_err <= 1e-4
    assert len(errors) >= 10 and not beyond_train_bar(errors), f"beyond the bar: {beyond_train_bar(errors)}"
    # One train-mode forward counts one tracked batch in every BatchNorm, as PyTorch does.
    assert counts and all(c == 1 for c in counts)
