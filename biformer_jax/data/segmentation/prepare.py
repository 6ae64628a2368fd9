"""Prepares a segmentation folder once: unpacks ADEChallengeData2016.zip, checks every example.

    python -m biformer_jax.data.prepare --name ade20k --root /data/ADEChallengeData2016 \\
        [--zip /downloads/ADEChallengeData2016.zip]    # unpacked next to --root first
    python -m biformer_jax.data.prepare --name seg_folder --root /data/my_seg

The check decodes every image and label map of both splits (a few minutes for ADE20K's 22,210)
and lists the problems the pipeline would stop on, each naming its file: missing annotations,
files that cannot be decoded (truncated, not an image; logged instead under
data.bad_images='skip'), label maps of another size than their image, class ids beyond the class
list that are not 255. Nothing is written into the folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import ml_collections

from biformer_jax.data.segmentation import sources as seg_sources

_MAX_LISTED = 10


def unpack_ade20k(zip_path: str, root: str) -> None:
    """Extracts the zip's ADEChallengeData2016/ folder as `root` (atomically: to a temp dir, then renamed)."""
    root_path = Path(root)
    if root_path.exists():
        raise FileExistsError(f"{root} exists already; remove it or drop --zip to check it as it is.")
    if not zipfile.is_zipfile(zip_path):
        raise seg_sources.SegDataError(f"{zip_path} is not a zip file (expected {seg_sources.ADE20K_ZIP}).")
    root_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root_path.parent, prefix=".unpack-") as tmp:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
            top = {n.split("/", 1)[0] for n in names if n.strip("/")}
            if top != {"ADEChallengeData2016"}:
                raise seg_sources.SegDataError(
                    f"{zip_path} should hold one folder ADEChallengeData2016/, found {sorted(top)[:5]}."
                )
            for i, member in enumerate(zf.infolist()):
                target = (Path(tmp) / member.filename).resolve()
                if not str(target).startswith(str(Path(tmp).resolve()) + os.sep):
                    raise seg_sources.SegDataError(f"{zip_path}: unsafe member path {member.filename!r}.")
                zf.extract(member, tmp)
                if (i + 1) % 2000 == 0:
                    logging.info("Unpacking %s: %d / %d files", zip_path, i + 1, len(names))
        shutil.move(str(Path(tmp) / "ADEChallengeData2016"), root)
    logging.info("Unpacked %s into %s", zip_path, root)


def check_split(cfg: ml_collections.ConfigDict, split: str, num_classes: int) -> tuple[int, list[str]]:
    """(number of examples, problems) of one split: every file decodes, every label map's size and ids."""
    images, labels = seg_sources.scan_split(cfg.root, split)  # missing annotations raise here
    problems: list[str] = []
    for i, (image_path, label_path) in enumerate(zip(images, labels)):
        try:
            # Decoded in full: a truncated file has a readable header and fails only here.
            size = seg_sources._decode(Path(image_path).read_bytes(), image_path, "image").size
            label = seg_sources._open_label(Path(label_path).read_bytes(), label_path)
            if label.shape[::-1] != size:
                raise seg_sources.SegDataError(
                    f"{label_path}: label map is {label.shape[1]}x{label.shape[0]} (w x h) but its image is "
                    f"{size[0]}x{size[1]}."
                )
            if cfg.reduce_zero_label:
                label = seg_sources.reduce_zero_label(label)
            seg_sources.check_label(label, num_classes, cfg.ignore_index, label_path, cfg.reduce_zero_label)
        except seg_sources.BadImageError as e:
            if cfg.bad_images != "skip":
                problems.append(str(e))
            else:
                logging.warning("%s Training skips it (data.bad_images='skip').", e)
        except (seg_sources.SegDataError, OSError) as e:
            problems.append(str(e))
        if (i + 1) % 1000 == 0:
            logging.info("Checked %s/%s: %d / %d", cfg.root, split, i + 1, len(images))
    return len(images), problems


def prepare_seg_dataset(cfg: ml_collections.ConfigDict, zip_path: str | None = None) -> seg_sources.SegDatasetInfo:
    """Unpacks (if zip_path), checks both splits and returns the dataset's info; raises listing problems."""
    if zip_path:
        unpack_ade20k(zip_path, cfg.root)
    seg_sources.scan_split.cache_clear()
    names = seg_sources.read_class_names(cfg)
    problems: list[str] = []
    for split in (cfg.train_split, cfg.eval_split):
        n, found = check_split(cfg, split, len(names))
        problems += found
        expected = seg_sources.ADE20K_SPLIT_SIZES.get(split) if cfg.name == "ade20k" else None
        if expected and n != expected:
            logging.warning("%s/%s holds %d images; the ADE20K benchmark has %d.", cfg.root, split, n, expected)
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise seg_sources.SegDataError(f"{len(problems)} example(s) need fixing:\n  {listed}{more}")
    return seg_sources.seg_dataset_info(cfg)
