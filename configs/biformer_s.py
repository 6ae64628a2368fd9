"""BiFormer-S on ImageNet-1K, the official recipe (rayleizhu/BiFormer). Paper top-1: 83.8%.

Launch (any number of devices; the global batch stays 1024):

    python train.py --config=configs/biformer_s.py --workdir=workdirs/biformer_s \
        --config.data.data_dir=/path/to/tensorflow_datasets

Laptop smoke run (batch 8, 10 steps): --config=configs/biformer_s.py:runlocal
Evaluate: python eval.py --config=configs/biformer_s.py --checkpoint=workdirs/biformer_s

Expected: 83.8% top-1 (ImageNet-1K val, 224x224, the paper's figure; not yet reproduced with
this code base). Global batch 1024 (128 x 8 GPUs), 300 epochs.
drop_path 0.15: the official README / scripts training command for biformer_small.
"""

from configs import common

PAPER_TOP1 = 83.8


def get_config(arg=None):
    config = common.get_base_config("biformer_small", drop_path_rate=0.15, recipe="biformer")
    return common.finish(config, arg)
