"""Pictures of what a trained model does: `python -m biformer_jax.visualize routes|gradcam|erf ...`.

- `routes`: the regions a query's region routes to (numbered by routing score) and the query's
  token-level attention inside them (BiFormer's BRA; DeBiFormer also its agents' deformed points);
- `gradcam`: Grad-CAM of a class at any stage's output, as an overlay;
- `erf`: the effective receptive field of a stage's centre unit, averaged over a folder of images,
  side by side across checkpoints and models, with the share of the image holding 20/50/90% of it.

Every command reads any checkpoint the project loads (`inputs.load_checkpoint`). See README
"Visualisation".
"""
