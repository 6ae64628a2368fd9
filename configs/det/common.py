"""The base of every detection config: RetinaNet on COCO 2017 with mmdet 2.11's 1x recipe.

Recipes (rayleizhu/BiFormer `object_detection/configs/coco/retinanet.1x.biformer_{small,base}.py`
on mmdet's `schedule_1x`, maclong01/DeBiFormer `detection/configs/retinanet_debi_{small,base}_1x.py`):
8 GPUs x 2 images (global batch 16), AdamW lr 1e-4 (betas 0.9 / 0.999), weight decay 1e-4, no
gradient clipping, 12 epochs, the rate x0.1 after epochs 8 and 11, linear warmup over 500
iterations from 0.001x; fp16 with a static loss scale of 512 there, bfloat16 here. Train
pipeline Resize (1333, 800) keep-ratio, RandomFlip 0.5, Normalize, Pad 32; test the same without
the flip; the backbone's BatchNorms frozen (norm_eval); evaluation and checkpoints every epoch,
the best by bbox_mAP kept.

`runlocal` shrinks any of them to a smoke test on the generated shapes dataset (micro-sized
images; same model).
"""

from __future__ import annotations

import ml_collections

from biformer_jax.data.detection import transforms as det_transforms


def parse_arg(arg: str | None) -> dict[str, bool]:
    flags = {}
    for part in filter(None, (arg or "").split(",")):
        if part != "runlocal":
            raise ValueError(f"Unknown config argument {part!r}; the only one is 'runlocal'.")
        flags[part] = True
    return flags


def default_data_config() -> ml_collections.ConfigDict:
    """config.data of a detection run: COCO 2017 with mmdet's pipeline in bucket shapes."""
    c = ml_collections.ConfigDict()
    # 'coco': ROOT/annotations/instances_<split>.json and ROOT/<split>/ (set root);
    # 'synthetic': generated shapes in the same layout (root: where to write them, '' = a temp folder).
    c.name = "coco"
    c.root = ""
    c.train_split = "train2017"
    c.eval_split = "val2017"
    c.img_scale = det_transforms.IMG_SCALE  # Resize (long, short), keep ratio
    c.buckets = det_transforms.DEFAULT_BUCKETS  # padded (h, w) batch shapes: one compile each
    c.flip_ratio = 0.5
    c.max_boxes = 128  # ground-truth rows per image (an image with more is refused, naming it)
    c.max_ignore = 16  # crowd boxes per image
    c.on_bad_box = "error"  # a box outside its image: 'error' names it, 'skip' drops it
    c.max_eval_examples = 0  # > 0: evaluate the first N eval images only
    c.threads = 4
    c.prefetch = 2
    c.workers = 0
    c.synthetic = ml_collections.ConfigDict(
        dict(num_train=256, num_val=32, size=(96, 128), seed=0, max_objects=3, object_size=(24, 56))
    )
    return c


def get_base_config(model: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "detection"
    config.model = model
    config.model_kwargs = ml_collections.ConfigDict()  # create_model overrides (num_classes from the data)
    config.seed = 0
    config.data = default_data_config()
    config.eval = ml_collections.ConfigDict(dict(batch_size=8))  # images per eval batch (global)

    config.global_batch_size = 16  # 8 GPUs x 2
    config.num_epochs = 12
    # The loss is normalised per group of this many images and the groups averaged (mmdet per GPU
    # under DDP: 2); 0: one loss over the whole batch.
    config.loss_group_size = 2

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adamw"
    config.optim.lr = 1e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 1e-4
    config.optim.no_decay_keys = ()  # parameters whose name contains one of these get no decay
    config.optim.clip_grad_norm = 0.0  # grad_clip=None
    config.optim.schedule = "step"
    config.optim.lr_steps = (8, 11)  # epochs
    config.optim.gamma = 0.1
    config.optim.warmup_iters = 500
    config.optim.warmup_ratio = 0.001

    config.ema_decay = 0.0
    config.log_every_steps = 50
    config.eval_every_steps = 0  # 0: every epoch
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 0  # 0: every epoch
    config.checkpoint.keep = 1
    config.checkpoint.keep_best = 1
    config.checkpoint.best_metric = "eval/bbox_mAP"
    config.checkpoint.asynchronous = True

    config.resume = ""
    # An ImageNet classifier checkpoint of the backbone (merged by name) or a detection checkpoint
    # of the same architecture (fields set differently on purpose named in init_from_overrides).
    config.init_from = ""
    config.init_from_overrides = ()

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.sharding = ml_collections.ConfigDict(dict(fsdp_min_size=2**14))
    config.compute_dtype = "bfloat16"
    config.grad_accum_steps = 1
    config.remat_stages = ()
    config.bn_group_size = 0  # the backbone's BatchNorms are frozen: unused in training
    return config


def debiformer(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DeBiFormer's release: paramwise_cfg custom_keys 'bn' and 'norm' get decay_mult 0 (the rest as BiFormer's)."""
    config.optim.no_decay_keys = ("bn", "norm")
    return config


def apply_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.data.name = "synthetic"
    config.data.root = ""
    config.data.synthetic.num_train = 16
    config.data.synthetic.num_val = 4
    config.data.img_scale = (128, 96)
    config.data.buckets = ((96, 128),)
    config.data.max_boxes = 8
    config.data.threads = 2
    config.global_batch_size = 2
    config.num_epochs = 1
    config.log_every_steps = 1
    config.optim.warmup_iters = 2
    config.eval.batch_size = 2
    return config


def finish(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    if parse_arg(arg).get("runlocal"):
        apply_runlocal(config)
    return config
