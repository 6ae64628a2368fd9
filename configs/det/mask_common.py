"""The base of the Mask R-CNN configs: common.py's COCO 2017 detection run with the Mask R-CNN recipes.

rayleizhu/BiFormer `object_detection/configs/coco/maskrcnn.1x.biformer_{small,base}.py` (mmdet 2.11,
`coco_instance.py` data, `schedule_1x.py`): 8 GPUs x 2 images (global batch 16), AdamW lr 1e-4
(betas 0.9 / 0.999), weight decay 0.05 except on parameters whose name contains
`absolute_pos_embed`, `relative_position_bias_table` or `norm` (its paramwise_cfg custom_keys,
decay_mult 0), no gradient clipping, 12 epochs, x0.1 after epochs 8 and 11, linear warmup over 500
iterations from 0.001x; fp16 there, bfloat16 here. Pipeline as RetinaNet's plus the instance
masks (LoadAnnotations with_mask, resized / flipped / padded with the image); evaluation
`bbox` and `segm` every epoch, the best checkpoint by bbox_mAP.

maclong01/DeBiFormer `detection/configs/mask_rcnn_debi_{small,base}_1x.py`: AdamW weight decay 0.05
with custom_keys `absolute_pos_embed`, `relative_position_bias_table`, `rpe_table`, `norm`; small:
1 image x 8 GPUs (batch 8), lr 5e-5, warmup 1500; base: 2 images x 8 GPUs (batch 16), lr 2.5e-5,
warmup 5000; both 12 epochs, steps 8 and 11, warmup ratio 0.001, no clipping.
"""

from __future__ import annotations

import ml_collections

from configs.det import common

BIFORMER_NO_DECAY = ("absolute_pos_embed", "relative_position_bias_table", "norm")
DEBIFORMER_NO_DECAY = ("absolute_pos_embed", "relative_position_bias_table", "rpe_table", "norm")


def get_base_config(model: str) -> ml_collections.ConfigDict:
    """common.get_base_config with BiFormer's Mask R-CNN optimiser (the rest is the 1x recipe)."""
    config = common.get_base_config(model)
    config.optim.weight_decay = 0.05
    config.optim.no_decay_keys = BIFORMER_NO_DECAY
    return config


def debiformer(config: ml_collections.ConfigDict, *, batch: int, lr: float, warmup_iters: int):
    """DeBiFormer's release: its decay rule, global batch (loss per GPU: batch / 8 images), lr, warmup."""
    config.optim.no_decay_keys = DEBIFORMER_NO_DECAY
    config.global_batch_size = batch
    config.loss_group_size = batch // 8
    config.optim.lr = lr
    config.optim.warmup_iters = warmup_iters
    return config
