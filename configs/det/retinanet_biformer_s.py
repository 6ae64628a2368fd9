"""RetinaNet on biformer-small, COCO 2017: the official 1x recipe.

From rayleizhu/BiFormer object_detection/configs/coco/retinanet.1x.biformer_small.py (mmdet 2.11).

    python train.py --config=configs/det/retinanet_biformer_s.py --workdir=workdirs/retinanet_biformer_s \\
        --config.data.root=/data/coco --config.init_from=ckpts/<ImageNet biformer_small>
    python eval.py --config=configs/det/retinanet_biformer_s.py --checkpoint=workdirs/retinanet_biformer_s \\
        --config.data.root=/data/coco

Paper: 45.9 box AP (RetinaNet 1x). Not trained here (no COCO on this machine).
"""

from configs.det import common


def get_config(arg=None):
    # BiFormer_mm: n_win 16, auto_pad, drop path 0.2 (the model's defaults); FPN start_level 1,
    # extra convs on the input (P3-P7); AdamW weight decay 1e-4 on every parameter.
    config = common.get_base_config("retinanet_biformer_small")
    return common.finish(config, arg)
