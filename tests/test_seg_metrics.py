"""mIoU / mAcc / aAcc against a confusion matrix written out by hand (mmseg's definitions)."""

import numpy as np
import pytest

from biformer_jax.tasks.segmentation import metrics

# 5 classes; 255 = ignore. Class 2 is predicted on a labelled pixel but never labelled; class 3 is
# predicted only on ignored pixels (so it does not count); class 4 appears nowhere.
LABEL = np.array([[0, 0, 1, 255], [1, 1, 255, 0], [0, 1, 1, 1]])
PRED = np.array([[0, 1, 1, 3], [1, 0, 3, 0], [2, 1, 1, 0]])
# Rows: label class, columns: predicted class, over the 10 labelled pixels, counted by hand.
CONFUSION = np.array(
    [
        [2, 1, 1, 0, 0],  # label 0: (0,0)->0, (0,1)->1, (1,3)->0, (2,0)->2
        [2, 4, 0, 0, 0],  # label 1: (0,2)->1, (1,0)->1, (1,1)->0, (2,1)->1, (2,2)->1, (2,3)->0
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
)


def test_counts_and_summary_match_the_hand_confusion_matrix():
    counts = metrics.intersect_and_union(PRED, LABEL, 5)
    inter = np.diag(CONFUSION)
    pred_area, label_area = CONFUSION.sum(0), CONFUSION.sum(1)
    np.testing.assert_array_equal(counts.intersect, inter)
    np.testing.assert_array_equal(counts.pred_area, pred_area)
    np.testing.assert_array_equal(counts.label_area, label_area)
    np.testing.assert_array_equal(counts.union, pred_area + label_area - inter)

    s = metrics.summarize(counts)
    # IoU: 2/6, 4/7, 0 (predicted but absent counts as 0), NaN, NaN (absent from both: left out).
    np.testing.assert_allclose(s["IoU"][:3], [2 / 6, 4 / 7, 0.0])
    assert np.isnan(s["IoU"][3]) and np.isnan(s["IoU"][4])
    assert s["mIoU"] == pytest.approx((2 / 6 + 4 / 7 + 0.0) / 3)
    # Acc: absent from the labels -> NaN, so class 2 is left out of mAcc although it was predicted.
    assert np.isnan(s["Acc"][2])
    assert s["mAcc"] == pytest.approx((2 / 4 + 4 / 6) / 2)
    assert s["aAcc"] == pytest.approx(6 / 10)


def test_counts_sum_over_images_before_dividing():
    a = metrics.intersect_and_union(PRED, LABEL, 5)
    b = metrics.intersect_and_union(np.zeros((2, 2), int), np.array([[2, 2], [2, 255]]), 5)
    s = metrics.summarize(a + b)
    # Class 2 now has 3 labelled pixels, none right: IoU 0 / (1 + 3); class 0 gains 3 wrong predictions.
    assert s["IoU"][2] == 0.0 and s["Acc"][2] == 0.0
    assert s["IoU"][0] == pytest.approx(2 / (4 + 3 + 4 - 2))
    assert (a + b).num_images == 2
    np.testing.assert_array_equal(metrics.SegCounts.from_array((a + b).as_array()).union, (a + b).union)


def test_out_of_range_label_is_refused():
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        metrics.intersect_and_union(np.zeros((1, 2), int), np.array([[7, 255]]), 5)


def test_table_lists_every_class():
    s = metrics.summarize(metrics.intersect_and_union(PRED, LABEL, 5))
    table = metrics.per_class_table(s, ["a", "b", "c", "d", "e"])
    assert "| b     | 57.14 | 66.67 |" in table and "nan" in table
