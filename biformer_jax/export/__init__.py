"""Export for serving: `python -m biformer_jax.export --checkpoint=DIR --out=PATH [--format=stablehlo|onnx]`.

- `stablehlo` (biformer_jax.export.stablehlo): one `jax.export` artifact for cpu, cuda and tpu,
  batch size symbolic (height/width too for auto_pad BiFormer and DeBiFormer), weights baked in;
  `loader.py` here runs it with jax alone.
- `onnx` (biformer_jax.export.onnx): through jax2onnx, checked with onnxruntime.

Both write the preprocessing spec (common.spec) beside the artifact and check the artifact
against model.apply before writing anything (common.check, common.write_atomically).
"""

from biformer_jax.export.common import ExportError

__all__ = ["ExportError"]
