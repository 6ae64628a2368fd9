"""UperNet on biformer-base, ADE20K: the official recipe.

From rayleizhu/BiFormer semantic_segmentation/configs/ade20k/upernet.biformer_base.py.

    python -m biformer_jax.data.prepare --name ade20k --root /data/ADEChallengeData2016
    python train.py --config=configs/seg/upernet_biformer_b.py --workdir=workdirs/upernet_biformer_b \\
        --config.data.root=/data/ADEChallengeData2016 --config.init_from=ckpts/<ImageNet backbone>
    python eval.py --config=configs/seg/upernet_biformer_b.py --checkpoint=workdirs/upernet_biformer_b \\
        --config.data.root=/data/ADEChallengeData2016   # --config.eval.multi_scale_flip=True

Paper: 51.0 mIoU, 51.7 multi-scale + flip. Not trained here (no ADE20K on this machine).
"""

from configs.seg import common


def get_config(arg=None):
    config = common.upernet(common.get_base_config("upernet_biformer_base", drop_path_rate=0.4))
    return common.finish(config, arg)
