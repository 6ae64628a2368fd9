"""Semantic FPN on debiformer-base, ADE20K: the official recipe.

From maclong01/DeBiFormer segmentation/configs/fpn_512_debi_base_80k.py.

    python -m biformer_jax.data.prepare --name ade20k --root /data/ADEChallengeData2016
    python train.py --config=configs/seg/sfpn_debiformer_b.py --workdir=workdirs/sfpn_debiformer_b \\
        --config.data.root=/data/ADEChallengeData2016 --config.init_from=ckpts/<ImageNet backbone>
    python eval.py --config=configs/seg/sfpn_debiformer_b.py --checkpoint=workdirs/sfpn_debiformer_b \\
        --config.data.root=/data/ADEChallengeData2016   # --config.eval.multi_scale_flip=True

Reported (maclong01/DeBiFormer segmentation/README.md): Semantic FPN DeBiFormer-B 50.6 mIoU single
scale. Not trained here (no ADE20K on this machine).
"""

from configs.seg import common


def get_config(arg=None):
    config = common.sfpn(common.get_base_config("sfpn_debiformer_base", drop_path_rate=0.4))
    # As released: 2 images per GPU on 8 GPUs (segmentation/README.md trains this config "using 8
    # gpus"), so global batch 16; lr 1e-4 (gpu_multiples 1), 3000 warmup iterations from 0.1x,
    # cosine to lr x 1e-10, 160k iterations, evaluation every 8000.
    config.global_batch_size = 16
    config.num_train_steps = 160000
    config.optim.lr = 1e-4
    config.optim.warmup_iters = 3000
    config.optim.min_lr_ratio = 1e-10
    config.eval_every_steps = 8000
    config.checkpoint.every_steps = 8000
    # The backbone's stem / downsampling BatchNorms are plain nn.BatchNorm2d under DDP (no SyncBN
    # conversion in segmentation/debiformer.py or train.py; only the heads' norm_cfg is SyncBN),
    # so they normalise each GPU's samples_per_gpu=2 images (fpn_512_debi_base_80k.py).
    config.bn_group_size = 2
    return common.finish(config, arg)
