"""Semantic FPN on biformer-small, ADE20K: the official recipe.

From rayleizhu/BiFormer semantic_segmentation/configs/ade20k/sfpn.biformer_small.py.

    python -m biformer_jax.data.prepare --name ade20k --root /data/ADEChallengeData2016
    python train.py --config=configs/seg/sfpn_biformer_s.py --workdir=workdirs/sfpn_biformer_s \\
        --config.data.root=/data/ADEChallengeData2016 --config.init_from=ckpts/<ImageNet backbone>
    python eval.py --config=configs/seg/sfpn_biformer_s.py --checkpoint=workdirs/sfpn_biformer_s \\
        --config.data.root=/data/ADEChallengeData2016   # --config.eval.multi_scale_flip=True

Paper: 48.9 mIoU (single scale). Not trained here (no ADE20K on this machine).
"""

from configs.seg import common


def get_config(arg=None):
    config = common.sfpn(common.get_base_config("sfpn_biformer_small", drop_path_rate=0.15))
    return common.finish(config, arg)
