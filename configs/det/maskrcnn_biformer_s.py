"""Mask R-CNN on biformer-small, COCO 2017: the official 1x recipe.

From rayleizhu/BiFormer object_detection/configs/coco/maskrcnn.1x.biformer_small.py (mmdet 2.11).

    python train.py --config=configs/det/maskrcnn_biformer_s.py --workdir=workdirs/maskrcnn_biformer_s \\
        --config.data.root=/data/coco --config.init_from=ckpts/<ImageNet biformer_small>
    python eval.py --config=configs/det/maskrcnn_biformer_s.py --checkpoint=workdirs/maskrcnn_biformer_s \\
        --config.data.root=/data/coco

Paper: see the BiFormer paper (Mask R-CNN 1x). Not trained here (no COCO on this machine).
"""

from configs.det import common, mask_common


def get_config(arg=None):
    # BiFormer_mm: n_win 16, auto_pad, drop path 0.2 (the model's defaults); mmdet's default FPN
    # (start_level 0, P6 by max-pool); AdamW lr 1e-4, weight decay 0.05 except on norms and the
    # position tables (mask_common.BIFORMER_NO_DECAY); 16 images per batch, 2 per loss group.
    config = mask_common.get_base_config("maskrcnn_biformer_small")
    return common.finish(config, arg)
