"""Quickstart for detection: a micro RetinaNet on generated shapes, offline, on any CPU.

    python train.py --config=configs/det/quickstart.py --workdir=workdirs/det_quickstart
    python eval.py --config=configs/det/quickstart.py --checkpoint=workdirs/det_quickstart
    python predict.py --checkpoint=workdirs/det_quickstart --draw=drawn/ photo.png

Trains `retinanet_biformer_micro` (the micro BiFormer backbone, a 16-channel FPN and RetinaHead)
on a small COCO-format dataset generated on first use into a folder under the system's
temporary directory (biformer_jax/data/detection/synthetic.py: 96x128 images holding 1-3
squares, discs and triangles of 24-56 px), with the official pipeline at that size (Resize to
(128, 96), RandomFlip, Normalize, Pad 32) and the official loss and schedule shape, then
evaluates COCO box AP on the held-out images. The only changes from the COCO recipe are the
size of things (data, widths, float32) and the schedule: lr 2e-3 with a 10-step warmup for a
model trained from scratch, 32 short epochs (512 steps: the AP still rises with steps; 128 gave
0.157). Figures: README "Object detection (RetinaNet)".
"""

from configs.det import common


def get_config(arg=None):
    config = common.get_base_config("retinanet_biformer_micro")
    config.data.name = "synthetic"
    config.data.synthetic.num_train = 256
    config.data.synthetic.num_val = 32
    config.data.img_scale = (128, 96)  # (long, short): the images' own size
    config.data.buckets = ((96, 128),)
    config.data.max_boxes = 8
    config.data.threads = 2

    config.compute_dtype = "float32"  # bf16 matmuls are slow on CPUs
    config.global_batch_size = 16
    config.num_epochs = 32  # 512 steps: the AP still climbs with steps (0.22 / 0.38 / 0.51 / 0.60 at 128-512)
    config.optim.lr_steps = (28,)  # the 1x schedule's shape, shortened: x0.1 for the last 4 epochs
    config.optim.lr = 2e-3
    config.optim.warmup_iters = 10
    config.log_every_steps = 32
    config.eval_every_steps = 512  # once, at the end
    config.eval.batch_size = 8
    config.checkpoint.every_steps = 512
    return common.finish(config, arg)
