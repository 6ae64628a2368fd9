"""UperNet on debiformer-small, ADE20K: the official recipe.

From maclong01/DeBiFormer segmentation/configs/upernet_512_debi_small_160k.py.

    python -m biformer_jax.data.prepare --name ade20k --root /data/ADEChallengeData2016
    python train.py --config=configs/seg/upernet_debiformer_s.py --workdir=workdirs/upernet_debiformer_s \\
        --config.data.root=/data/ADEChallengeData2016 --config.init_from=ckpts/<ImageNet backbone>
    python eval.py --config=configs/seg/upernet_debiformer_s.py --checkpoint=workdirs/upernet_debiformer_s \\
        --config.data.root=/data/ADEChallengeData2016   # --config.eval.multi_scale_flip=True

Paper: see the DeBiFormer paper (UperNet). Not trained here (no ADE20K on this machine).
"""

from configs.seg import common


def get_config(arg=None):
    config = common.upernet(common.get_base_config("upernet_debiformer_small", drop_path_rate=0.0))
    # As released: 8 GPUs x 2, lr 6e-5, weight decay 0.01 (none on 'norm' / 'rpe_table' names),
    # 3000 warmup iterations from 2e-6x, poly to 0, 160k iterations. The backbone dict passes no
    # drop_path_rate, so debi_small's 0 applies (its comment "Upernet Drop=0.3" is not in effect);
    # AlignResize in the test pipeline.
    config.optim.no_decay_keys = ("absolute_pos_embed", "relative_position_bias_table", "rpe_table", "norm")
    config.optim.warmup_iters = 3000
    config.optim.warmup_ratio = 2e-6
    config.eval.size_divisor = 32
    # The backbone's stem / downsampling BatchNorms are plain nn.BatchNorm2d under DDP (no SyncBN
    # conversion in segmentation/debiformer.py or train.py; only the heads' norm_cfg is SyncBN),
    # so they normalise each GPU's samples_per_gpu=2 images (upernet_512_debi_small_160k.py).
    config.bn_group_size = 2
    return common.finish(config, arg)
