"""Input pipelines: TFDS / ImageFolder / embedded digits, timm-style augmentations, mixup.

    from biformer_jax import data
    cfg = data.default_config()          # -> config.data (every field the pipeline reads)
    mix = data.default_mixup_config()    # -> config.mixup
    info = data.dataset_info(cfg)        # DatasetInfo(num_classes, num_train_examples,
                                         #   num_eval_examples, image_size); raises
                                         #   DatasetNotPreparedError saying how to prepare it
    it = data.train_iterator(cfg, seed=0, start_step=0, global_batch_size=B,
                             process_index=p, process_count=P)
        # infinite; this host's rows [p B/P, (p+1) B/P) of global steps start_step, start_step+1, ...
        # {"image": float32 (B/P, S, S, 3) normalised, "label": int32 (B/P,)}; every step's content
        # is a pure function of (cfg, seed, step, B), whatever P and wherever the run restarted.
    ev = data.eval_iterator(cfg, global_batch_size=B, process_index=p, process_count=P)
        # one pass, ceil(N / B) batches on every host: {"image", "label", "mask" (1 real, 0 pad)}
    images, targets = data.mixup_cutmix(rng, images, labels, num_classes=K, cfg=mix)
        # jax.numpy, inside the jitted step: soft targets (B, K) float32, rows sum to 1

Extras beyond that interface: `digits_config()` (default_config set up for the quickstart's
embedded digits), `steps_per_epoch(num_train_examples, B)`, `num_eval_batches(N, B)`,
`prepare_dataset(cfg, manual_dir=None)` (also `python -m biformer_jax.data.prepare`),
`DatasetNotPreparedError`, `smooth_one_hot`.
"""

from biformer_jax.data.classification.mixup import mixup_cutmix, smooth_one_hot
from biformer_jax.data.config import default_config, default_mixup_config, digits_config
from biformer_jax.data.pipeline import eval_iterator, num_eval_batches, steps_per_epoch, train_iterator
from biformer_jax.data.prepare import prepare_dataset
from biformer_jax.data.sources import DatasetInfo, DatasetNotPreparedError, dataset_info

__all__ = [
    "DatasetInfo",
    "DatasetNotPreparedError",
    "dataset_info",
    "default_config",
    "default_mixup_config",
    "digits_config",
    "eval_iterator",
    "mixup_cutmix",
    "num_eval_batches",
    "prepare_dataset",
    "smooth_one_hot",
    "steps_per_epoch",
    "train_iterator",
]
