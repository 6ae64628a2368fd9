"""Semantic FPN on debiformer-small, ADE20K: the official recipe.

From maclong01/DeBiFormer segmentation/configs/fpn_512_debi_small_80k.py.

    python -m biformer_jax.data.prepare --name ade20k --root /data/ADEChallengeData2016
    python train.py --config=configs/seg/sfpn_debiformer_s.py --workdir=workdirs/sfpn_debiformer_s \\
        --config.data.root=/data/ADEChallengeData2016 --config.init_from=ckpts/<ImageNet backbone>
    python eval.py --config=configs/seg/sfpn_debiformer_s.py --checkpoint=workdirs/sfpn_debiformer_s \\
        --config.data.root=/data/ADEChallengeData2016   # --config.eval.multi_scale_flip=True

Paper: see the DeBiFormer paper (S-FPN). Not trained here (no ADE20K on this machine).
"""

from configs.seg import common


def get_config(arg=None):
    config = common.sfpn(common.get_base_config("sfpn_debiformer_small", drop_path_rate=0.15))
    # As released (its active "4 GPU" block): 4 GPUs x 2 images, lr 5e-5, 9000 warmup iterations
    # from 0.1x, cosine to lr x 1e-10, 320k iterations (80k at batch 32 in images), evaluation
    # and checkpoints every 16000.
    config.global_batch_size = 8
    config.num_train_steps = 320000
    config.optim.lr = 5e-5
    config.optim.warmup_iters = 9000
    config.optim.min_lr_ratio = 1e-10
    config.eval_every_steps = 16000
    config.checkpoint.every_steps = 16000
    # The backbone's stem / downsampling BatchNorms are plain nn.BatchNorm2d under DDP (no SyncBN
    # conversion in segmentation/debiformer.py or train.py; only the heads' norm_cfg is SyncBN),
    # so they normalise each GPU's samples_per_gpu=2 images (fpn_512_debi_small_80k.py).
    config.bn_group_size = 2
    return common.finish(config, arg)
