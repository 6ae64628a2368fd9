"""Classification inputs (timm's ImageNet recipe): transforms.py (train / eval transforms),
randaugment.py, erasing.py (RandomErasing), mixup.py (Mixup / CutMix, jitted). The sources, the
sampler and the iterators they feed are shared: biformer_jax.data."""
