"""The base config every experiment derives from: the official ImageNet-1K recipe.

BiFormer (rayleizhu/BiFormer main.py + configs/train_args.yaml + README) and DeBiFormer
(maclong01/DeBiFormer classification/main.py + README) both train with the DeiT `main.py` on top
of timm; `get_base_config(recipe=...)` returns that recipe and the variant files override only
what differs (model, drop path, and for DeBiFormer its own optimiser settings).

Every field can be overridden on the command line (`--config.optim.lr=1e-3`); a mistyped field
fails at once because train.py locks the config. `runlocal` shrinks a config to a few steps on a
laptop CPU (`RUNLOCAL`: same model and data, batch 8, 10 steps, 2 eval batches).
"""

from __future__ import annotations

import ml_collections

from biformer_jax import data
from biformer_jax.training import sweeps


def parse_arg(arg: str | None) -> dict[str, bool]:
    """'runlocal' -> {"runlocal": True}; '' / None -> {}; anything else fails."""
    flags = {}
    for part in filter(None, (arg or "").split(",")):
        if part != "runlocal":
            raise ValueError(f"Unknown config argument {part!r}; the only one is 'runlocal'.")
        flags[part] = True
    return flags


def get_base_config(model: str, *, drop_path_rate: float, recipe: str = "biformer") -> ml_collections.ConfigDict:
    """The official recipe for `model` ("biformer": BiFormer's; "debiformer": DeBiFormer's)."""
    config = ml_collections.ConfigDict()
    config.model = model
    # Passed to models.create_model (num_classes comes from the dataset).
    config.model_kwargs = ml_collections.ConfigDict(dict(drop_path_rate=drop_path_rate, drop_rate=0.0))
    config.seed = 0

    # The data side of the recipe is the data configs' defaults (biformer_jax/data/config.py):
    # TFDS imagenet2012, DeiT/timm train and eval transforms, Mixup 0.8 / CutMix 1.0, smoothing 0.1.
    config.data = data.default_config()
    config.mixup = data.default_mixup_config()

    # 300 epochs at 128 images per GPU on 8 GPUs (README / scripts/train.sh).
    config.global_batch_size = 1024
    config.num_epochs = 300
    config.num_train_steps = -1  # > 0: train exactly this many steps instead of num_epochs
    config.steps_per_epoch = -1  # -1: num_train_examples // global_batch_size (drop_last)

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adamw"
    config.optim.lr = 5e-4  # per lr_base_batch_size images; scaled linearly with the global batch
    config.optim.lr_base_batch_size = 512
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.05  # not on 1-D params (norms, biases): timm's rule
    config.optim.clip_grad_norm = 0.0  # 0: off (BiFormer clip_grad None)
    config.optim.schedule = "cosine"
    config.optim.warmup_epochs = 5.0
    config.optim.warmup_lr = 1e-6
    config.optim.min_lr = 1e-5
    # timm's CosineLRScheduler is stepped per epoch, after the epoch (epoch e trains at the rate of
    # e - 1). timm's 10 cooldown epochs are never trained by the official main.py (it ignores the
    # epoch count create_scheduler returns): cooldown_epochs=10 adds them (at min_lr).
    config.optim.step_on_epochs = True
    config.optim.epoch_lag = 1
    config.optim.cooldown_epochs = 0

    config.ema_decay = 0.99996  # timm ModelEma per step; 0 turns EMA off

    config.log_every_steps = 100
    config.eval_every_steps = -1  # -1: once per epoch, as the official loop
    config.eval_batch_size = 1536  # 1.5 x the per-GPU batch x 8, as main.py
    config.eval_steps = -1  # -1: the whole eval split

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = -1  # -1: once per epoch
    config.checkpoint.keep = 3
    config.checkpoint.keep_best = 1  # also keep the N best by best_metric (0: none)
    config.checkpoint.best_metric = "eval/top1"  # the highest is kept; for a loss, the lowest
    config.checkpoint.asynchronous = True

    config.resume = ""  # another run's train checkpoint (refused once the workdir has its own)
    config.init_from = ""  # weights to fine-tune from (converter or train checkpoint)
    # model_kwargs the fine-tune sets differently from config.init_from's checkpoint on purpose
    # (e.g. ("topks", "n_win")); any other difference stops the run. num_classes may always differ.
    config.init_from_overrides = ()

    # Devices as a (data, fsdp) mesh; -1: all the remaining devices. fsdp > 1 shards every state
    # array of at least fsdp_min_size elements along its largest dimension divisible by fsdp
    # (smaller ones, e.g. biases and norms, stay replicated); fsdp = 1 is pure data parallelism.
    # 2**14: BiFormer's kernels are small (the largest has 1.8M elements); with 2**18 a third of
    # BiFormer-B's bytes stayed replicated (0.21 of the N=1 state per device at N=8, 0.13 now;
    # benchmarks/fsdp_memory.py).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.sharding = ml_collections.ConfigDict(dict(fsdp_min_size=2**14))
    config.compute_dtype = "float32"  # "bfloat16": bf16 compute, float32 params/optimiser/BN stats
    config.grad_accum_steps = 1  # k > 1: k micro-batches of global_batch_size / k per update
    config.remat_stages = ()  # stages (0-3) recomputed in the backward pass (use_checkpoint_stages)
    # BatchNorm statistics in training over groups of this many images (0: the whole global batch).
    # The official runs wrap plain nn.BatchNorm2d in DDP with no SyncBN conversion (BiFormer main.py;
    # DeBiFormer classification/main.py), so each GPU's batch is normalised alone: 128 per GPU
    # (BiFormer scripts/train.sh batch_size=128), 256 for DeBiFormer (README --batch-size 256).
    # The running statistics are the first group's (DDP broadcasts rank 0's buffers every step).
    config.bn_group_size = 128
    # True: each stage's blocks as one lax.scan in the training step (the model's scan_blocks; same
    # numbers, same checkpoints; the train state keeps each stage's blocks stacked). Off by default: on
    # an H200 the scanned BiFormer-S/B step compiled in 0.40x / 0.42x the time but ran 1.16x / 1.18x
    # slower, measured before the stacked state (on the 2-core CPU now 0.37-0.42x the compile at
    # 0.95-1.04x the step; README "Scanned blocks"); turn it on where compiles dominate (sweeps,
    # short runs, CPU).
    config.scan_blocks = False

    if recipe == "debiformer":
        _debiformer_recipe(config)
    elif recipe != "biformer":
        raise ValueError(f"recipe={recipe!r}: use 'biformer' or 'debiformer'.")
    return config


def _debiformer_recipe(config: ml_collections.ConfigDict) -> None:
    """maclong01/DeBiFormer: README command + classification/main.py defaults.

    `bash train.sh 8 --model debiformer_small --batch-size 256 --lr 5e-4 --warmup-epochs 20
    --weight-decay 0.1`; main.py: clip_grad 5, min_lr 5e-6, no model EMA, no repeated
    augmentation, and create_model(model, num_classes) only, so the variant's own drop_path_rate
    applies and the --drop/--drop-path flags do nothing.
    """
    config.global_batch_size = 2048  # 256 per GPU x 8 GPUs
    config.optim.warmup_epochs = 20.0
    config.optim.weight_decay = 0.1
    config.optim.clip_grad_norm = 5.0
    config.optim.min_lr = 5e-6
    config.ema_decay = 0.0
    config.data.repeated_aug = 1
    config.eval_batch_size = 2000  # 250 per GPU x 8
    config.bn_group_size = 256  # --batch-size 256 per GPU, plain BatchNorm under DDP


# "A small run", the one definition: a few steps of the same model and data on a laptop CPU.
# `:runlocal` configs and the tests' micro runs start from it (dotted config fields).
RUNLOCAL = {
    "global_batch_size": 8,
    "num_train_steps": 10,
    "steps_per_epoch": 5,
    "log_every_steps": 1,
    "eval_every_steps": 10,
    "eval_batch_size": 8,
    "eval_steps": 2,
    "checkpoint.every_steps": 5,
    "data.repeated_aug": 1,
}


def apply_runlocal(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
    """A copy of `config` made a small run (RUNLOCAL), then `overrides` (dotted field names) set."""
    return sweeps.apply_overrides(config, {**RUNLOCAL, **overrides}).unlock()


def finish(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    if parse_arg(arg).get("runlocal"):
        return apply_runlocal(config)
    return config
