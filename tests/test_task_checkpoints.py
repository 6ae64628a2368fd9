"""Segmentation checkpoints are checked against the architecture that loads them, as classification ones are.

eval.py and segmentation predict (`checkpoint_eval.load_model_and_variables`, through
`training.loader.load`) and `init_from` refuse a segmentation checkpoint whose recorded model
differs from the config's, also where every array has the same shape (topks, n_win, auto_pad),
and list the differences; a classifier's backbone under a segmentation model still loads (merged
by name). No compile: the checkpoints hold arrays of the right shapes, the states are built from
`jax.eval_shape`.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from biformer_jax import models, tasks
from biformer_jax.convert import files as convert_files
from biformer_jax.data.segmentation import sources as seg_sources
from biformer_jax.models import from_config
from biformer_jax.tasks.classification import inference
from biformer_jax.tasks.segmentation import checkpoint_eval
from biformer_jax.training import checkpoint, restore, train_lib
from biformer_jax.visualize import inputs as visualize_inputs
from configs import quickstart as quickstart_classifier
from configs.seg import quickstart

# Settings that keep every array's shape: only the recorded architecture can tell them apart.
SAME_SHAPES = [("topks", [1, 1, 1, -2]), ("n_win", 1), ("auto_pad", False)]


def _config(**changes):
    config = quickstart.get_config()
    config.data.crop_size = (64, 64)
    for key, value in changes.items():
        config[key] = value
    return config


def _meta(config) -> dict:
    return from_config.model_meta(config, len(seg_sources.read_class_names(config.data)))


def _save(path, model_name: str, model_kwargs: dict, abstract, fill: float = 0.5) -> str:
    """A converter-format checkpoint recording (model_name, model_kwargs) that holds `abstract`'s arrays."""
    variables = jax.tree.map(lambda s: np.full(s.shape, fill, s.dtype), abstract)
    meta = {"format": checkpoint.VARIABLES_FORMAT, "model": model_name, "model_kwargs": model_kwargs}
    convert_files.save_converted(path, variables, meta)
    return str(path)


def _seg_checkpoint(path, config, **kwarg_changes) -> str:
    """A checkpoint of the config's segmentation model whose record differs by kwarg_changes (same shapes)."""
    meta = _meta(config)
    model = from_config.model_from_config(config, meta["model_kwargs"]["num_classes"])
    abstract = from_config.abstract_variables(model, tuple(config.data.crop_size))
    return _save(path, meta["model"], {**meta["model_kwargs"], **kwarg_changes}, abstract)


@pytest.mark.parametrize("field, value", SAME_SHAPES)
def test_eval_and_predict_refuse_a_segmentation_checkpoint_of_another_architecture(tmp_path, field, value):
    config = _config()
    path = _seg_checkpoint(tmp_path / "other", config, **{field: value})
    with pytest.raises(restore.ArchitectureMismatchError, match=rf"another architecture.*\n  backbone_args\.{field}: "):
        checkpoint_eval.load_model_and_variables(config, path)


def test_eval_refuses_another_segmentation_model_name(tmp_path):
    config = _config()
    path = _seg_checkpoint(tmp_path / "other", config)
    other = _config(model="upernet_biformer_micro")
    with pytest.raises(
        restore.ArchitectureMismatchError,
        match=r"(?s)model 'sfpn_biformer_micro'.*\n  decode_head: checkpoint 'fpn', config 'uper'",
    ):
        checkpoint_eval.load_model_and_variables(other, path)


def test_eval_loads_a_segmentation_checkpoint_of_its_own_architecture(tmp_path):
    config = _config()
    path = _seg_checkpoint(tmp_path / "same", config)
    _, names, _, variables, ema = checkpoint_eval.load_model_and_variables(config, path)
    assert len(names) == 5 and ema is None
    floats = [np.asarray(x) for x in jax.tree.leaves(variables) if np.issubdtype(x.dtype, np.floating)]
    assert floats and all(np.all(x == 0.5) for x in floats)


def _fresh_state_and_shardings(config):
    """A zero TrainState of the config's model (from eval_shape: nothing compiled) and its shardings."""
    model = from_config.model_from_config(config, _meta(config)["model_kwargs"]["num_classes"])
    tx, _, _ = tasks.get(config).make_optimizer(config, 1, 10)
    init_fn = train_lib.make_init_fn(config, model, tx, tuple(config.data.crop_size))
    abstract = jax.eval_shape(init_fn, np.int32(0))
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return state, jax.tree.map(lambda _: device, abstract)


@pytest.mark.parametrize("field, value", SAME_SHAPES)
def test_init_from_refuses_a_segmentation_checkpoint_of_another_architecture(tmp_path, field, value):
    config = _config()
    config.init_from = _seg_checkpoint(tmp_path / "other", config, **{field: value})
    with pytest.raises(restore.ArchitectureMismatchError, match=rf"config\.init_from.*\n  backbone_args\.{field}: "):
        tasks.get(config).init_from(config, _meta(config))
    config.init_from_overrides = (field,)  # named on purpose: allowed
    tasks.get(config).init_from(config, _meta(config))


def test_init_from_a_classifiers_backbone_still_merges_by_name(tmp_path):
    config = _config()
    classifier = models.create_model("biformer_micro")
    config.init_from = _save(
        tmp_path / "classifier", "biformer_micro", {}, from_config.abstract_variables(classifier, 64), fill=1.0
    )
    load = tasks.get(config).init_from(config, _meta(config))  # another architecture, legitimately
    state, shardings = _fresh_state_and_shardings(config)
    merged = load(state, shardings)
    loaded = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
        for path, x in jax.tree_util.tree_flatten_with_path(merged.params)[0]
    }
    from_classifier = [k for k in loaded if k.startswith("backbone/") and "extra_norms" not in k]
    assert from_classifier and all(np.all(loaded[k] == 1.0) for k in from_classifier)
    assert all(np.all(v == 0.0) for k, v in loaded.items() if k not in from_classifier)  # neck, heads, extra_norms


def test_the_registry_reads_config_task_and_defaults_to_classification():
    assert tasks.get(quickstart_classifier.get_config()).name == "classification"  # no `task` field
    assert tasks.get(_config()).name == "segmentation"
    config = _config()
    config.task = "keypoints"
    with pytest.raises(ValueError, match=r"config.task='keypoints'.*\['classification', 'detection', 'segmentation'\]"):
        tasks.get(config)


def test_predict_export_and_visualize_refuse_a_segmentation_checkpoint_by_name(tmp_path):
    path = _seg_checkpoint(tmp_path / "seg", _config())
    with pytest.raises(inference.InferenceInputError, match=r"segmentation model.*biformer_jax.segmentation.predict"):
        inference.load(path)  # predict.py and export
    with pytest.raises(ValueError, match=r"segmentation model.*visualize a classifier's checkpoint"):
        visualize_inputs.load_checkpoint(path)
