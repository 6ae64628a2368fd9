"""RetinaNet on debiformer-base, COCO 2017: the released 1x recipe.

From maclong01/DeBiFormer detection/configs/retinanet_debi_base_1x.py (mmdet 2.x).

    python train.py --config=configs/det/retinanet_debiformer_b.py --workdir=workdirs/retinanet_debiformer_b \\
        --config.data.root=/data/coco --config.init_from=ckpts/<ImageNet debiformer_base>
    python eval.py --config=configs/det/retinanet_debiformer_b.py --checkpoint=workdirs/retinanet_debiformer_b \\
        --config.data.root=/data/coco

Paper: see the DeBiFormer paper (RetinaNet 1x). Not trained here (no COCO on this machine).
"""

from configs.det import common


def get_config(arg=None):
    # As released: the neck is mmdet's default FPN (start_level 0, no extra convs: the fifth level
    # by max-pool) under anchors of strides 8-128, which the retinanet_debiformer_* models build;
    # n_win 32, no drop path. AdamW lr 1e-4, weight decay 1e-4 except on names with 'bn' / 'norm'.
    config = common.debiformer(common.get_base_config("retinanet_debiformer_base"))
    return common.finish(config, arg)
