"""Semantic segmentation configs (ADE20K, the official mmseg recipes) and the offline quickstart."""
