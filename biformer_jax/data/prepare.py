"""Prepares a dataset for the input pipeline (once, before training), showing progress.

    python -m biformer_jax.data.prepare --name imagenet2012 --data_dir /data/tfds \\
        --manual_dir /data/imagenet_tars          # holds ILSVRC2012_img_{train,val}.tar
    python -m biformer_jax.data.prepare --name cifar100 --data_dir /data/tfds
    python -m biformer_jax.data.prepare --name folder --folder /data/my_images   # checks the layout
    python -m biformer_jax.data.prepare --name ade20k --root /data/ADEChallengeData2016 \\
        [--zip ADEChallengeData2016.zip]          # unpacks, then checks every label map
    python -m biformer_jax.data.prepare --name seg_folder --root /data/my_seg   # + classes.txt

TFDS datasets are written as array_record (random access: exact resumption without skipping).
'digits' ships inside scikit-learn and needs nothing.
"""

from __future__ import annotations

import argparse
import logging

import ml_collections

from biformer_jax.data import config as config_lib
from biformer_jax.data import sources


def prepare_dataset(cfg: ml_collections.ConfigDict, manual_dir: str | None = None) -> sources.DatasetInfo:
    """Makes cfg's dataset ready (TFDS: download / build; folder: scan) and returns its DatasetInfo."""
    if cfg.name not in config_lib.DATASET_KINDS:
        try:
            sources.dataset_info(cfg)
        except sources.NoRandomAccessError:
            raise
        except sources.DatasetNotPreparedError:
            sources.prepare_tfds(cfg.name, data_dir=cfg.data_dir or None, manual_dir=manual_dir)
    return sources.dataset_info(cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="'imagenet2012', another TFDS name, 'folder' or 'digits'")
    parser.add_argument("--data_dir", default="", help="TFDS data_dir (default: TFDS's own)")
    parser.add_argument("--manual_dir", default=None, help="folder with manually downloaded files (ImageNet tars)")
    parser.add_argument("--folder", default="", help="root of the ImageFolder tree, for --name folder")
    parser.add_argument("--root", default="", help="ADEChallengeData2016 (or seg_folder) root, for ade20k / seg_folder")
    parser.add_argument("--zip", default=None, help="ADEChallengeData2016.zip to unpack as --root first")
    parser.add_argument("--reduce_zero_label", default=None, choices=("true", "false"), help="seg_folder: 0 = ignore?")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.name in ("ade20k", "seg_folder"):
        _prepare_segmentation(args)
        return
    cfg = config_lib.default_config()
    cfg.name, cfg.data_dir, cfg.folder = args.name, args.data_dir, args.folder
    try:
        info = prepare_dataset(cfg, manual_dir=args.manual_dir)
    except (sources.DatasetNotPreparedError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.name}: ready. {info}")


def _prepare_segmentation(args) -> None:
    from biformer_jax.data.segmentation import config as seg_config
    from biformer_jax.data.segmentation import prepare as seg_prepare

    cfg = seg_config.default_seg_config()
    cfg.name, cfg.root = args.name, args.root
    if args.reduce_zero_label is not None:
        cfg.reduce_zero_label = args.reduce_zero_label == "true"
    try:
        info = seg_prepare.prepare_seg_dataset(cfg, zip_path=args.zip)
    except (sources.DatasetNotPreparedError, ValueError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None
    print(
        f"{args.name}: ready. {info.num_train_examples} train / {info.num_eval_examples} eval images, "
        f"{info.num_classes} classes. Train with --config.data.root={args.root}"
    )


if __name__ == "__main__":
    main()
