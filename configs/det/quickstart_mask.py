"""Quickstart for instance segmentation: a micro Mask R-CNN on generated shapes, offline, on any CPU.

    python train.py --config=configs/det/quickstart_mask.py --workdir=workdirs/mask_quickstart
    python eval.py --config=configs/det/quickstart_mask.py --checkpoint=workdirs/mask_quickstart
    python predict.py --checkpoint=workdirs/mask_quickstart --draw=drawn/ photo.png

Trains `maskrcnn_biformer_micro` (the micro BiFormer backbone, a 16-channel FPN, RPN, 2 x 32 fc box
head, one-conv mask head) on the shapes of configs/det/quickstart.py, whose json now carries each
shape's exact mask as a polygon, with the official pipeline at that size (Resize to (128, 96),
RandomFlip, Normalize, Pad 32), the official losses (RPN, RoI, 28x28 masks) and the 1x schedule's
shape, then evaluates COCO box and mask AP on the held-out images.

Changed from the COCO recipe to fit a few CPU minutes (the loss semantics are the official ones):
float32 (bf16 matmuls are slow on CPUs), a larger learning rate and a short warmup for a model
trained from scratch, 30 epochs of 8-image batches (960 steps), one evaluation at the end; the
micro variant samples 128 RoIs per image from 200 proposals (the configs: 512 from 1000), 3x
faster steps (models/detection/__init__.py). Measured: README "Mask R-CNN" (320 steps with 512
RoIs gave 0.282 box / 0.297 mask AP).
Figures: README "Mask R-CNN".
"""

from configs.det import common, mask_common


def get_config(arg=None):
    config = mask_common.get_base_config("maskrcnn_biformer_micro")
    config.data.name = "synthetic"
    config.data.synthetic.num_train = 256
    config.data.synthetic.num_val = 32
    config.data.img_scale = (128, 96)  # (long, short): the images' own size
    config.data.buckets = ((96, 128),)
    config.data.max_boxes = 8
    config.data.threads = 2

    config.compute_dtype = "float32"  # bf16 matmuls are slow on CPUs
    config.global_batch_size = 8  # more, smaller steps in the same time: 320 steps of 8 beat 128 of 16
    config.num_epochs = 30  # 960 steps
    config.optim.lr_steps = (26,)  # the 1x schedule's shape, shortened: x0.1 for the last 4 epochs
    config.optim.lr = 2e-3
    config.optim.warmup_iters = 10
    config.log_every_steps = 32
    config.eval_every_steps = 960  # once, at the end (an eval costs ~15 s here)
    config.eval.batch_size = 8
    config.checkpoint.every_steps = 960
    return common.finish(config, arg)
