"""DeBiFormer: golden parity with the release, parameter counts, converter, any input size, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support import required
from support.golden import beyond_train_bar, eval_case, recipe_value, require, train_case

from biformer_jax import convert, models
from biformer_jax.models.deformable import DeBiLevelRoutingAttention
from biformer_jax.models.routing import RoutingSettings
from biformer_jax.ops.grid_sample import grid_sample
from biformer_jax.ops.strided_depthwise import strided_depthwise_conv
from biformer_jax.ops.topk import topk

# ------------------------------------------------------------------------------------------
# Parity with the official outputs (shared/golden, "DeBiFormer as released").


@pytest.mark.slow
@pytest.mark.parametrize("case", ["debiformer_tiny", "debiformer_small", "debiformer_base"])
def test_golden_logits_and_routes(case):
    err, same, total = eval_case(case)
    summary = f"{case}: logits rel L2 {err:.2e} (bar 1e-3), routes {same}/{total} ({same / total:.4%})"
    print(summary)
    assert err <= 1e-3, summary
    assert same >= 0.999 * total, summary


@pytest.mark.slow
def test_golden_train_gradients_and_running_stats():
    """The backward held to the release: ten parameter gradients (the offset networks
    `conv_offset_q`, i.e. the backward of the deformable sampling, included) and BatchNorm's
    running statistics after one train-mode forward, at biformer_tiny_train's bar."""
    logits_err, errors, counts = train_case("debiformer_tiny_train")
    print(f"logits {logits_err:.1e} (bar 1e-3)", {k: f"{v:.1e}" for k, v in errors.items()})
    assert logits_err <= 1e-3
    assert sum("conv_offset_q" in k for k in errors) == 2 and len(errors) >= 10 + 6, sorted(errors)
    assert not beyond_train_bar(errors), f"beyond the bar: {beyond_train_bar(errors)}"
    assert counts and all(c == 1 for c in counts)


@pytest.mark.parametrize(
    "name, count",
    [("debiformer_tiny", 21_495_598), ("debiformer_small", 44_008_028), ("debiformer_base", 95_501_926)],
)
def test_released_parameter_counts(name, count):
    model = models.create_model(name)
    shapes = convert.abstract_variables(model)
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"])) == count


def test_converter_round_trip_on_released_keys():
    """The release's own key set (golden manifest) maps in and back out exactly, by rule."""
    g = require("debiformer_tiny")
    sd = g.state_dict()
    model = models.create_model("debiformer_tiny")
    back = convert.to_torch_state_dict(convert.from_torch_state_dict(sd, model))
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    # A checkpoint of another variant is refused with the offending keys named.
    with pytest.raises(convert.CheckpointMismatchError, match=r"missing:\n    stages\.0\.1\.attn1"):
        convert.from_torch_state_dict(sd, models.create_model("debiformer_small"))


# ------------------------------------------------------------------------------------------
# The micro variant: shapes, routes, any input size, gradients, training.


def recipe_variables(model, salt: str = "micro") -> dict:
    """Variables drawn by the golden weight recipe, through the converter.

    Cheaper than `jax.jit(model.init)`, whose per-parameter RNG takes XLA:CPU about 0.1 s of
    compilation per parameter (a minute for the micro model); the recipe's N(0, 1/fan_in)
    kernels train as well.
    """
    shapes = convert.abstract_variables(model)
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    sd = {k: recipe_value(k, v.shape, str(v.dtype), salt) for k, v in convert.to_torch_state_dict(zeros).items()}
    return convert.from_torch_state_dict(sd, model)


@pytest.fixture(scope="module")
def micro():
    model = models.create_model("debiformer_micro", num_classes=10)
    return model, recipe_variables(model)


def test_micro_forward_routes_and_features(micro):
    model, variables = micro
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    (logits, feats), inter = jax.jit(lambda v, x: model.apply(v, x, return_features=True, mutable=["intermediates"]))(
        variables, x
    )
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    assert [f.shape for f in feats] == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64), (2, 2, 2, 128)]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    routes = models.collect_routes(inter)
    # Blocks of topk 4 route with topk 1 (BRA) then 4 (deformable); topk -2 is all 4 regions, twice.
    assert [r.shape[-1] for r in routes] == [1, 4, 1, 4, 1, 4, 4, 4]
    for r in routes:
        r = np.asarray(r).reshape(-1, r.shape[-1])
        assert r.min() >= 0 and r.max() < 4 and all(len(set(row)) == len(row) for row in r)


def test_any_input_size_pads_inside_and_crops(micro):
    """100x130 is off the region grid at every stage; the release would need auto_pad=True."""
    model, variables = micro
    x = jax.random.normal(jax.random.key(7), (1, 100, 130, 3))
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, x)
    assert logits.shape == (1, 10) and np.isfinite(logits).all()
    assert [f.shape for f in feats] == [(1, 25, 33, 16), (1, 13, 17, 32), (1, 7, 9, 64), (1, 4, 5, 128)]
    assert all(np.isfinite(f).all() for f in feats)


def test_micro_trains_on_digits():
    """30 AdamW steps on sklearn's handwritten digits (8x8 -> 32x32): every parameter gets a
    gradient (the offset network through the sampling positions, the bias table through its
    samples) and the loss falls."""
    from sklearn import datasets  # requirements.txt: the quickstart's digits

    digits = datasets.load_digits()
    images = digits.images.astype(np.float32)[..., None] / 16.0  # (1797, 8, 8, 1)
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)  # (1797, 32, 32, 1)
    images = (images - images.mean()) / images.std()
    labels = digits.target.astype(np.int32)
    # XLA's depthwise conv and top-k: the smaller program (compile 19.8 -> 11.2 s here); the
    # gradients reach the same parameters (routing gets none either way).
    model = models.create_model(
        "debiformer_micro", num_classes=10, in_chans=1, drop_path_rate=0.1, dwconv_impl="conv", routing_ties="xla"
    )
    variables = recipe_variables(model)
    tx = optax.adamw(2e-3, weight_decay=0.05)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(params, batch_stats, opt_state, x, y, key):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"drop_path": key, "dropout": key},
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        live = jax.tree_util.tree_map(lambda g: jnp.all(jnp.isfinite(g)) & jnp.any(g != 0), grads)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss, live

    params, batch_stats = variables["params"], variables["batch_stats"]
    rng = np.random.default_rng(0)
    losses = []
    for i in range(30):
        idx = rng.choice(len(images), 32, replace=False)
        params, batch_stats, opt_state, loss, live = step(
            params, batch_stats, opt_state, images[idx], labels[idx], jax.random.key(i)
        )
        losses.append(float(loss))
        if i == 0:
            flat = jax.tree_util.tree_flatten_with_path(live)[0]
            dead = [jax.tree_util.keystr(path) for path, ok in flat if not bool(ok)]
            assert not dead, f"zero or non-finite gradient for {dead}"
    assert np.isfinite(losses).all()
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, f"loss did not fall: first 5 steps {first:.3f}, last 5 {last:.3f} ({losses})"


# ------------------------------------------------------------------------------------------
# Pieces and errors.


def test_grid_sample_matches_pytorch():
    torch = required.torch("PyTorch not installed: grid_sample reference unavailable")
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)  # (B, H, W, C)
    grid = rng.uniform(-1.2, 1.2, (2, 4, 6, 2)).astype(np.float32)  # beyond the borders too
    grid[0, 0, :3] = [[1, 1], [-1, -1], [1, -1]]  # exact corners
    cot = rng.standard_normal((2, 4, 6, 3)).astype(np.float32)
    ti = torch.from_numpy(image.transpose(0, 3, 1, 2)).requires_grad_()
    tg = torch.from_numpy(grid).requires_grad_()
    ref = torch.nn.functional.grid_sample(ti, tg, mode="bilinear", padding_mode="zeros", align_corners=True)
    (ref * torch.from_numpy(cot.transpose(0, 3, 1, 2))).sum().backward()
    out, vjp = jax.vjp(grid_sample, jnp.asarray(image), jnp.asarray(grid))
    g_image, g_grid = vjp(jnp.asarray(cot))
    np.testing.assert_allclose(out, ref.detach().numpy().transpose(0, 2, 3, 1), atol=1e-6)
    np.testing.assert_allclose(g_image, ti.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(g_grid, tg.grad.numpy(), atol=1e-5)


def test_grid_sample_hits_pixels_at_their_coordinates():
    image = jnp.arange(2 * 3 * 4 * 1, dtype=jnp.float32).reshape(2, 3, 4, 1)
    ys, xs = jnp.meshgrid(jnp.linspace(-1, 1, 3), jnp.linspace(-1, 1, 4), indexing="ij")
    grid = jnp.broadcast_to(jnp.stack([xs, ys], -1), (2, 3, 4, 2))
    np.testing.assert_allclose(grid_sample(image, grid), image, atol=1e-6)
    # Halfway between two pixels: their mean; fully outside: zero.
    half = grid_sample(image, jnp.array([[[-2 / 3, -1.0], [5.0, 0.0]]] * 2))
    np.testing.assert_allclose(half[:, 0, 0], (image[:, 0, 0, 0] + image[:, 0, 1, 0]) / 2, atol=1e-6)
    np.testing.assert_allclose(half[:, 1, 0], 0.0)


@pytest.mark.parametrize("shape, k, stride", [((2, 25, 33, 16), 9, 8), ((3, 11, 7, 5), 3, 2), ((1, 9, 10, 3), 5, 3)])
def test_strided_depthwise_impls_agree(shape, k, stride):
    x = jax.random.normal(jax.random.key(0), shape)
    kernel = jax.random.normal(jax.random.key(1), (k, k, 1, shape[-1]))
    ref = strided_depthwise_conv(x, kernel, k // 2, stride, "conv")
    assert ref.shape[1:3] == tuple((s - 1) // stride + 1 for s in shape[1:3])
    np.testing.assert_allclose(strided_depthwise_conv(x, kernel, k // 2, stride, "shift"), ref, rtol=1e-5, atol=1e-5)


# torch.topk(row, k) on CPU (PyTorch 2.13), recorded: which of several equal entries it keeps.
_TORCH_TIES = [
    ([0.0] * 9, 2, [5, 7]),
    ([0.0] * 9, 5, [4, 5, 6, 7, 8]),
    ([1, 0, 1, 0, 1, 0, 1, 0, 1], 3, [0, 4, 6]),
    ([0, 2, 0, 2, 0, 2, 1, 1, 1, 0, 0, 2, 2, 0, 0, 1], 3, [1, 5, 11]),
    ([0, 2, 0, 2, 0, 2, 1, 1, 1, 0, 0, 2, 2, 0, 0, 1], 5, [1, 3, 5, 11, 12]),
    ([i % 3 for i in range(25)], 5, [8, 11, 14, 20, 23]),
]


@pytest.mark.parametrize("row, k, expected", _TORCH_TIES)
def test_topk_breaks_ties_like_torch(row, k, expected):
    x = jnp.asarray([row, row[::-1]], jnp.float32)
    vals, idx = jax.jit(lambda x: topk(x, k, "torch"))(x)
    assert sorted(np.asarray(idx[0]).tolist()) == expected
    for r in range(2):  # values are the entries picked, largest first
        np.testing.assert_array_equal(vals[r], np.asarray(x[r])[np.asarray(idx[r])])
        assert np.all(np.diff(np.asarray(vals[r])) <= 0)


def test_topk_matches_torch_on_random_ties():
    torch = required.torch("PyTorch not installed: torch.topk reference unavailable")
    rng = np.random.default_rng(0)
    for n, k in [(49, 1), (49, 4), (49, 16), (16, 8), (25, 3), (4, 2)]:
        rows = rng.integers(0, 4, (64, n)).astype(np.float32)  # many exact ties
        rows[:16] = rng.standard_normal((16, n))  # and some rows without
        _, idx = jax.jit(topk, static_argnums=(1, 2))(jnp.asarray(rows), k, "torch")
        for row, ours in zip(rows, np.asarray(idx)):
            theirs = torch.topk(torch.from_numpy(row), k).indices.numpy()
            assert sorted(ours.tolist()) == sorted(theirs.tolist()), (n, k, row.tolist())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(qk_dims=(16, 32, 64, 64)), "qk_dim == dim"),
        (dict(topks=(4, 4, -1, -2)), "topk=-1"),
        (dict(topks=(3, 4, 4, -2)), "topk=3"),
        (dict(topks=(8, 4, 4, -2)), "topk=8 routes to more regions"),
        (dict(head_dim=12), "head_dim"),
        (dict(deform_settings=((1, 9, 8, 3, 16), (3, 7, 4, 3, 8), (4, 5, 2, 3, 4), (8, 3, 1, 1, 2))), "n_groups=3"),
        (dict(deform_settings=None, param_size="tiny"), "widths \\[64, 128, 256, 512\\]"),
        (dict(in_chans=1), "in_chans=1"),
        (dict(before_attn_dwconv=5), "kernel 3"),
    ],
)
def test_bad_configs_fail_with_a_fix(kwargs, message):
    model = models.create_model("debiformer_micro", **kwargs)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


def test_released_defaults_fail_clearly():
    # The release's DeBiFormer() defaults (width 320, topk -1) build no working model there either.
    model = models.create_model("debiformer")
    with pytest.raises(ValueError, match="topk=-1"):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))


def test_attention_module_any_size_and_impls():
    """The attention alone, off its region grid (11x7, n_win 3), with either depthwise impl."""
    x = jax.random.normal(jax.random.key(0), (1, 11, 7, 16))
    outs = {}
    for impl in ("shift", "conv"):
        routing = RoutingSettings(num_heads=2, n_win=3, topk=4, dwconv_impl=impl, topk_ties="torch", torch_init=True)
        attn = DeBiLevelRoutingAttention(dim=16, routing=routing, settings=(2, 3, 2, 2, 5))
        variables = jax.jit(attn.init)(jax.random.key(1), x)
        outs[impl] = jax.jit(attn.apply)(variables, x)
    assert outs["shift"].shape == x.shape and np.isfinite(outs["shift"]).all()
    np.testing.assert_allclose(outs["shift"], outs["conv"], rtol=1e-5, atol=1e-5)
    # Off the grid = the same module on the input zero-padded by hand to 12x9, cropped back
    # (the padded positions take part in attention, as in the release with auto_pad=True).
    # Measured: identical (difference 0.0).
    padded = jnp.pad(x, ((0, 0), (0, 1), (0, 2), (0, 0)))  # (1, 12, 9, 16): 3 divides both
    by_hand = jax.jit(attn.apply)(variables, padded)[:, :11, :7]  # the conv-impl module of the loop
    np.testing.assert_allclose(outs["conv"], by_hand, rtol=1e-6, atol=1e-6)
