"""Semantic FPN on biformer-base, ADE20K: the official recipe.

From rayleizhu/BiFormer semantic_segmentation/configs/ade20k/sfpn.biformer_base.py.

    python -m biformer_jax.data.prepare --name ade20k --root /data/ADEChallengeData2016
    python train.py --config=configs/seg/sfpn_biformer_b.py --workdir=workdirs/sfpn_biformer_b \\
        --config.data.root=/data/ADEChallengeData2016 --config.init_from=ckpts/<ImageNet backbone>
    python eval.py --config=configs/seg/sfpn_biformer_b.py --checkpoint=workdirs/sfpn_biformer_b \\
        --config.data.root=/data/ADEChallengeData2016   # --config.eval.multi_scale_flip=True

Paper: 49.9 mIoU (single scale). Not trained here (no ADE20K on this machine).
"""

from configs.seg import common


def get_config(arg=None):
    config = common.sfpn(common.get_base_config("sfpn_biformer_base", drop_path_rate=0.3))
    return common.finish(config, arg)
