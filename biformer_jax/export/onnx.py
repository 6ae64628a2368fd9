"""ONNX export through jax2onnx, checked with onnxruntime.

The graph is the same forward pass as the StableHLO artifact (weights as initializers), input
`images` (B, S, S, 3) float32 NHWC with B dynamic, output `logits` (B, classes) float32. It is
converted from the jaxpr by jax2onnx (pinned in requirements-onnx.txt), then run by onnxruntime on
CPU at batch 1 and 3 against model.apply (relative error <= 2e-6) before anything is written.

What converts (jax2onnx 0.17.1, checked on biformer_micro): routed attention `gather`, `masked`
and `auto` (which picks between them) with lax.top_k routing, and `dwconv_impl="conv"` (the
default here: one grouped ONNX Conv per depthwise convolution). The Pallas kernels (`pallas`,
`pallas_interpret`) are custom calls ONNX cannot express and are refused. A primitive jax2onnx
has no rule for, or fails to lower, is named in the error. DeBiFormer (routing_ties 'torch', a
top-k that replays PyTorch's tie order in a `while_loop`) fails in that loop's `rem` under the
dynamic batch; the export converts it with routing_ties='xla' (`convertible`: the same outputs,
which the check against model.apply with the checkpoint's own ties confirms).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import traceback
from typing import Any

from biformer_jax.export import common
from biformer_jax.tasks.classification import inference

TOLERANCE = 2e-6  # relative L2 error of the logits against model.apply (onnxruntime, float32): measured
# <= 2.6e-7 on biformer_micro; a tanh-approximate GELU gives 1.9e-5, which this refuses
OPSET = 23


def _require():
    try:
        import jax2onnx
        import onnxruntime
    except ImportError as e:
        raise common.ExportError(
            f"--format=onnx needs jax2onnx and onnxruntime ({e}): pip install --no-deps -r requirements-onnx.txt "
            "(the file says why --no-deps)."
        ) from None
    return jax2onnx, onnxruntime


@contextlib.contextmanager
def _fast_output_checks():
    """jax2onnx 0.17 checks, for every output of every converted equation, that the value it bound
    is connected to the graph by scanning all the nodes built so far (`output_binding.
    _value_is_graph_connected`): quadratic in the graph's size. While this is active the check
    answers at once where the value's own producer is a node of the builder's graph (onnx_ir
    keeps `node.graph`; that node is one the scan would find) and runs the original scan
    otherwise (graph inputs, initializers, matches by name, disconnected values): the same
    answers, so the same model. Measured (scratch, DeBiFormer micro at 32, 2-core CPU):
    conversion 55.3 -> 20.9 s of CPU, byte-identical ONNX. Without that function (another
    jax2onnx) nothing changes."""
    try:
        from jax2onnx.converter import output_binding
    except ImportError:
        yield
        return
    scan = getattr(output_binding, "_value_is_graph_connected", None)
    if scan is None:
        yield
        return

    def connected(ctx, value):
        node = value.producer() if hasattr(value, "producer") else None
        if node is not None and node.graph is ctx.builder.nodes and any(out is value for out in node.outputs):
            return True
        return scan(ctx, value)

    output_binding._value_is_graph_connected = connected
    try:
        yield
    finally:
        output_binding._value_is_graph_connected = scan


def convert(loaded: inference.Loaded) -> bytes:
    """The serialized ONNX model of `loaded`'s forward pass (batch dimension dynamic)."""
    jax2onnx, _ = _require()
    impl = loaded.model.attn_impl
    if str(impl).startswith("pallas"):
        raise common.ExportError(
            f"attn_impl={impl!r} runs Pallas kernels (custom calls), which ONNX cannot express; "
            "export with --attn_impl=auto (or gather / masked)."
        )
    if getattr(loaded.model, "scan_blocks", False):  # jax2onnx does not convert `while` (lax.scan)
        loaded = dataclasses.replace(loaded, model=loaded.model.clone(scan_blocks=False))
    s = loaded.preprocess.image_size
    try:
        with _fast_output_checks():
            proto = jax2onnx.to_onnx(
                common.serving_fn(loaded),
                [("B", s, s, 3)],
                model_name=str(loaded.meta["model"]),
                opset=OPSET,
                input_names=["images"],
                output_names=["logits"],
            )
    except Exception as e:  # noqa: BLE001 - any converter failure becomes one error naming the op
        match = re.search(r"primitive '([^']+)'", str(e))
        lowering = failing_primitives(e)
        if match:
            what = f"the JAX primitive {match.group(1)!r}"
        elif lowering:
            what = "the JAX primitive " + " inside ".join(repr(p) for p in reversed(lowering))
        else:
            what = "an operation"
        raise common.ExportError(
            f"ONNX cannot express {what} of {loaded.meta['model']} (jax2onnx: {type(e).__name__}: {e}). Try "
            "another --attn_impl / --dwconv_impl, or --format=stablehlo."
        ) from e
    return proto.SerializeToString()


def failing_primitives(error: BaseException) -> list[str]:
    """The JAX primitives jax2onnx was lowering when `error` was raised, outermost first
    (read from its plugin modules in the traceback, jax2onnx/plugins/jax/<ns>/<primitive>.py)."""
    names = []
    for frame in traceback.extract_tb(error.__traceback__):
        m = re.search(r"jax2onnx[/\\]plugins[/\\]jax[/\\]\w+[/\\](\w+)\.py$", frame.filename)
        if m and not m.group(1).startswith("_") and (not names or names[-1] != m.group(1)):
            names.append(m.group(1))
    return names


def convertible(loaded: inference.Loaded) -> inference.Loaded:
    """`loaded` with routing_ties='xla' where it was 'torch': the same outputs (tied regions hold
    identical keys and values), while the tie-replaying top-k (a while_loop) does not convert."""
    if getattr(loaded.model, "routing_ties", "xla") != "torch":
        return loaded
    return dataclasses.replace(loaded, model=loaded.model.clone(routing_ties="xla"))


def run_serialized(data: bytes, images):
    _, ort = _require()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images})[0]


def export_checkpoint(loaded: inference.Loaded, out: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Writes OUT (.onnx) and its spec JSON; returns the spec (with the check's errors)."""
    common.check_writable(out, overwrite=overwrite)
    exported_model = convertible(loaded)
    data = convert(exported_model)
    errors = common.check("onnx", lambda x: run_serialized(data, x), loaded, TOLERANCE)
    import jax2onnx
    import onnxruntime

    record = common.spec(
        loaded,
        kind="onnx",
        artifact=out,
        extra={
            "opset": OPSET,
            "converter": f"jax2onnx {getattr(jax2onnx, '__version__', '?')}",
            "implementations": {
                **{k: getattr(loaded.model, k) for k in inference.IMPL_OPTIONS},
                "routing_ties": getattr(exported_model.model, "routing_ties", None),
            },
            "check": {
                "relative_error": errors,
                "tolerance": TOLERANCE,
                "against": f"jit(model.apply), CPU; onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
            },
        },
    )
    common.write_atomically({common.spec_path(out): common.json_bytes(record), out: data}, overwrite=overwrite)
    return record
