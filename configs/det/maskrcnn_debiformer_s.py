"""Mask R-CNN on debiformer-small, COCO 2017: the released 1x recipe.

From maclong01/DeBiFormer detection/configs/mask_rcnn_debi_small_1x.py (mmdet 2.x).

    python train.py --config=configs/det/maskrcnn_debiformer_s.py --workdir=workdirs/maskrcnn_debiformer_s \\
        --config.data.root=/data/coco --config.init_from=ckpts/<ImageNet debiformer_small>
    python eval.py --config=configs/det/maskrcnn_debiformer_s.py --checkpoint=workdirs/maskrcnn_debiformer_s \\
        --config.data.root=/data/coco

Paper: see the DeBiFormer paper (Mask R-CNN 1x). Not trained here (no COCO on this machine).
"""

from configs.det import common, mask_common


def get_config(arg=None):
    # As released: 1 image x 8 GPUs (batch 8, loss per image), AdamW lr 5e-5 (its comment: "0.00005
    # 8GPU"), weight decay 0.05 except mask_common.DEBIFORMER_NO_DECAY, warmup 1500 iterations;
    # n_win 16, drop path 0.2 (the maskrcnn_debiformer_small model).
    config = mask_common.get_base_config("maskrcnn_debiformer_small")
    config = mask_common.debiformer(config, batch=8, lr=5e-5, warmup_iters=1500)
    return common.finish(config, arg)
