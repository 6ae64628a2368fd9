"""Semantic segmentation: mmseg-exact metrics, whole/slide/aug inference, the train step, schedules."""
