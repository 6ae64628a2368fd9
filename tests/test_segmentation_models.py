"""Semantic FPN / UperNet models: PyTorch's resize arithmetic, micro models end to end, the
mmseg key layout of the official checkpoints, the converter on it (round trip, mismatches,
the command line)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from support import required, train_testlib
from support.golden import GOLDEN_DIR

from biformer_jax import convert, models
from biformer_jax.convert import CheckpointMismatchError
from biformer_jax.convert.__main__ import main as convert_main
from biformer_jax.convert.files import load_converted
from biformer_jax.ops.resize import adaptive_avg_pool, resize_bilinear, resize_nearest

MICRO = ["sfpn_biformer_micro", "upernet_biformer_micro", "sfpn_debiformer_micro"]
OFFICIAL = ["sfpn_biformer_small", "upernet_biformer_small", "sfpn_debiformer_small"]
# golden/README.md's counts; they are the state_dict's numel, BatchNorm buffers included.
STATE_DICT_NUMEL = {"sfpn_biformer_small": 29_278_178, "upernet_biformer_small": 55_346_558}
STATE_DICT_NUMEL["sfpn_debiformer_small"] = 47_749_974


# --- PyTorch's resize arithmetic -------------------------------------------------------


@pytest.mark.parametrize(
    "in_hw,out_hw",
    [((5, 7), (10, 14)), ((9, 7), (72, 56)), ((13, 25), (25, 13)), ((64, 80), (256, 320)), ((7, 5), (3, 2))],
)
def test_resize_matches_torch_interpolate(in_hw, out_hw):
    torch = required.torch()
    x = np.random.default_rng(0).standard_normal((2, 3, *in_hw)).astype(np.float32)
    ours = {
        "bilinear": np.asarray(resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), out_hw)),
        "nearest": np.asarray(resize_nearest(jnp.asarray(x.transpose(0, 2, 3, 1)), out_hw)),
    }
    for mode, got in ours.items():
        kw = {"align_corners": False} if mode == "bilinear" else {}
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=out_hw, mode=mode, **kw).numpy()
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), ref, rtol=0, atol=2e-6, err_msg=mode)


@pytest.mark.parametrize("in_hw,out", [((9, 7), 6), ((8, 10), 3), ((18, 14), 2), ((5, 5), 1), ((4, 3), 6)])
def test_adaptive_avg_pool_matches_torch(in_hw, out):
    torch = required.torch()
    x = np.random.default_rng(1).standard_normal((2, 4, *in_hw)).astype(np.float32)
    got = np.asarray(adaptive_avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), (out, out)))
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), out).numpy()
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), ref, rtol=0, atol=1e-6)


def test_bilinear_downsampling_does_not_antialias():
    # A checkerboard halved by PyTorch's bilinear (no antialiasing) samples between pixels:
    # every output is the mean of two neighbours, 0.5; an antialiasing resize would blur more.
    x = (np.indices((8, 8)).sum(0) % 2).astype(np.float32)[None, :, :, None]
    y = np.asarray(resize_bilinear(jnp.asarray(x), (4, 4)))
    np.testing.assert_allclose(y, 0.5)


# --- micro models end to end -----------------------------------------------------------


@pytest.mark.parametrize("name", MICRO)
def test_micro_models_eval_and_train(name):
    # DeBiFormer's with XLA's depthwise conv and top-k: the one program compiles in about half
    # the time; its CPU defaults (shifted sums, torch's ties) are held to the release by
    # test_golden_segmentation, and to these implementations by test_debiformer.
    cheaper = dict(dwconv_impl="conv", routing_ties="xla") if "debiformer" in name else {}
    model = models.create_model(name, num_classes=5, **cheaper)
    x = jax.random.normal(jax.random.key(0), (2, 72, 88, 3))  # not a multiple of 32: auto_pad and ceil sizes
    variables = train_testlib.random_variables(model, seed=1)  # noise weights: no init to compile
    upernet = name.startswith("upernet")
    assert ("auxiliary_head" in variables["params"]) == upernet

    def loss(params):
        out, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            return_aux=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(2), "drop_path": jax.random.key(3)},
        )
        logits, aux = out
        total = jnp.mean(logits**2) + (0.4 * jnp.mean(aux**2) if aux is not None else 0.0)
        return total, updates

    @jax.jit  # one program for both modes: compiling is what takes the time here
    def run(variables):
        evaluated = model.apply(variables, x, train=False, return_aux=True, return_features=True)
        return evaluated, jax.grad(loss, has_aux=True)(variables["params"])

    (logits, aux, features), (grads, updates) = run(variables)
    assert logits.shape == (2, 18, 22, 5) and logits.dtype == jnp.float32
    assert [f.shape[1:3] for f in features] == [(18, 22), (9, 11), (5, 6), (3, 3)]
    assert aux is None if not upernet else aux.shape == (2, 5, 6, 5)
    assert np.isfinite(np.asarray(logits)).all()
    norms = {k: float(optax_norm(v)) for k, v in grads.items()}
    assert all(np.isfinite(v) and v > 0 for v in norms.values()), norms
    stats = traverse_util.flatten_dict(updates["batch_stats"])
    counts = [v for k, v in stats.items() if k[-1] == "num_batches_tracked"]
    assert counts and all(int(c) == 1 for c in counts)  # every BatchNorm ran on batch statistics


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree_util.tree_leaves(tree)))


def test_channel_dropout_drops_whole_maps():
    from biformer_jax.models.segmentation.heads import FCNHead

    feats = [jax.random.normal(jax.random.key(0), (2, 6, 6, 4))]
    head = FCNHead(num_classes=3, channels=8, in_index=0, dropout_ratio=0.5)
    variables = head.init(jax.random.key(1), feats)
    # conv_seg as the identity on the first 3 channels: the output then shows the dropout mask.
    eye = jnp.zeros((1, 1, 8, 3)).at[0, 0, jnp.arange(3), jnp.arange(3)].set(1.0)
    params = {**variables["params"], "conv_seg": {"kernel": eye, "bias": jnp.zeros(3)}}

    def run(ratio):
        out, _ = head.clone(dropout_ratio=ratio).apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            feats,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(5)},
        )
        return np.asarray(out).reshape(2, 36, 3)

    out, ref = run(0.5), run(0.0)
    dropped = np.all(out == 0, axis=1)  # (N, C)
    kept = np.all(np.isclose(out, 2 * ref, rtol=1e-6, atol=1e-7), axis=1)  # kept maps scale by 1/(1 - 0.5)
    assert np.all(dropped | kept) and dropped.any() and kept.any() and np.any(ref != 0)


def test_create_model_routes_overrides_and_rejects_unknown_ones():
    m = models.create_model("upernet_biformer_small", num_classes=19, drop_path_rate=0.0, attn_impl="masked")
    assert m.num_classes == 19 and m.backbone_config["drop_path_rate"] == 0.0
    assert m.backbone_config["attn_impl"] == "masked" and m.backbone_config["n_win"] == 8
    assert m.auxiliary_head and m.decode_head == "uper"
    d = models.create_model("sfpn_debiformer_small")
    assert d.backbone_config["all_regions_topk"] == 49 and d.backbone_config["drop_path_rate"] == 0.15
    assert models.create_model("upernet_debiformer_small").backbone_config["drop_path_rate"] == 0.0
    assert "sfpn_biformer_base" in models.list_models()
    with pytest.raises(TypeError, match="no_such_arg"):
        models.create_model("sfpn_biformer_small", no_such_arg=1)


def test_backbone_initialises_from_a_classifier():
    from biformer_jax.models.segmentation import init_backbone_from_classifier

    def weights(model, seed):  # numpy noise, a different draw per model: no init to compile
        return train_testlib.random_variables(model, seed=seed, image_size=64)

    classifier = weights(models.create_model("biformer_micro"), 0)
    seg = weights(models.create_model("sfpn_biformer_micro"), 1)
    out, loaded, fresh = init_backbone_from_classifier(seg, classifier)
    assert any(p.startswith("params/backbone/stages_2_1/attn/") for p in loaded)
    assert "batch_stats/backbone/downsample_layers_0/1/mean" in loaded
    assert {p.split("/")[1] for p in fresh} == {"backbone", "neck", "decode_head"}
    assert all("/extra_norms_" in p for p in fresh if p.split("/")[1] == "backbone")
    flat = traverse_util.flatten_dict(out, sep="/")
    source = traverse_util.flatten_dict(classifier, sep="/")
    before = traverse_util.flatten_dict(seg, sep="/")
    for path in loaded:
        collection, _, *inner = path.split("/")
        np.testing.assert_array_equal(flat[path], source["/".join([collection, *inner])], err_msg=path)
    for path in fresh:
        np.testing.assert_array_equal(flat[path], before[path], err_msg=path)
    other = models.create_model("biformer_micro", embed_dim=(16, 32, 64, 64), qk_dims=(16, 32, 64, 64))
    with pytest.raises(ValueError, match="stages_3_0"):
        init_backbone_from_classifier(seg, weights(other, 2))


# --- the mmseg key layout and the converter --------------------------------------------


def _abstract_state_dict(model) -> dict[str, tuple]:
    abstract = convert.abstract_variables(model)
    return {
        convert.torch_key(c, p, len(s.shape)): tuple(convert._to_torch_layout(p, np.empty(s.shape, np.int8)).shape)
        for c, tree in abstract.items()
        for p, s in traverse_util.flatten_dict(tree).items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", OFFICIAL)
def test_official_mmseg_keys_shapes_and_counts(name):
    manifest = GOLDEN_DIR / f"{name}.manifest.json"
    if not manifest.exists():
        required.missing(f"{manifest} not found (set BIFORMER_GOLDEN_DIR)", required.GOLDEN_ENV)
    official = {n: tuple(s) for n, s, _ in json.loads(manifest.read_text())["state_dict"]}
    ours = _abstract_state_dict(models.create_model(name))
    assert sorted(set(official) - set(ours)) == [] and sorted(set(ours) - set(official)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}
    assert sum(int(np.prod(s)) for s in ours.values()) == STATE_DICT_NUMEL[name]


@pytest.mark.parametrize("name", MICRO)
def test_round_trip_is_exact_and_mismatches_are_named(name):
    model = models.create_model(name)
    variables = train_testlib.random_variables(model)
    sd = convert.to_torch_state_dict(variables)
    prefixes = {k.split(".")[0] for k in sd}
    heads = {"decode_head", "auxiliary_head"} if "upernet" in name else {"neck", "decode_head"}
    assert prefixes == {"backbone", *heads}
    back = convert.from_torch_state_dict(sd, model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)
    again = convert.to_torch_state_dict(back)
    assert list(again) == list(sd)
    assert all(np.array_equal(again[k], v) and again[k].dtype == v.dtype for k, v in sd.items())

    broken = dict(sd)
    del broken["decode_head.conv_seg.bias"]
    broken["decode_head.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        convert.from_torch_state_dict(broken, model)
    assert "decode_head.conv_seg.bias" in str(e.value) and "decode_head.extra.weight" in str(e.value)
    with pytest.raises(CheckpointMismatchError, match=r"decode_head.conv_seg.weight: checkpoint \(150, "):
        convert.from_torch_state_dict(sd, models.create_model(name, num_classes=19))


def test_command_line_converts_an_mmseg_checkpoint(tmp_path, capsys):
    torch = required.torch()
    model = models.create_model("upernet_biformer_micro", num_classes=4)
    variables = train_testlib.random_variables(model, image_size=64)  # numpy noise: no init to compile
    sd = convert.to_torch_state_dict(variables)
    classes = ("wall", "floor", "sky", "tree")
    obj = {
        "meta": {"CLASSES": classes, "PALETTE": [[1, 2, 3]] * 4, "iter": 160000},
        "state_dict": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
    }
    torch.save(obj, tmp_path / "iter_160000.pth")  # mmseg's layout
    out = tmp_path / "converted"
    pth = tmp_path / "iter_160000.pth"
    argv = ["--model=upernet_biformer_micro", '--model-kwargs={"num_classes": 4}', f"--input={pth}"]
    assert convert_main([*argv, f"--output={out}"]) == 0
    restored, meta = load_converted(out)
    assert meta["weights"] == "state_dict" and meta["classes"] == list(classes)
    back = convert.to_torch_state_dict(restored)
    assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], v) for k, v in sd.items())
    # The wrong head width: every mismatch is listed and nothing is written.
    assert convert_main(["--model=upernet_biformer_micro", argv[2], f"--output={tmp_path / 'no'}"]) == 1
    err = capsys.readouterr().err
    assert "decode_head.conv_seg.weight" in err and "auxiliary_head.conv_seg.weight" in err
    assert not (tmp_path / "no").exists()
