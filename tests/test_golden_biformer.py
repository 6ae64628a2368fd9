"""BiFormer against the official PyTorch outputs in ../shared/golden (golden/README.md's bar)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.golden import eval_case, rel_l2, require

from biformer_jax import convert, models

EVAL_CASES = ["opts_a", "opts_b", "opts_c_autopad", "opts_d", "biformer_tiny", "biformer_small", "biformer_base"]
FULL_SIZE = {"biformer_tiny", "biformer_small", "biformer_base"}


def _params(cases):
    return [pytest.param(c, marks=pytest.mark.slow) if c in FULL_SIZE else c for c in cases]


@pytest.mark.parametrize("case", _params(EVAL_CASES))
def test_eval_logits_and_routes(case):
    err, same, total = eval_case(case)
    print(f"{case}: logits rel L2 {err:.2e}, routes {same}/{total}")
    assert err <= 1e-4, f"{case}: logits relative L2 error {err:.3e} > 1e-4"
    assert same >= 0.999 * total, f"{case}: only {same}/{total} routed rows pick the official region set"


@pytest.mark.slow
def test_train_gradients_and_running_stats():
    g = require("biformer_tiny_train")
    model = models.create_model(g.model_name, **g.kwargs)
    variables = convert.from_torch_state_dict(g.state_dict(), model)
    x, cotangent = jnp.asarray(g.input_nhwc()), jnp.asarray(g.data["cotangent"])
    key = jax.random.key(0)

    @jax.jit
    def grads_and_stats(params, batch_stats):
        def loss(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key, "drop_path": key},
            )
            return jnp.sum(logits * cotangent), (logits, updates)

        (_, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, grads, updates

    logits, grads, updates = grads_and_stats(variables["params"], variables["batch_stats"])
    assert rel_l2(logits, g.data["logits"]) <= 1e-4
    named = convert.to_torch_state_dict({"params": grads, **updates})
    worst = {}
    for key_name in g.manifest["grad_keys"]:
        worst[key_name] = rel_l2(named[key_name], g.data[f"grad/{key_name}"])
    for name in g.data.files:
        if name.startswith("after/"):
            worst[name] = rel_l2(named[name[len("after/") :]], g.data[name])
    print({k: f"{v:.1e}" for k, v in worst.items()})
    bad = {k: v for k, v in worst.items() if v > (1e-2 if k.startswith("after/") else 1e-3)}
    assert not bad, f"beyond the bar: {bad}"
    # One train-mode forward counts one tracked batch in every BatchNorm, as PyTorch does.
    counts = [v for k, v in named.items() if k.endswith("num_batches_tracked")]
    assert counts and all(int(c) == 1 for c in counts)
    assert np.isfinite(np.asarray(logits)).all()
