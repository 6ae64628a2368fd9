"""BiFormer-B on ImageNet-1K, the official recipe (rayleizhu/BiFormer). Paper top-1: 84.3%.

Launch (any number of devices; the global batch stays 1024):

    python train.py --config=configs/biformer_b.py --workdir=workdirs/biformer_b \
        --config.data.data_dir=/path/to/tensorflow_datasets

Laptop smoke run (batch 8, 10 steps): --config=configs/biformer_b.py:runlocal
Evaluate: python eval.py --config=configs/biformer_b.py --checkpoint=workdirs/biformer_b

Expected: 84.3% top-1 (ImageNet-1K val, 224x224, the paper's figure; not yet reproduced with
this code base). Global batch 1024 (128 x 8 GPUs), 300 epochs.
drop_path 0.4: not stated in the release (README and scripts give only BiFormer-S's 0.15); 0.4 is the
value commonly used for this size and should be checked against the released training log.
"""

from configs import common

PAPER_TOP1 = 84.3


def get_config(arg=None):
    config = common.get_base_config("biformer_base", drop_path_rate=0.4, recipe="biformer")
    return common.finish(config, arg)
