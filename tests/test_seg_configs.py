"""The eight ADE20K configs hold the official recipes and name models that exist."""

import importlib

import pytest

from biformer_jax import models

# name: (model, drop path, global batch, iterations, lr, schedule, warmup iterations, warmup ratio, weight decay)
RECIPES = {
    "sfpn_biformer_s": ("sfpn_biformer_small", 0.15, 32, 80000, 2e-4, "cosine", 1000, 0.1, 1e-4),
    "sfpn_biformer_b": ("sfpn_biformer_base", 0.3, 32, 80000, 2e-4, "cosine", 1000, 0.1, 1e-4),
    "upernet_biformer_s": ("upernet_biformer_small", 0.3, 16, 160000, 6e-5, "poly", 1500, 1e-6, 0.01),
    "upernet_biformer_b": ("upernet_biformer_base", 0.4, 16, 160000, 6e-5, "poly", 1500, 1e-6, 0.01),
    "sfpn_debiformer_s": ("sfpn_debiformer_small", 0.15, 8, 320000, 5e-5, "cosine", 9000, 0.1, 1e-4),
    "sfpn_debiformer_b": ("sfpn_debiformer_base", 0.4, 16, 160000, 1e-4, "cosine", 3000, 0.1, 1e-4),
    "upernet_debiformer_s": ("upernet_debiformer_small", 0.0, 16, 160000, 6e-5, "poly", 3000, 2e-6, 0.01),
    "upernet_debiformer_b": ("upernet_debiformer_base", 0.4, 16, 160000, 6e-5, "poly", 3000, 1e-6, 0.01),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_official_recipe(name):
    c = importlib.import_module(f"configs.seg.{name}").get_config()
    model, drop_path, batch, iters, lr, schedule, warmup, ratio, wd = RECIPES[name]
    assert c.task == "segmentation" and c.model == model and model in models.list_models()
    assert (c.model_kwargs.drop_path_rate, c.global_batch_size, c.num_train_steps) == (drop_path, batch, iters)
    o = c.optim
    assert (o.lr, o.schedule, o.warmup_iters, o.warmup_ratio, o.weight_decay) == (lr, schedule, warmup, ratio, wd)
    assert ("norm" in o.no_decay_keys) == name.startswith("upernet")
    assert c.loss.aux_weight == 0.4 and c.compute_dtype == "bfloat16" and c.checkpoint.best_metric == "eval/mIoU"
    d = c.data
    assert (d.name, d.scale, d.ratio_range, d.crop_size, d.cat_max_ratio, d.flip_prob) == (
        "ade20k",
        (2048, 512),
        (0.5, 2.0),
        (512, 512),
        0.75,
        0.5,
    )
    assert d.reduce_zero_label and d.photometric and c.eval.mode == "whole" and c.eval.stride == (341, 341)


def test_runlocal_shrinks_a_config():
    c = importlib.import_module("configs.seg.upernet_biformer_s").get_config("runlocal")
    assert (c.global_batch_size, c.num_train_steps, c.data.crop_size, c.eval.max_examples) == (2, 10, (128, 128), 2)
    with pytest.raises(ValueError, match="only one is 'runlocal'"):
        importlib.import_module("configs.seg.upernet_biformer_s").get_config("fast")
