"""BiFormer behaviour on micro variants: every official option, features, errors, counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from support import required, train_testlib

from biformer_jax import models
from biformer_jax.models.layers import ConvMlp, LayerNormParams, layer_norm
from biformer_jax.models.routing import BiLevelRoutingAttention, RoutingSettings, adaptive_pool
from biformer_jax.ops.depthwise import depthwise_conv

MICRO = dict(
    depth=(1, 1, 1, 1),
    embed_dim=(16, 32, 64, 64),
    qk_dims=(16, 32, 64, 64),
    head_dim=8,
    num_classes=5,
    kv_downsample_mode="identity",
)


def init(model, shape=(2, 64, 64, 3), seed=0):
    x = jax.random.normal(jax.random.key(seed + 1), shape)
    return jax.jit(model.init)(jax.random.key(seed), x), x


def noise(model, shape=(2, 64, 64, 3), seed=0):
    """Like `init`, with numpy-noise weights (no init program to compile), for tests where any
    weights do."""
    x = jax.random.normal(jax.random.key(seed + 1), shape)
    return train_testlib.random_variables(model, seed, image_size=shape[1:3]), x


@pytest.mark.parametrize(
    "name, count",
    [("biformer_tiny", 13_142_760), ("biformer_small", 25_536_232), ("biformer_base", 56_804_968)],
)
def test_official_parameter_counts(name, count):
    model = models.create_model(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"])) == count


def test_micro_forward_routes_and_features():
    model = models.create_model("biformer_micro", num_classes=7)
    variables, x = noise(model)
    apply = jax.jit(lambda v, x: model.apply(v, x, return_features=True, mutable=["intermediates"]))
    (logits, feats), inter = apply(variables, x)
    assert logits.shape == (2, 7) and np.isfinite(logits).all()
    assert [f.shape for f in feats] == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64), (2, 2, 2, 128)]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    routes = models.collect_routes(inter)
    # biformer_micro: depth (1, 1, 2, 1), topks (1, 2, 2, -2), n_win 2 -> 4 routing modules.
    assert [r.shape for r in routes] == [(2, 4, 1), (2, 4, 2), (2, 4, 2), (2, 4, 2)]
    for r in routes:  # distinct, valid region indices per row
        assert r.min() >= 0 and r.max() < 4
        assert all(len(set(row)) == len(row) for row in np.asarray(r).reshape(-1, r.shape[-1]))


OPTION_CASES = {
    "ada_avg+global+pseudo": dict(topks=(2, 4, -1, 0), kv_downsample_mode="ada_avgpool", kv_per_wins=(2, 1, -1, -1)),
    "ada_max_uneven": dict(topks=(3, 2, 1, -2), kv_downsample_mode="ada_maxpool", kv_per_wins=(3, 2, 1, -1)),
    "avgpool": dict(topks=(4, 4, 2, -2), kv_downsample_mode="avgpool", kv_downsample_ratios=(2, 2, 1, 1)),
    "maxpool": dict(topks=(4, 4, 2, -2), kv_downsample_mode="maxpool", kv_downsample_ratios=(4, 2, 1, 1)),
    "qk<dim": dict(topks=(1, 2, 3, -1), qk_dims=(8, 16, 32, 64), side_dwconv=3, before_attn_dwconv=0),
    "soft+param+diff": dict(
        topks=(2, 2, 2, -2), soft_routing=True, param_routing=True, diff_routing=True, param_attention="qkv"
    ),
    "postnorm+ls+mlpdw": dict(topks=(2, 2, 2, 0), pre_norm=False, layer_scale_init_value=0.1, mlp_dwconv=True),
}


# Where each option is also held to the official outputs (../shared/golden, test_golden_biformer):
# ada_avgpool / global / pseudo -> opts_a; avgpool, soft+param+diff routing, post-norm,
# param_attention='qkv' -> opts_b; maxpool -> opts_c_autopad; ada_maxpool, qk_dim < dim,
# side_dwconv 3, no before-attention conv -> opts_d; layer scale and mlp_dwconv -> opts_a.


def _rel(a, b) -> float:
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


@pytest.mark.parametrize("overrides", list(OPTION_CASES.values()), ids=list(OPTION_CASES))
def test_official_options_agree_with_a_reference_path_and_train(overrides):
    """Each option case, value for value: logits (eval and train mode) and every parameter's
    gradient of the routed path ('gather', the shifted-sum depthwise conv, the hand-written
    VJPs) against the plain one (dense masked attention, lax.conv, autodiff). The paths share
    only the modules' wiring, so a wrong pooling size, routing weight or head split in one of
    them is an O(1) difference; float32 rounding of the two orders is ~1e-7 (measured: at most
    7e-8 relative on the logits across these cases), the bound 1e-5."""
    kw = dict(MICRO, n_win=2, **overrides)
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    cot = jax.random.normal(jax.random.key(2), (2, 5))

    def run(attn_impl, dwconv_impl, variables=None):
        model = models.create_model("biformer", attn_impl=attn_impl, dwconv_impl=dwconv_impl, **kw)
        variables = variables or train_testlib.random_variables(model)  # noise weights: no init to compile

        def loss(params):
            out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(out * cot), out

        (_, train_out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        return variables, jax.jit(model.apply)(variables, x), train_out, grads

    variables, ref_logits, ref_train, ref_grads = run("masked", "conv")
    assert ref_logits.shape == (2, 5) and float(jnp.std(ref_logits)) > 1e-3  # not a constant output
    _, logits, train_out, grads = run("gather", "shift", variables)
    assert _rel(logits, ref_logits) < 1e-5 and _rel(train_out, ref_train) < 1e-5
    # on the host: eager jnp here would compile a program per gradient shape
    ref_grads, grads = jax.tree.map(np.asarray, ref_grads), jax.tree.map(np.asarray, grads)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
    scale = max(float(np.abs(g).max()) for g in flat_ref.values())
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        err = float(np.abs(g - flat_ref[path]).max())
        assert err <= 1e-5 * scale, (jax.tree_util.keystr(path), err, scale)
    norms = jax.tree_util.tree_map(lambda g: float(np.linalg.norm(g)), ref_grads)
    assert all(np.isfinite(v) for v in jax.tree_util.tree_leaves(norms))
    # Every stage's token mixer learns (no dead branch).
    for i in range(4):
        assert sum(jax.tree_util.tree_leaves(norms[f"stages_{i}_0"]["attn"])) > 0


def test_routing_gradients_follow_diff_routing():
    kw = dict(MICRO, n_win=2, topks=(2, 2, 2, -2), param_routing=True, diff_routing=True, soft_routing=True)
    model = models.create_model("biformer", **kw)
    variables, x = noise(model)

    def loss(params):
        return jnp.sum(model.apply({**variables, "params": params}, x) ** 2)

    g = jax.jit(jax.grad(loss))(variables["params"])
    assert float(jnp.abs(g["stages_0_0"]["attn"]["router"]["emb"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("shape", [(1, 100, 130, 3), (2, 65, 47, 3)])
def test_auto_pad_any_size_features(shape):
    model = models.create_model("biformer_micro", auto_pad=True, features_only=True)
    variables, x = noise(model, shape)
    feats = jax.jit(model.apply)(variables, x)
    h, w = shape[1:3]
    for i, f in enumerate(feats):
        for _ in range(2 if i == 0 else 1):  # stride-2 convs with padding 1: ceil(h / 2)
            h, w = -(-h // 2), -(-w // 2)
        assert f.shape == (shape[0], h, w, model.embed_dim[i])
        assert np.isfinite(f).all()
    assert "head" not in variables["params"] and "norm" not in variables["params"]


def test_drop_path_and_batchnorm_modes():
    model = models.create_model("biformer_micro", drop_path_rate=0.5)
    variables, x = noise(model)
    evaluate = jax.jit(lambda v: model.apply(v, x, train=False))  # jitted: op by op compiles each op
    eval1 = evaluate(variables)
    np.testing.assert_array_equal(eval1, evaluate(variables))

    @jax.jit
    def train_step(key):
        return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"drop_path": key})

    def train(seed):
        return train_step(jax.random.key(seed))

    a, upd = train(1)
    b, _ = train(2)
    assert not np.allclose(a, b), "stochastic depth must depend on the drop_path rng"
    np.testing.assert_array_equal(a, train(1)[0])
    # Train mode moved the running statistics and counted the batch; eval mode uses them.
    before, after = variables["batch_stats"]["norm"], upd["batch_stats"]["norm"]
    assert not np.allclose(before["mean"], after["mean"])
    assert int(after["num_batches_tracked"]) == 1
    moved = evaluate({**variables, **upd})
    assert not np.allclose(moved, eval1)


def test_batchnorm_matches_pytorch_update_rule():
    from biformer_jax.models.layers import BatchNorm

    x = jax.random.normal(jax.random.key(3), (4, 5, 6, 3)) * 2 + 1
    bn = BatchNorm()
    v = bn.init(jax.random.key(0), x)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    xs = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * xs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * xs.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5), atol=1e-5)


def test_implementation_choices_agree():
    base = dict(MICRO, n_win=2, topks=(2, 2, 2, -2))
    outs = {}
    for dw in ("conv", "shift"):
        model = models.create_model("biformer", dwconv_impl=dw, **base)
        variables, x = noise(model)
        outs[dw] = model.apply(variables, x)
    np.testing.assert_allclose(outs["conv"], outs["shift"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, k, padding",
    [((2, 9, 13, 5), 3, 1), ((1, 7, 5, 4), 5, 2), ((3, 6, 17, 3), 7, 3), ((2, 8, 8, 6), 3, 0), ((2, 12, 9, 4), 5, 1)],
)
def test_shifted_depthwise_conv_grads_match_conv(shape, k, padding):
    """The shifted-sum depthwise conv's hand-written VJP (input and kernel gradients) against
    autodiff of XLA's grouped convolution: widths that are and are not whole kernel-gradient
    blocks, kernels 3 to 7, 'same', 'valid' and in-between paddings."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 1, shape[-1])), jnp.float32)
    outs = {}
    for impl in ("conv", "shift"):
        y, vjp = jax.vjp(lambda x, w, impl=impl: depthwise_conv(x, w, padding, impl), x, kernel)
        ct = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), jnp.float32)
        outs[impl] = (y, *vjp(ct))
    for name, a, b in zip(("value", "input grad", "kernel grad"), outs["shift"], outs["conv"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))), err_msg=name)


def test_remat_stages_same_values_and_grads():
    base = dict(MICRO, n_win=2, topks=(2, 2, 2, -2), drop_path_rate=0.2)
    plain = models.create_model("biformer", **base)
    remat = models.create_model("biformer", use_checkpoint_stages=(0, 1, 2, 3), **base)
    variables, x = init(plain)
    rngs = {"drop_path": jax.random.key(5)}

    def loss(model, params):
        out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"], rngs=rngs)
        return jnp.sum(out**2)

    la, ga = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(variables["params"])
    lb, gb = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(variables["params"])
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ga, gb)


class _NormThen(nn.Module):
    """norm -> BRA -> norm -> MLP, with the norms fused into the first Linears or not."""

    fused: bool

    @nn.compact
    def __call__(self, x):
        routing = RoutingSettings(num_heads=2, n_win=4, topk=3, auto_pad=True)
        if self.fused:
            norm1, norm2 = LayerNormParams(name="norm1"), LayerNormParams(name="norm2")
            attn = BiLevelRoutingAttention(16, routing, norm=norm1, name="attn")
            x = x + attn(x)
            return x + ConvMlp(48, 16, norm=norm2, name="mlp")(x)
        norm1, norm2 = layer_norm("norm1", jnp.float32, jnp.float32), layer_norm("norm2", jnp.float32, jnp.float32)
        x = x + BiLevelRoutingAttention(16, routing, name="attn")(norm1(x))
        return x + ConvMlp(48, 16, name="mlp")(norm2(x))


@pytest.mark.parametrize("shape", [(2, 8, 8, 16), (2, 10, 7, 16)])  # on the region grid, and auto-padded
def test_fused_norm_linear_and_gelu_linear_match_autodiff(shape):
    x = jax.random.normal(jax.random.key(1), shape)
    params = _NormThen(True).init(jax.random.key(0), x)["params"]
    # Non-trivial norm and bias values, so the fused backward's recomputation is exercised.
    params = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), params)

    def loss(fused, p, x):
        y = _NormThen(fused).apply({"params": p}, x)
        return jnp.sum(jnp.sin(y)), y

    ((la, ya), (gpa, gxa)), ((lb, yb), (gpb, gxb)) = (
        jax.jit(jax.value_and_grad(functools.partial(loss, f), argnums=(0, 1), has_aux=True))(params, x)
        for f in (True, False)
    )
    # Outputs within float32 rounding of their scale (measured <= 2.4e-6 abs at max|y| ~ 12, seeds 0-3).
    np.testing.assert_allclose(ya, yb, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(yb))))
    # The loss sums terms of both signs, so its error is bounded by the sum of their sizes, not by the
    # (cancelled) loss itself: measured <= 4.1e-8 of sum|sin(y)| (1.3e-6 .. 2.3e-6 of the loss itself).
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-7 * float(jnp.sum(jnp.abs(jnp.sin(yb)))))

    def close(a, b):  # float32 rounding of sums scales with the gradient's size (up to ~100 here)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * float(np.max(np.abs(b))))

    close(gxa, gxb)
    jax.tree_util.tree_map(close, gpa, gpb)


def test_bfloat16_compute_stays_close():
    model32 = models.create_model("biformer_micro")
    model16 = models.create_model("biformer_micro", dtype=jnp.bfloat16)
    variables, x = init(model32)
    a, b = jax.jit(model32.apply)(variables, x), jax.jit(model16.apply)(variables, x)
    assert b.dtype == jnp.float32  # logits come back in float32
    assert jax.tree_util.tree_leaves(variables["params"])[0].dtype == jnp.float32
    # Close, and really bfloat16: measured 4.9e-3 (a float32 run would differ by ~1e-7).
    assert 1e-4 < np.linalg.norm(a - b) / np.linalg.norm(a) < 0.1


def test_adaptive_pool_matches_pytorch_bins():
    torch = required.torch("PyTorch not installed: AdaptiveAvgPool2d reference unavailable")
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 5, 4)).astype(np.float32)  # (N, P, h, w, C)
    for out in (1, 2, 3):
        ref_in = torch.from_numpy(x.reshape(6, 7, 5, 4).transpose(0, 3, 1, 2))
        for reduce, op in (("avg", torch.nn.AdaptiveAvgPool2d(out)), ("max", torch.nn.AdaptiveMaxPool2d(out))):
            ref = op(ref_in).numpy().transpose(0, 2, 3, 1).reshape(2, 3, out, out, 4)
            np.testing.assert_allclose(adaptive_pool(jnp.asarray(x), out, reduce), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, shape, message",
    [
        (dict(), (1, 72, 72, 3), "auto_pad=True"),  # stage-1 map 18x18, n_win 4 does not divide it
        (dict(topks=(20, 2, 2, -2)), (1, 128, 128, 3), "topk=20"),
        (dict(head_dim=12), (1, 128, 128, 3), "head_dim"),
        (dict(embed_dim=(16, 32, 64, 60), qk_dims=(16, 32, 64, 60)), (1, 128, 128, 3), "divisible by 8"),
        (dict(), (1, 128, 128, 1), "in_chans=3"),
        (dict(), (1, 3, 128, 128), "NCHW"),
        (dict(kv_downsample_mode="fracpool", topks=(2, 2, 2, -2)), (1, 128, 128, 3), "fracpool"),
        (dict(diff_routing=True), (1, 128, 128, 3), "soft_routing=True"),
        (dict(topks=(2, 2, -3, -2)), (1, 128, 128, 3), "topk=-3"),
    ],
)
def test_bad_configs_fail_with_a_fix(kwargs, shape, message):
    kw = dict(MICRO, n_win=4, topks=(2, 2, 2, -2))
    kw.update(kwargs)
    model = models.create_model("biformer", **kw)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("=", "=")):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def test_create_model_rejects_unknowns():
    with pytest.raises(ValueError, match="Unknown model"):
        models.create_model("biformer_huge")
    with pytest.raises(TypeError, match="unknown argument"):
        models.create_model("biformer_tiny", topk=3)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_variables(model, x, seed):
    """Variables of `model`'s shapes with random values, without compiling its initialisation."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    leaves, tree = jax.tree.flatten(abstract)
    rng = np.random.default_rng(seed)  # numpy: an eager jax.random call per array compiles a program each
    values = [
        (0.5 + 0.1 * rng.uniform(size=s.shape)).astype(s.dtype)  # > 0: BatchNorm variances too
        if jnp.issubdtype(s.dtype, jnp.floating)
        else np.zeros(s.shape, s.dtype)  # BatchNorm's num_batches_tracked
        for s in leaves
    ]
    return jax.tree.unflatten(tree, values)


@pytest.mark.parametrize(
    "name, overrides, hw",
    [
        ("biformer_micro", dict(depth=(2, 3, 2, 2)), (64, 64)),
        ("biformer_micro", dict(depth=(3, 2, 2, 2), auto_pad=True, drop_path_rate=0.2), (72, 88)),
        ("debiformer_micro", dict(depth=(1, 1, 2, 2)), (96, 80)),
    ],
)
def test_scan_blocks_is_the_unrolled_model_at_inference(name, overrides, hw):
    """`scan_blocks` runs each stage's blocks as one lax.scan at inference: the same outputs and
    features from the same (per-block) variables; initialisation and route capture keep the
    unrolled blocks, so their results are the unrolled model's exactly. (Training scans too:
    tests/test_scan_training.py.)"""
    unrolled = models.create_model(name, num_classes=7, **overrides)
    scanned = models.create_model(name, num_classes=7, scan_blocks=True, **overrides)
    x = jax.random.normal(jax.random.key(3), (2, *hw, 3))
    variables = random_variables(unrolled, x, seed=4)
    assert jax.tree.structure(jax.eval_shape(scanned.init, jax.random.key(4), x)) == jax.tree.structure(variables)

    def infer(model):
        return jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True))

    unrolled_fn, scanned_fn = infer(unrolled), infer(scanned)  # each traced once, run and read
    want, got = unrolled_fn(variables, x), scanned_fn(variables, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape and rel_l2(a, b) < 1e-6
    # the scanned program is the one measured: one scan per stage of depth > 1, none unrolled
    n_scans = sum(d > 1 for d in overrides["depth"])
    assert str(jax.make_jaxpr(scanned_fn)(variables, x)).count("scan[") == n_scans
    assert "scan[" not in str(jax.make_jaxpr(unrolled_fn)(variables, x))
    if name != "biformer_micro":
        return  # the fallbacks below are the stage loop's, the same for both models (compile time)

    def routes(model):
        return models.collect_routes(
            jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"])[1])(variables, x)
        )

    want_routes, got_routes = routes(unrolled), routes(scanned)
    assert len(got_routes) == len(want_routes) > 0
    for a, b in zip(got_routes, want_routes):
        np.testing.assert_array_equal(a, b)
