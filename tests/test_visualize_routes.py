"""The routes overlay draws exactly the recorded routes, and attention that is a distribution over them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from support import train_testlib

from biformer_jax import models
from biformer_jax.convert.files import save_converted
from biformer_jax.ops.heads import split_heads
from biformer_jax.training import checkpoint
from biformer_jax.visualize import __main__ as cli
from biformer_jax.visualize import drawing, inputs, routes

SIZE = (72, 80)  # not a multiple of the region grid at stage 1 or 2: auto_pad at work


def _setup(name):
    """The model with numpy-noise weights (its init compiles slowly: DeBiFormer-micro's 19 s in
    the suite), an image of SIZE and its normalised batch."""
    model = inputs.build_model(name)
    loaded = inputs.Loaded(model, train_testlib.random_variables(model, seed=3), name, f"{name} (noise)")
    image = (np.asarray(jax.random.uniform(jax.random.key(4), (*SIZE, 3))) * 255).astype(np.uint8)
    x = inputs.normalize(image[None], inputs.IMAGENET_MEAN, inputs.IMAGENET_STD)
    return loaded, image, x


def _recorded_routes(loaded, x):
    """Every routed block's recorded routes, in block order (one jitted forward pass)."""

    @jax.jit
    def forward(variables, x):
        _, state = loaded.model.apply(variables, x, train=False, mutable=["intermediates"])
        return models.collect_routes(state["intermediates"])

    return [np.asarray(r) for r in forward(loaded.variables, x)]


def _routed_mask(qr):
    hh, ww = qr.padded_hw
    h, w = qr.region_hw
    region_of = (np.arange(hh)[:, None] // h) * qr.n_win + np.arange(ww)[None, :] // w  # (H, W)
    return np.isin(region_of, qr.routes)


def _check_distribution(qr):
    mask = _routed_mask(qr)
    assert mask.sum() == len(qr.routes) * qr.region_hw[0] * qr.region_hw[1]
    np.testing.assert_allclose(qr.heads[:, mask].sum(-1), 1.0, rtol=1e-5)  # every head
    np.testing.assert_allclose(qr.attention[mask].sum(), 1.0, rtol=1e-5)
    assert np.all(qr.heads[:, ~mask] == 0.0)
    assert np.all(qr.heads[:, mask] > 0.0)


def _drawn_routes(fig):
    """(rank, region) of every outlined region, read from the figure's patches, with the region
    recomputed from each rectangle's position on the grid."""
    out = []
    for ax in fig.axes:
        for patch in ax.patches:
            gid = patch.get_gid() or ""
            if gid.startswith("route:"):
                _, rank, region = gid.split(":")
                out.append((ax, int(rank), int(region), patch))
    return out


@pytest.fixture(scope="module")
def biformer_case():
    loaded, image, x = _setup("biformer_micro")  # stage 2: 2 blocks, n_win 2, topk 2
    queries = [(5, 7), (40, 70), (71, 79)]
    results = routes.query_routes(loaded.model, loaded.variables, x, 2, -1, queries)
    return loaded, image, x, queries, results


def test_routes_are_the_recorded_ones_in_score_order(biformer_case):
    loaded, image, x, queries, results = biformer_case
    recorded = _recorded_routes(loaded, x)[3]  # stage 0: 1, stage 1: 1, stage 2: blocks 2, 3
    fig = drawing.routes_figure(image, results)
    drawn = _drawn_routes(fig)
    for q, (row, ax) in enumerate(zip(results, fig.axes)):
        (qr,) = row
        assert qr.module == "stages_2_1/attn" and qr.stride == 16
        np.testing.assert_array_equal(qr.routes, recorded[0, qr.region])
        assert np.all(np.diff(qr.weights) <= 0)  # numbered by descending routing score
        mine = sorted((rank, region, patch) for a, rank, region, patch in drawn if a is ax)
        assert [region for _, region, _ in mine] == recorded[0, qr.region].tolist()
        rh = qr.padded_hw[0] * qr.stride / qr.n_win
        rw = qr.padded_hw[1] * qr.stride / qr.n_win
        for _, region, patch in mine:  # the outline sits on that region of the grid
            cx, cy = patch.get_x() + patch.get_width() / 2, patch.get_y() + patch.get_height() / 2
            assert int(cy // rh) * qr.n_win + int(cx // rw) == region
        query_patch = [p for p in ax.patches if (p.get_gid() or "").startswith("query_region:")]
        assert [p.get_gid() for p in query_patch] == [f"query_region:{qr.region}"]
        ty, tx = queries[q][0] // 16, queries[q][1] // 16
        assert qr.token == (min(ty, qr.map_hw[0] - 1), min(tx, qr.map_hw[1] - 1))


def test_attention_is_a_distribution_over_the_routed_tokens(biformer_case):
    for (qr,) in biformer_case[4]:
        _check_distribution(qr)


def test_recomputed_attention_reproduces_the_module_output(biformer_case):
    loaded, _, x, _, results = biformer_case
    inter = routes.capture(loaded.model, loaded.variables, x, "stages_2_1")["attn"]
    q, kv = inter["qkv"]["__call__"][0]  # padded (1, H, W, Cqk), (1, H, W, Cqk + C)
    lepe = inter["lepe"]["__call__"][0]  # (1, H, W, C)
    out = inter["__call__"][0]  # (1, H_in, W_in, C): the module's output
    wo = loaded.variables["params"]["stages_2_1"]["attn"]["wo"]
    qk = q.shape[-1]
    for (qr,) in results:
        v = split_heads(kv[..., qk:].reshape(1, 1, -1, kv.shape[-1] - qk), qr.heads.shape[0])[0, 0]  # (m, HW, c)
        mixed = jnp.einsum("mt,mtc->mc", qr.heads.reshape(qr.heads.shape[0], -1), v).reshape(-1)  # (C,)
        ty, tx = qr.token
        y = (mixed + lepe[0, ty, tx]) @ wo["kernel"] + wo["bias"]
        np.testing.assert_allclose(y, out[0, ty, tx], rtol=2e-4, atol=2e-5)


def test_debiformer_routes_points_and_attention():
    loaded, image, x = _setup("debiformer_micro")
    results = routes.query_routes(loaded.model, loaded.variables, x, 1, 0, [(10, 60)])
    (row,) = results
    assert [qr.module for qr in row] == ["stages_1_0/attn1", "stages_1_0/attn2"]
    assert [qr.kind for qr in row] == ["bra", "deformable"]
    recorded, recorded2 = _recorded_routes(loaded, x)[2:4]  # stage 0 block: attn1, attn2; then stage 1
    np.testing.assert_array_equal(row[0].routes, recorded[0, row[0].region])
    np.testing.assert_array_equal(row[1].routes, recorded2[0, row[1].region])
    for qr in row:
        _check_distribution(qr)
    pts = row[1].points  # stage 1 of debiformer_micro: 2 groups, one point per 4x4 tokens
    assert pts.shape[0] == 2 and pts.shape[2] == 2 and pts.shape[1] >= 1
    canvas = np.array(row[1].padded_hw) * row[1].stride
    assert np.all(pts >= 0) and np.all(pts <= canvas)
    fig = drawing.routes_figure(image, results)
    drawn = [c.get_gid() for ax in fig.axes for c in ax.collections if (c.get_gid() or "").startswith("points:")]
    assert drawn == ["points:0", "points:1"]
    offsets = [c.get_offsets() for ax in fig.axes for c in ax.collections if c.get_gid() == "points:0"][0]
    np.testing.assert_allclose(offsets, pts[0][:, ::-1])


def _checkpoint(tmp_path, name="biformer_micro"):  # as `python -m biformer_jax.convert` writes it
    loaded = inputs.random_model(name)
    path = tmp_path / name
    save_converted(path, loaded.variables, {"format": checkpoint.VARIABLES_FORMAT, "model": name, "model_kwargs": {}})
    return str(path)


def test_bad_input_gets_a_clear_message(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = tmp_path / "ok.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    base = ["routes", f"--checkpoint={ckpt}", f"--out={tmp_path / 'o.png'}"]
    cases = [
        ([f"--image={bad}"], "Cannot read"),
        ([f"--image={tmp_path / 'missing.png'}"], "No image at"),
        ([f"--image={good}", "--query=10,64"], "outside the 64x64 image"),
        ([f"--image={good}", "--stage=5"], "Stage 5 does not exist"),
        ([f"--image={good}", "--stage=2", "--block=2"], "Stage 2 has 2 blocks, so block 2 does not exist"),
        ([f"--image={good}", "--stage=3"], "has no routed attention"),
        (
            [f"--image={good}", "--model=debiformer_micro"],
            "is a checkpoint of 'biformer_micro', not of 'debiformer_micro'",
        ),
        ([f"--image={good}", "--checkpoint=" + str(tmp_path / "nothing")], "No checkpoint at"),
    ]
    for extra, message in cases:
        assert cli.main(base + extra) == 1, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
    assert not (tmp_path / "o.png").exists()  # nothing half-written


def test_a_checkpoint_whose_arrays_are_another_models_is_refused(tmp_path):
    loaded = inputs.random_model("biformer_micro")
    path = tmp_path / "mislabelled"
    meta = {"format": checkpoint.VARIABLES_FORMAT, "model": "debiformer_micro", "model_kwargs": {}}
    save_converted(path, loaded.variables, meta)  # the converter's output, mislabelled
    with pytest.raises(checkpoint.CheckpointMismatchError, match="does not match"):
        inputs.load_checkpoint(str(path))
