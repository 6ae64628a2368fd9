"""The base of every segmentation config: ADE20K with the official mmseg pipeline and a recipe.

Recipes (rayleizhu/BiFormer `semantic_segmentation/configs/ade20k/*.py`, maclong01/DeBiFormer
`segmentation/configs/*.py`), all AdamW (betas 0.9/0.999) on mmseg's IterBasedRunner, one
schedule step per iteration, SyncBN (here: BatchNorm over the global batch), fp16 with a static
loss scale of 512 there and bfloat16 without loss scaling here (BiFormer issue 47: the fp16 runs
hit NaN):

* `sfpn()`: Semantic FPN, lr 2e-4, weight decay 1e-4 on every parameter, 1000 linear warmup
  iterations from 0.1x, cosine to 0 (min_lr_ratio 1e-8), 80k iterations at global batch 32;
  evaluation and checkpoints every 4000 iterations (the best by mIoU kept).
* `upernet()`: UperNet + auxiliary FCN head (loss weight 0.4), lr 6e-5, weight decay 0.01 except
  on parameters named `norm`, 1500 linear warmup iterations from 1e-6x, poly (power 1) to 0, 160k
  iterations at batch 16; evaluation and checkpoints every 16000.

`runlocal` shrinks any of them to a laptop smoke test (10 steps of batch 2 at 128x128 crops, 2
eval images) with the same model and data.
"""

from __future__ import annotations

import ml_collections

from biformer_jax.data.segmentation import config as seg_config


def parse_arg(arg: str | None) -> dict[str, bool]:
    flags = {}
    for part in filter(None, (arg or "").split(",")):
        if part != "runlocal":
            raise ValueError(f"Unknown config argument {part!r}; the only one is 'runlocal'.")
        flags[part] = True
    return flags


def get_base_config(model: str, *, drop_path_rate: float) -> ml_collections.ConfigDict:
    """Fields every segmentation run reads; the recipe functions below fill in the optimiser."""
    config = ml_collections.ConfigDict()
    config.task = "segmentation"
    config.model = model
    # Passed to models.create_model (num_classes comes from the dataset).
    config.model_kwargs = ml_collections.ConfigDict(dict(drop_path_rate=drop_path_rate))
    config.seed = 0

    config.data = seg_config.default_seg_config()  # ADE20K: set --config.data.root
    config.eval = seg_config.default_eval_config()
    config.loss = ml_collections.ConfigDict()
    config.loss.aux_weight = 0.4  # UperNet's auxiliary FCN head; unused by Semantic FPN
    # mmseg's CrossEntropyLoss(avg_non_ignore=False): the mean over all label pixels, ignored = 0.
    config.loss.avg_non_ignore = False

    config.global_batch_size = 32
    config.num_train_steps = 80000

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adamw"
    config.optim.lr = 2e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 1e-4
    config.optim.no_decay_keys = ()  # parameters whose name contains one of these get no decay
    config.optim.clip_grad_norm = 0.0
    config.optim.schedule = "cosine"  # 'cosine' | 'poly' (biformer_jax/tasks/segmentation/optim.py)
    config.optim.warmup_iters = 1000
    config.optim.warmup_ratio = 0.1
    config.optim.min_lr_ratio = 1e-8  # cosine: end at lr x this
    config.optim.min_lr = 0.0  # poly: end here
    config.optim.power = 1.0  # poly

    config.ema_decay = 0.0  # the official runs keep no EMA; > 0 adds one (evaluated as eval_ema/)
    config.log_every_steps = 50
    config.eval_every_steps = 4000

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 4000
    config.checkpoint.keep = 1
    config.checkpoint.keep_best = 1  # also keep the N best by best_metric (0: none)
    config.checkpoint.best_metric = "eval/mIoU"
    config.checkpoint.asynchronous = True

    config.resume = ""  # another run's train checkpoint (used when the workdir has none)
    # Weights to start from: an ImageNet classifier checkpoint of the backbone (converted or
    # ours) or a segmentation checkpoint (of the same architecture: fields it sets differently on
    # purpose are named in init_from_overrides, e.g. ("topks",); num_classes may always differ).
    config.init_from = ""
    config.init_from_overrides = ()

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.sharding = ml_collections.ConfigDict(dict(fsdp_min_size=2**14))
    config.compute_dtype = "bfloat16"  # parameters, optimiser state and BN statistics stay float32
    config.grad_accum_steps = 1
    config.remat_stages = ()
    # The backbone's BatchNorms (stem, downsampling) in training over groups of this many images;
    # 0: the whole global batch (SyncBN). The heads' BatchNorms are always SyncBN, as configured.
    # BiFormer's BiFormer_mm converts its backbone to SyncBN (models_mm/biformer_mm.py, "step 4"):
    # 0. DeBiFormer's segmentation backbone keeps plain nn.BatchNorm2d under DDP: its configs set 2.
    config.bn_group_size = 0
    return config


def sfpn(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """BiFormer's Semantic FPN recipe (sfpn.biformer_small.py / _base.py)."""
    config.global_batch_size = 32  # 8 GPUs x 4
    config.num_train_steps = 80000  # 160000 // gpu_multiples (2)
    config.optim.lr = 2e-4  # 0.0001 x gpu_multiples
    config.optim.weight_decay = 1e-4
    config.optim.no_decay_keys = ()
    config.optim.schedule = "cosine"
    config.optim.warmup_iters = 1000
    config.optim.warmup_ratio = 0.1
    config.optim.min_lr_ratio = 1e-8
    config.eval.size_divisor = 32  # AlignResize
    config.eval_every_steps = 4000
    config.checkpoint.every_steps = 4000
    return config


def upernet(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """BiFormer's UperNet recipe (upernet.biformer_small.py / _base.py, schedule_160k)."""
    config.global_batch_size = 16  # 8 GPUs x 2
    config.num_train_steps = 160000
    config.optim.lr = 6e-5
    config.optim.weight_decay = 0.01
    # paramwise_cfg custom_keys: absolute_pos_embed / relative_position_bias_table (absent from
    # these models) and 'norm' get decay_mult 0.
    config.optim.no_decay_keys = ("absolute_pos_embed", "relative_position_bias_table", "norm")
    config.optim.schedule = "poly"
    config.optim.power = 1.0
    config.optim.min_lr = 0.0
    config.optim.warmup_iters = 1500
    config.optim.warmup_ratio = 1e-6
    config.loss.aux_weight = 0.4
    # BiFormer's UperNet test pipeline is a plain Resize(keep_ratio) (no AlignResize).
    config.eval.size_divisor = 0
    config.eval_every_steps = 16000
    config.checkpoint.every_steps = 16000
    return config


def apply_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.global_batch_size = 2
    config.num_train_steps = 10
    config.log_every_steps = 1
    config.eval_every_steps = 10
    config.checkpoint.every_steps = 5
    config.data.crop_size = (128, 128)
    config.data.scale = (512, 128)
    config.eval.scale = (512, 128)
    config.eval.max_examples = 2
    config.optim.warmup_iters = 2
    return config


def finish(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    if parse_arg(arg).get("runlocal"):
        apply_runlocal(config)
    return config
