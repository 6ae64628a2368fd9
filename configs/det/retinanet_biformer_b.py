"""RetinaNet on biformer-base, COCO 2017: the official 1x recipe.

From rayleizhu/BiFormer object_detection/configs/coco/retinanet.1x.biformer_base.py (mmdet 2.11).

    python train.py --config=configs/det/retinanet_biformer_b.py --workdir=workdirs/retinanet_biformer_b \\
        --config.data.root=/data/coco --config.init_from=ckpts/<ImageNet biformer_base>
    python eval.py --config=configs/det/retinanet_biformer_b.py --checkpoint=workdirs/retinanet_biformer_b \\
        --config.data.root=/data/coco

Paper: 47.1 box AP (RetinaNet 1x). Not trained here (no COCO on this machine).
"""

from configs.det import common


def get_config(arg=None):
    # BiFormer_mm: n_win 16, auto_pad, drop path 0.3 (the model's defaults); FPN start_level 1,
    # extra convs on the input (P3-P7); AdamW weight decay 1e-4 on every parameter.
    config = common.get_base_config("retinanet_biformer_base")
    return common.finish(config, arg)
