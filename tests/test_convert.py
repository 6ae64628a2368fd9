"""The PyTorch <-> Flax converter: exact round trips, mismatch reports, the .pth command line."""

import jax
import numpy as np
import pytest
from support import train_testlib
from support.golden import require

from biformer_jax import convert, models
from biformer_jax.convert import CheckpointMismatchError


def test_round_trip_official_state_dict_is_exact():
    g = require("biformer_tiny")
    sd = g.state_dict()
    sd["downsample_layers.0.1.num_batches_tracked"] = np.array(12345, np.int64)
    model = models.create_model("biformer_tiny")
    back = convert.to_torch_state_dict(convert.from_torch_state_dict(sd, model))
    assert list(sorted(back)) == list(sorted(sd))
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_round_trip_flax_variables_is_exact():
    model = models.create_model(
        "biformer",
        depth=(1, 1, 1, 1),
        embed_dim=(16, 32, 64, 64),
        qk_dims=(16, 32, 64, 64),
        head_dim=8,
        n_win=2,
        topks=(2, 2, -1, 0),
        kv_downsample_mode="ada_maxpool",
        kv_per_wins=(2, 2, -1, -1),
        layer_scale_init_value=0.1,
        mlp_dwconv=True,
        param_routing=True,
        diff_routing=True,
        soft_routing=True,
        num_classes=3,
    )
    variables = train_testlib.random_variables(model, image_size=64)  # numpy noise: no init to compile
    sd = convert.to_torch_state_dict(variables)
    assert sd["stages.0.0.attn.router.emb.weight"].shape == (16, 16)
    assert sd["stages.3.0.attn.1.weight"].shape == (64, 64, 1, 1)  # pseudo attention's 1x1 conv
    assert sd["stages.0.0.mlp.1.dwconv.weight"].shape == (64, 1, 3, 3)  # (out, in/groups, kh, kw), mlp_ratio 4
    assert sd["stages.0.0.gamma1"].shape == (16,)
    back = convert.from_torch_state_dict(sd, model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, jax.device_get(variables))


def test_mismatches_are_listed_and_nothing_is_half_done():
    g = require("biformer_tiny")
    sd = g.state_dict()
    with pytest.raises(CheckpointMismatchError) as e:
        convert.from_torch_state_dict(sd, models.create_model("biformer_small"))
    assert "stages.0.3.norm1.weight" in str(e.value) and "missing" in str(e.value)

    with pytest.raises(CheckpointMismatchError) as e:
        convert.from_torch_state_dict(sd, models.create_model("biformer_tiny", num_classes=10))
    assert "head.weight: checkpoint (1000, 512), model (10, 512)" in str(e.value)

    extra = dict(sd, **{"stages.9.0.foo": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        convert.from_torch_state_dict(extra, models.create_model("biformer_tiny"))
    # DistributedDataParallel's prefix is understood; features_only drops the head with strict=False.
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    backbone = models.create_model("biformer_tiny", features_only=True)
    variables = convert.from_torch_state_dict(wrapped, backbone, strict=False)
    assert "head" not in variables["params"]
