"""StableHLO export with symbolic height/width: auto_pad BiFormer and DeBiFormer micro models.

Each checkpoint is a micro model with numpy-noise weights saved as converted weights (no
training), loaded with the quickstart's preprocessing (32x32). The exporter checks its artifact
against model.apply at 32x32, 28x42 and 13x19, batch 1 and 3 (DeBiFormer's: 32x32); the standalone
loader then runs it at another, odd size against model.apply again.
"""

from __future__ import annotations

import json
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export
from support import required, train_testlib

from biformer_jax import models
from biformer_jax.convert import files as convert_files
from biformer_jax.export import common, shape_arithmetic
from biformer_jax.export import stablehlo as stablehlo_export
from biformer_jax.tasks.classification import inference
from biformer_jax.training import checkpoint

ROOT = train_testlib.ROOT
TOLERANCE = 1e-6
# 7 pooled K/V tokens per region at stage 1 need regions of 2x2: side >= 2**3 * n_win 2 * (2 - 1) + 1.
POOLED = dict(auto_pad=True, kv_downsample_mode="maxpool", kv_downsample_ratios=(2, 2, 1, 1))


def _loaded(tmp_path, name, **kwargs):
    kwargs = {"num_classes": 10, **kwargs}
    model = models.create_model(name, **kwargs)
    meta = {"format": checkpoint.VARIABLES_FORMAT, "model": name, "model_kwargs": kwargs}
    convert_files.save_converted(tmp_path / "ckpt", train_testlib.random_variables(model), meta)
    overrides = {"attn_impl": "auto", "dwconv_impl": "conv"}  # what the export CLI passes by default
    return inference.load(str(tmp_path / "ckpt"), config=train_testlib.micro_config(), model_overrides=overrides)


def _round_trip(tmp_path, loaded, sizes, checked=((32, 32), (28, 42), (13, 19)), batches=(1, 3)):
    out = tmp_path / "model.stablehlo"
    record = stablehlo_export.export_checkpoint(loaded, str(out))
    errors = record["check"]["relative_error"]
    assert sorted(errors) == sorted(f"{h}x{w}_batch_{n}" for h, w in checked for n in (1, 3)), errors
    assert max(errors.values()) <= TOLERANCE, errors
    spec = json.loads((tmp_path / "model.stablehlo.json").read_text())
    assert spec["input"]["shape"] == [None, None, None, 3]
    assert set(spec["symbolic_dims"]) == {"b", "h", "w"} and spec["platforms"] == ["cpu", "cuda", "tpu"]
    predictor = runpy.run_path(str(ROOT / "biformer_jax" / "export" / "loader.py"))["load"](str(out))
    assert shape_arithmetic.scalar_calls(predictor.exported) == 0  # the stage sizes' divisions inlined
    rng = np.random.default_rng(3)
    measured = {}
    for h, w in sizes:
        x = [rng.standard_normal((n, h, w, 3)).astype(np.float32) for n in batches]
        for xn, want in zip(x, common.reference_outputs(loaded, x)):
            measured[f"{h}x{w}_batch_{len(xn)}"] = common.relative_error(predictor.logits(xn), want)
    print(json.dumps({"model": loaded.meta["model"], "exporter_check": errors, "loader": measured}))
    assert all(e <= TOLERANCE for e in measured.values()), measured
    return spec, predictor


def test_auto_pad_biformer_exports_with_symbolic_size(tmp_path):
    """About 35-55 s in the suite: a symbolic-size artifact compiles per call shape (as for
    DeBiFormer below, more slowly than a fixed-size one), here at 4 sizes x 2 batches."""
    loaded = _loaded(tmp_path, "biformer_micro", auto_pad=True)
    spec, _ = _round_trip(tmp_path, loaded, [(97, 131)])
    assert spec["min_size"] == [1, 1]
    jax.clear_caches()


def test_debiformer_exports_with_symbolic_size(tmp_path, monkeypatch):
    """About 45 s alone (82 s before shape_arithmetic.compact, 2-6 min in the suite beside the
    other worker): DeBiFormer's export and its reference forward passes compile slowly, and each
    call shape of its symbolic artifact took 20-25 s of CPU, 12-15 s of it jax's shape refinement,
    before the export merged its shape arithmetic (~3 s now). DeBiFormer is called at 3 shapes,
    each a different case: the exporter's check at the image size (no region padding) at batch 1
    and 3, and the standalone loader at an odd size (21x27) at batch 3 (BiFormer's test above runs
    the whole matrix of sizes and batches)."""
    monkeypatch.setattr(stablehlo_export, "check_sizes", lambda s, m: [(32, 32)])
    loaded = _loaded(tmp_path, "debiformer_micro")
    _round_trip(tmp_path, loaded, [(21, 27)], checked=((32, 32),), batches=(3,))  # the loader's call
    jax.clear_caches()


def test_too_small_an_input_is_refused_clearly(tmp_path, monkeypatch):
    """The exporter checks only the size its minimum clamps (13x19 -> 17x19; the other check
    sizes are the auto-pad test's), each call shape of a symbolic artifact being a compile."""
    loaded = _loaded(tmp_path, "biformer_micro", **POOLED)
    assert stablehlo_export.min_side(loaded.model) == 17
    sizes = stablehlo_export.check_sizes
    assert sizes(32, 17) == [(32, 32), (28, 42), (17, 19)]  # 13x19 raised to the minimum
    monkeypatch.setattr(stablehlo_export, "check_sizes", lambda s, m: [hw for hw in sizes(s, m) if m in hw])
    out = tmp_path / "model.stablehlo"
    record = stablehlo_export.export_checkpoint(loaded, str(out))
    assert record["min_size"] == [17, 17] and "17" in record["symbolic_dims"]["h"]
    errors = record["check"]["relative_error"]
    assert sorted(errors) == ["17x19_batch_1", "17x19_batch_3"] and max(errors.values()) <= TOLERANCE, errors
    predictor = runpy.run_path(str(ROOT / "biformer_jax" / "export" / "loader.py"))["load"](str(out))
    x = np.zeros((1, 16, 40, 3), np.float32)
    with pytest.raises(ValueError, match="16x40 images are too small for this model: it needs at least 17x17"):
        predictor.logits(x)
    with pytest.raises(ValueError):  # the artifact's own constraint h >= 17 (its message is opaque)
        predictor.exported.call(x)
    with pytest.raises(ValueError, match="pools 2x2 tokens, but the regions hold 1x3"):  # and model.apply
        loaded.model.apply(loaded.variables, x)
    np.testing.assert_array_equal(predictor.logits(np.zeros((1, 17, 40, 3), np.float32)).shape, (1, 10))
    jax.clear_caches()


def test_models_without_auto_pad_keep_a_fixed_size(tmp_path):
    loaded = _loaded(tmp_path, "biformer_micro")
    assert "auto_pad=False" in stablehlo_export.fixed_size_reason(loaded.model)
    with pytest.raises(common.ExportError, match="Height and width cannot be symbolic: the model has auto_pad=False"):
        stablehlo_export.export(loaded, symbolic_size=True)
    exported = stablehlo_export.export(loaded)
    assert str(exported.in_avals[0].shape) == "(b, 32, 32, 3)"
    pallas = inference.load(
        str(tmp_path / "ckpt"), config=train_testlib.micro_config(), model_overrides={"attn_impl": "pallas"}
    )
    assert "Pallas kernels" in stablehlo_export.fixed_size_reason(pallas.model)


def _ceil_pool(x):
    """A symbolic-shape function with the stage arithmetic of the models: nested ceiling divisions."""
    for k in (2, 3, 2):
        h, w = x.shape[1:3]
        x = jnp.pad(x, ((0, 0), (0, -h % k), (0, -w % k), (0, 0)))  # (b, k*ceil(h/k), k*ceil(w/k), c)
        x = x.reshape(x.shape[0], x.shape[1] // k, k, x.shape[2] // k, k, x.shape[3]).mean((2, 4)) * 0.5 + 1.0
    return x


def test_compact_shape_arithmetic_keeps_every_value(caplog):
    """`shape_arithmetic.compact` inlines jax's scalar divmod helpers and merges the repeats: the
    artifact computes the same bits at every shape; where the rewrite fails the original is kept."""
    b, h, w = jax_export.symbolic_shape("b, h, w")
    exported = jax_export.export(jax.jit(_ceil_pool), platforms=("cpu", "cuda", "tpu"))(
        jax.ShapeDtypeStruct((b, h, w, 2), jnp.float32)
    )
    compact = shape_arithmetic.compact(exported)
    assert shape_arithmetic.scalar_calls(exported) > 0 and shape_arithmetic.scalar_calls(compact) == 0
    assert len(compact.mlir_module()) < len(exported.mlir_module())
    assert (compact.in_avals, compact.out_avals, compact.platforms) == (
        exported.in_avals,
        exported.out_avals,
        exported.platforms,
    )
    reloaded = jax_export.deserialize(bytearray(compact.serialize()))
    rng = np.random.default_rng(0)
    for shape in ((1, 1, 1, 2), (2, 7, 5, 2), (3, 12, 13, 2), (1, 25, 9, 2)):
        x = rng.standard_normal(shape).astype(np.float32)
        want = np.asarray(exported.call(x))
        np.testing.assert_array_equal(np.asarray(reloaded.call(x)), want)
        np.testing.assert_allclose(want, _ceil_pool(x), rtol=1e-6)

    def refuse(module):
        raise RuntimeError("no bytecode here")

    from jax._src.export import _export

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_export, "_module_to_bytecode", refuse)
        assert shape_arithmetic.compact(exported) is exported
    assert (
        "Kept the symbolic artifact's shape arithmetic as jax wrote it (RuntimeError: no bytecode here)" in caplog.text
    )


def test_region_padding_traces_with_symbolic_dims():
    """The ceiling-division padding of every routed map: p divides the padded size symbolically."""
    from biformer_jax.models.routing import region_grid

    h, w = jax_export.symbolic_shape("h, w")
    rh, rw, (pb, pr) = region_grid(h, w, 7, auto_pad=True)
    assert (7 * rh) // 7 == rh and (h + pb) == 7 * rh and (w + pr) == 7 * rw
    for side in (1, 6, 7, 8, 97, 224):
        got = region_grid(side, side, 7, auto_pad=True)
        assert got == (-(-side // 7), -(-side // 7), ((-side) % 7, (-side) % 7)), side
    with pytest.raises(ValueError, match="symbolic height/width need auto_pad=True"):
        region_grid(h, w, 7, auto_pad=False)


def test_debiformer_to_onnx_names_the_op_it_cannot_express_and_converts_with_xla_ties(tmp_path):
    """About 25-35 s (65-75 s before export.onnx's shortcut for jax2onnx's output scan): the refused
    conversion traces DeBiFormer, the second converts it and checks the ONNX model against
    model.apply at batch 1 and 3."""
    required.onnxruntime()
    from biformer_jax.export import onnx as onnx_export

    loaded = _loaded(tmp_path, "debiformer_micro")
    assert loaded.model.routing_ties == "torch"
    with pytest.raises(common.ExportError, match=r"ONNX cannot express the JAX primitive 'rem' inside .*'while_loop'"):
        onnx_export.convert(loaded)  # the routers' tie-replaying top-k
    record = onnx_export.export_checkpoint(loaded, str(tmp_path / "model.onnx"))
    print(json.dumps({"model": "debiformer_micro", "onnx": record["check"]["relative_error"]}))
    assert record["implementations"]["routing_ties"] == "xla"
    assert max(record["check"]["relative_error"].values()) <= onnx_export.TOLERANCE  # against the torch-ties model
    jax.clear_caches()
