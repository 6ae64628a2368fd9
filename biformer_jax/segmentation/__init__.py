"""The former home of the segmentation task (now biformer_jax.tasks.segmentation); kept for its CLI path."""
