"""init_from for segmentation: a classifier checkpoint fills the backbone by name, nothing half-loads."""

import numpy as np
import pytest

from biformer_jax.models.from_config import CheckpointMismatchError
from biformer_jax.tasks.segmentation.init import merge_weights


def z(*shape):
    return np.zeros(shape, np.float32)


def seg_tree(num_classes=5):
    return {
        "params": {
            "backbone": {"stages_0_0": {"w": z(4, 4)}, "extra_norms_0": {"scale": z(4)}},
            "neck": {"w": z(4, 8)},
            "decode_head": {"conv_seg": {"kernel": z(1, 1, 8, num_classes)}},
        },
        "batch_stats": {"backbone": {"downsample_layers_0_1": {"mean": z(4)}}},
    }


def test_classifier_checkpoint_fills_the_backbone_only():
    saved = {
        "params": {
            "stages_0_0": {"w": np.ones((4, 4))},
            "norm": {"scale": np.ones(4)},
            "head": {"kernel": np.ones((4, 10))},
        },
        "batch_stats": {"downsample_layers_0_1": {"mean": np.full(4, 2.0)}},
    }
    merged, report = merge_weights(saved, seg_tree(), "ckpt")
    assert (merged["params"]["backbone"]["stages_0_0"]["w"] == 1).all()
    assert (merged["batch_stats"]["backbone"]["downsample_layers_0_1"]["mean"] == 2).all()
    assert (merged["params"]["neck"]["w"] == 0).all()
    assert "params/backbone/extra_norms_0/scale" in report["fresh"]
    assert sorted(report["dropped"]) == ["params/head/kernel", "params/norm/scale"]
    assert len(report["loaded"]) == 2


def test_classifier_checkpoint_of_another_backbone_is_refused():
    saved = {"params": {"stages_0_0": {"w": np.ones((8, 8))}, "stages_9": {"w": np.ones(2)}}}
    with pytest.raises(CheckpointMismatchError) as e:
        merge_weights(saved, seg_tree(), "ckpt")
    assert "params/backbone/stages_0_0/w: checkpoint (8, 8), model (4, 4)" in str(e.value)
    assert "params/backbone/stages_9/w" in str(e.value)
    assert "batch_stats/backbone/downsample_layers_0_1/mean" in str(e.value)  # missing from the checkpoint


def test_segmentation_checkpoint_with_other_classes_restarts_conv_seg_only():
    saved = seg_tree(num_classes=150)
    saved["params"]["neck"]["w"] = np.ones((4, 8), np.float32)
    merged, report = merge_weights(saved, seg_tree(num_classes=5), "ckpt")
    assert (merged["params"]["neck"]["w"] == 1).all()
    assert report["fresh"] == ["params/decode_head/conv_seg/kernel"]
    saved["params"].pop("neck")
    with pytest.raises(CheckpointMismatchError, match="params/neck/w"):
        merge_weights(saved, seg_tree(), "ckpt")
