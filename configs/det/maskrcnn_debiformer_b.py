"""Mask R-CNN on debiformer-base, COCO 2017: the released 1x recipe.

From maclong01/DeBiFormer detection/configs/mask_rcnn_debi_base_1x.py (mmdet 2.x).

    python train.py --config=configs/det/maskrcnn_debiformer_b.py --workdir=workdirs/maskrcnn_debiformer_b \\
        --config.data.root=/data/coco --config.init_from=ckpts/<ImageNet debiformer_base>
    python eval.py --config=configs/det/maskrcnn_debiformer_b.py --checkpoint=workdirs/maskrcnn_debiformer_b \\
        --config.data.root=/data/coco

Paper: see the DeBiFormer paper (Mask R-CNN 1x). Not trained here (no COCO on this machine).
"""

from configs.det import common, mask_common


def get_config(arg=None):
    # As released: 2 images x 8 GPUs (batch 16, loss per 2 images), AdamW lr 2.5e-5 (as the file
    # sets it; its comment reads "0.000025 4GPU"), weight decay 0.05 except
    # mask_common.DEBIFORMER_NO_DECAY, warmup 5000 iterations; n_win 32, drop path 0.3.
    config = mask_common.get_base_config("maskrcnn_debiformer_base")
    config = mask_common.debiformer(config, batch=16, lr=2.5e-5, warmup_iters=5000)
    return common.finish(config, arg)
