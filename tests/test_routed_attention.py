"""Every routed-attention implementation against 'gather' (and 'gather' against numpy):
values and gradients of q, kv and the routing weights, odd shapes, Pallas in interpret
mode, and golden parity of whole models with the memory-efficient implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import train_testlib
from support.golden import rel_l2, require, route_agreement

from biformer_jax import convert, models
from biformer_jax.ops import routed_attention as routed_attention_mod
from biformer_jax.ops.chunked_routed_attention import chunked_routed_attention, default_chunk
from biformer_jax.ops.pallas_dispatch import pallas_routed_attention
from biformer_jax.ops.pallas_routed_attention import inverse_routing
from biformer_jax.ops.routed_attention import resolve_impl, routed_attention

# (N, P, Tq, Tkv, Cqk, Cv, heads, topk): several heads, one head, topk 1, pooled kv (Tkv != Tq),
# topk = P (every region), Cqk != Cv.
SHAPES = {
    "heads2": (2, 9, 4, 4, 16, 24, 2, 3),
    "one_head_topk1": (1, 4, 6, 6, 8, 8, 1, 1),
    "pooled_kv": (2, 9, 4, 1, 16, 16, 4, 2),
    "all_regions": (1, 4, 2, 3, 8, 16, 2, 4),
}


def make_inputs(shape, soft: bool, seed: int = 0, dtype=jnp.float32):
    n, p, tq, tkv, cqk, cv, _, k = shape
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((n, p, tq, cqk)), dtype)
    kv = jnp.asarray(rng.standard_normal((n, p, tkv, cqk + cv)), dtype)
    r_idx = jnp.asarray(np.stack([[rng.permutation(p)[:k] for _ in range(p)] for _ in range(n)]), jnp.int32)
    r_weight = jnp.asarray(rng.random((n, p, k)) + 0.2, dtype) if soft else None
    cotangent = jnp.asarray(rng.standard_normal((n, p, tq, cv)), jnp.float32)
    return q, kv, r_idx, r_weight, cotangent


def value_and_grads(fn, q, kv, r_idx, r_weight, cotangent):
    """fn(q, kv, r_weight) -> out; returns [out, dq, dkv(, dr_weight)] for loss sum(out * ct)."""
    argnums = (0, 1) if r_weight is None else (0, 1, 2)

    def loss(q, kv, w):
        return jnp.sum(fn(q, kv, w).astype(jnp.float32) * cotangent)

    return [jax.jit(fn)(q, kv, r_weight), *jax.jit(jax.grad(loss, argnums=argnums))(q, kv, r_weight)]


def numpy_reference(q, kv, r_idx, r_weight, num_heads, scale):
    """The definition, written independently: per query region, concatenate the routed
    regions' keys/values (scaled by the routing weight), softmax, per head."""
    q, kv, r_idx = np.asarray(q, np.float64), np.asarray(kv, np.float64), np.asarray(r_idx)
    n, p, tq, cqk = q.shape
    cv = kv.shape[-1] - cqk
    out = np.zeros((n, p, tq, cv))
    dh, dvh = cqk // num_heads, cv // num_heads
    for b in range(n):
        for r in range(p):
            sel = kv[b, r_idx[b, r]]  # (K, Tkv, C)
            if r_weight is not None:
                sel = sel * np.asarray(r_weight, np.float64)[b, r][:, None, None]
            sel = sel.reshape(-1, kv.shape[-1])  # (K*Tkv, C)
            for h in range(num_heads):
                qh = q[b, r, :, h * dh : (h + 1) * dh] * scale
                kh = sel[:, h * dh : (h + 1) * dh]
                vh = sel[:, cqk + h * dvh : cqk + (h + 1) * dvh]
                logits = qh @ kh.T
                a = np.exp(logits - logits.max(-1, keepdims=True))
                out[b, r, :, h * dvh : (h + 1) * dvh] = (a / a.sum(-1, keepdims=True)) @ vh
    return out


def assert_all_close(got, want, tol, what=""):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        err = rel_l2(g, w)
        assert err < tol, f"{what} output {i} (0: value, then grads of q, kv, r_weight): rel. L2 error {err:.2e}"


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_gather_matches_numpy_definition(name, soft):
    q, kv, r_idx, r_weight, _ = make_inputs(SHAPES[name], soft)
    heads = SHAPES[name][6]
    got = routed_attention(q, kv, r_idx, r_weight, num_heads=heads, scale=0.3, impl="gather")
    want = numpy_reference(q, kv, r_idx, r_weight, heads, 0.3)
    assert rel_l2(got, want) < 1e-6


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_impls_match_gather_values_and_grads(name, soft):
    q, kv, r_idx, r_weight, ct = make_inputs(SHAPES[name], soft)
    heads = SHAPES[name][6]

    def run(impl):
        return jax.jit(lambda q, kv, w: routed_attention(q, kv, r_idx, w, num_heads=heads, scale=0.3, impl=impl))

    want = value_and_grads(run("gather"), q, kv, r_idx, r_weight, ct)
    for impl in ("masked", "chunked"):
        got = value_and_grads(run(impl), q, kv, r_idx, r_weight, ct)
        assert_all_close(got, want, 1e-5, impl)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("budget, steps", [(240, 2), (160, 3), (100, 6)])
def test_gather_slices_queries_over_its_logits_budget(monkeypatch, budget, steps, soft):
    """Over GATHER_MAX_LOGITS 'gather' attends the queries in slices (a loop): values and
    gradients stay the numpy definition's / the one-step path's. Tq = 6 here: budgets of 240,
    160 and 100 logits per slice need 2, 3 and 5 slices (5 does not divide 6: 6 slices)."""
    shape = (1, 4, 6, 5, 8, 8, 2, 2)  # 1 x 4 x 2 heads x 6 queries x (2 x 5) keys = 480 logits
    q, kv, r_idx, r_weight, ct = make_inputs(shape, soft, seed=3)
    assert routed_attention_mod.query_steps(480, 6) == 1
    fn = jax.jit(lambda q, kv, w: routed_attention(q, kv, r_idx, w, num_heads=2, scale=0.3, impl="gather"))
    want = value_and_grads(fn, q, kv, r_idx, r_weight, ct)
    monkeypatch.setattr(routed_attention_mod, "GATHER_MAX_LOGITS", budget)
    assert routed_attention_mod.query_steps(480, 6) == steps
    fn = jax.jit(lambda q, kv, w: routed_attention(q, kv, r_idx, w, num_heads=2, scale=0.3, impl="gather"))
    assert "while" in fn.lower(q, kv, r_weight).as_text()  # the sliced path is the one run
    got = value_and_grads(fn, q, kv, r_idx, r_weight, ct)
    assert_all_close(got, want, 1e-6, f"{steps} slices")
    assert rel_l2(got[0], numpy_reference(q, kv, r_idx, r_weight, 2, 0.3)) < 1e-6


def test_chunked_any_chunk_size():
    shape = (2, 9, 4, 2, 8, 8, 2, 4)
    q, kv, r_idx, r_weight, ct = make_inputs(shape, soft=True, seed=1)
    want = value_and_grads(
        lambda q, kv, w: routed_attention(q, kv, r_idx, w, num_heads=2, scale=0.5), q, kv, r_idx, r_weight, ct
    )
    for chunk in (1, 2, 4):
        got = value_and_grads(
            jax.jit(
                lambda q, kv, w, c=chunk: chunked_routed_attention(q, kv, r_idx, w, num_heads=2, scale=0.5, chunk=c)
            ),
            q,
            kv,
            r_idx,
            r_weight,
            ct,
        )
        assert_all_close(got, want, 1e-5, f"chunk={chunk}")


def test_chunked_default_chunk_is_at_most_a_quarter_of_topk():
    assert [default_chunk(k) for k in (1, 2, 4, 8, 16, 5)] == [1, 1, 1, 2, 4, 1]
    with pytest.raises(ValueError, match="divisor of topk"):
        q, kv, r_idx, _, _ = make_inputs(SHAPES["heads2"], False)
        chunked_routed_attention(q, kv, r_idx, None, num_heads=2, scale=1.0, chunk=2)


def test_chunked_backward_holds_no_topk_fold_copy():
    """The compiled gradient of 'chunked' needs far less temporary memory than 'gather' when
    topk is large: only one chunk of routed regions is live, and nothing is stored."""
    shape = (2, 64, 16, 16, 64, 64, 2, 16)
    q, kv, r_idx, _, ct = make_inputs(shape, soft=False)

    def temp_bytes(impl):
        def loss(q, kv):
            return jnp.sum(routed_attention(q, kv, r_idx, None, num_heads=2, scale=0.1, impl=impl) * ct)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(q, kv).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    gathered = 2 * 64 * 16 * 16 * 128 * 4  # the topk-fold K/V in bytes
    gather = temp_bytes("gather")
    assert gather > gathered
    assert temp_bytes("chunked") < min(gathered, gather / 3)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16])
@pytest.mark.parametrize("impl", ["masked", "chunked"])
def test_low_precision_inputs(impl, dtype, soft):
    q, kv, r_idx, r_weight, ct = make_inputs(SHAPES["heads2"], soft=soft, dtype=dtype)

    def fn(impl):
        return lambda q, kv, w: routed_attention(q, kv, r_idx, w, num_heads=2, scale=0.3, impl=impl)

    got = value_and_grads(fn(impl), q, kv, r_idx, r_weight, ct)
    assert all(a.dtype == dtype for a in got)  # the value and every gradient stay in the inputs' dtype
    q32, kv32 = q.astype(jnp.float32), kv.astype(jnp.float32)
    w32 = None if r_weight is None else r_weight.astype(jnp.float32)
    want = value_and_grads(fn("gather"), q32, kv32, r_idx, w32, ct)
    assert_all_close([a.astype(jnp.float32) for a in got], want, 2e-2, f"{impl} in {jnp.dtype(dtype).name}")


def test_auto_picks_masked_only_for_few_regions_with_large_topk():
    # BiFormer at 224: stage 3 (49 regions of 4 tokens, topk 16) is dense-friendly, stage 2 is not.
    assert resolve_impl("auto", (8, 49, 4, 256), (8, 49, 4, 512), 16) == "masked"
    assert resolve_impl("auto", (8, 49, 16, 128), (8, 49, 16, 256), 4) == "gather"
    assert resolve_impl("auto", (2, 64, 256, 64), (2, 64, 256, 128), 1) == "gather"
    with pytest.raises(ValueError, match="not one of"):
        resolve_impl("flash", (1, 4, 4, 8), (1, 4, 4, 16), 2)


def test_bad_inputs_name_the_problem():
    q, kv, r_idx, _, _ = make_inputs(SHAPES["heads2"], False)
    with pytest.raises(ValueError, match="num_heads=5"):
        routed_attention(q, kv, r_idx, None, num_heads=5, scale=1.0)
    with pytest.raises(ValueError, match="r_weight"):
        routed_attention(q, kv, r_idx, jnp.ones((2, 9, 1)), num_heads=2, scale=1.0)


def test_inverse_routing_lists_each_query_region_once():
    _, _, r_idx, _, _ = make_inputs((3, 9, 1, 1, 2, 2, 1, 3), False, seed=3)
    inv_q, inv_k, count = (np.asarray(a) for a in inverse_routing(r_idx))
    r = np.asarray(r_idx)
    for b in range(3):
        for key in range(9):
            want = sorted((p, s) for p in range(9) for s in range(3) if r[b, p, s] == key)
            got = sorted(zip(inv_q[b, key, : count[b, key]], inv_k[b, key, : count[b, key]]))
            assert got == want


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize(
    "shape,soft",
    [((1, 4, 4, 4, 8, 8, 2, 2), False), ((2, 4, 2, 4, 8, 16, 1, 3), True)],
    ids=["hard_heads2", "soft_pooled_one_head"],
)
def test_pallas_interpret_matches_gather(variant, shape, soft):
    q, kv, r_idx, r_weight, ct = make_inputs(shape, soft, seed=2)
    heads = shape[6]
    want = value_and_grads(
        lambda q, kv, w: routed_attention(q, kv, r_idx, w, num_heads=heads, scale=0.4), q, kv, r_idx, r_weight, ct
    )
    got = value_and_grads(
        lambda q, kv, w: pallas_routed_attention(
            q, kv, r_idx, w, num_heads=heads, scale=0.4, interpret=True, variant=variant
        ),
        q,
        kv,
        r_idx,
        r_weight,
        ct,
    )
    assert_all_close(got, want, 1e-5)


@pytest.mark.slow
def test_micro_model_train_step_matches_gather():
    """Logits, BatchNorm updates and every parameter gradient of a whole model (soft routing,
    pooled kv) agree with the gather implementation, for 'chunked' and the Pallas kernel."""
    kw = dict(soft_routing=True, param_routing=True, diff_routing=True, kv_downsample_mode="avgpool")
    kw["kv_downsample_ratios"] = (2, 1, 1, 1)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)

    # The implementations share one parameter layout: one set of weights for all three (numpy
    # noise: the model's init would compile a program of its own).
    variables = train_testlib.random_variables(models.create_model("biformer_micro", **kw), seed=0, image_size=64)

    def grads(attn_impl):
        model = models.create_model("biformer_micro", attn_impl=attn_impl, **kw)

        def loss(params):
            logits, upd = model.apply(
                {**variables, "params": params},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"drop_path": jax.random.key(1)},
            )
            return jnp.sum(jnp.sin(logits)), (logits, upd)

        (_, aux), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        return aux, convert.to_torch_state_dict({"params": g})

    (logits_ref, upd_ref), g_ref = grads("gather")
    names = sorted(g_ref)
    flat_ref = np.concatenate([np.ravel(g_ref[k]) for k in names]).astype(np.float64)
    largest = max(np.linalg.norm(v) for v in g_ref.values())
    for impl in ("chunked", "pallas_interpret"):
        (logits, upd), g = grads(impl)
        assert rel_l2(logits, logits_ref) < 1e-5, impl
        for a, b in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(upd_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert rel_l2(np.concatenate([np.ravel(g[k]) for k in names]), flat_ref) < 1e-3, impl
        # Per parameter: within 1e-4 of its own size, or of 1e-5 of the largest gradient. Some
        # gradients of this loss cancel to rounding noise (~1e-8 to 3e-7 of the largest: the
        # head, the downsampling convs feeding BatchNorm), where float32 rounding decides every
        # digit. Measured for 'chunked' (2-core CPU, jax 0.10.2): the largest error of any
        # parameter is 3.4e-7 of the largest gradient (head.weight). A wiring error (wrong
        # region, missing routing-weight gradient) is off by O(1).
        for name in names:
            err = np.linalg.norm(np.asarray(g[name], np.float64) - g_ref[name])
            assert err < max(1e-4 * np.linalg.norm(g_ref[name]), 1e-5 * largest), (impl, name, err)


def golden_eval(case: str, **overrides):
    g = require(case)
    model = models.create_model(g.model_name, **{**g.kwargs, **overrides})
    variables = convert.from_torch_state_dict(g.state_dict(), model)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))
    logits, state = apply(variables, jnp.asarray(g.input_nhwc()))
    return g, logits, models.collect_routes(state)


@pytest.mark.parametrize("impl", ["gather", "chunked", "masked"])
@pytest.mark.parametrize("case", ["opts_b", "opts_c_autopad"])
def test_golden_parity_with_impl(case, impl):
    """opts_b: soft, parametric, differentiable routing with pooled kv; opts_c: auto_pad."""
    g, logits, routes = golden_eval(case, attn_impl=impl)
    assert rel_l2(logits, g.data["logits"]) < 1e-4
    same, total = route_agreement(routes, g.routes())
    assert same >= 0.999 * total
