"""Segmentation inputs (mmseg's ADE20K pipeline): config.py (data + eval fields), sources.py (ADE20K /
seg_folder folders, label checks), shapes.py (the generated quickstart set), transforms.py (mmseg's
transforms), pipeline.py (train / eval iterators), prepare.py (ADE20K zip -> folder), ade20k_meta.py."""
