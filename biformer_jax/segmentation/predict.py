"""`python -m biformer_jax.segmentation.predict ...`: the segmentation predict CLI under its first name.

The same flags and outputs as `python -m biformer_jax.tasks.segmentation.predict`, where it lives.
"""

from absl import app

from biformer_jax.tasks.segmentation.predict import main

if __name__ == "__main__":
    app.run(main)
