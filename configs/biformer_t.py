"""BiFormer-T on ImageNet-1K, the official recipe (rayleizhu/BiFormer). Paper top-1: 81.4%.

Launch (any number of devices; the global batch stays 1024):

    python train.py --config=configs/biformer_t.py --workdir=workdirs/biformer_t \
        --config.data.data_dir=/path/to/tensorflow_datasets

Laptop smoke run (batch 8, 10 steps): --config=configs/biformer_t.py:runlocal
Evaluate: python eval.py --config=configs/biformer_t.py --checkpoint=workdirs/biformer_t

Expected: 81.4% top-1 (ImageNet-1K val, 224x224, the paper's figure; not yet reproduced with
this code base). Global batch 1024 (128 x 8 GPUs), 300 epochs.
drop_path 0.1: main.py's default, the value the author confirmed for BiFormer-T (rayleizhu/BiFormer issue 32).
"""

from configs import common

PAPER_TOP1 = 81.4


def get_config(arg=None):
    config = common.get_base_config("biformer_tiny", drop_path_rate=0.1, recipe="biformer")
    return common.finish(config, arg)
