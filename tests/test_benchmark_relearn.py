"""benchmarks/em_relearn.py's split of the read-back by whether EM's masks came out right, and its
alignment with an evaluation's true-mask read-back: the figures that say where EM's fidelity gap lies."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import em_relearn  # noqa: E402


def _row(scene, iou, em, again, held):
    return {"scene": scene, "mask_iou": iou, "held_out": held,
            "em": {"colour": em, "shape": em}, "relearned": {"colour": again, "shape": again}}


def test_the_split_and_the_true_mask_rows_line_up_scene_by_scene(tmp_path):
    rows = [_row(0, 1.0, [False, True], [True, True], [False, True]),
            _row(1, 0.5, [True], [False], [False])]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"results": {"true_masks": {
        "fid_colour": [True, True, False], "fid_shape": [True, False], "fid_held_out_shape": [True]}}}))
    summary = em_relearn.summarise(em_relearn.with_true_masks(rows, str(partial)))
    assert summary["scenes"] == 2 and summary["em"]["colour"] == pytest.approx(2 / 3)
    right, wrong = summary["masks_right"], summary["masks_wrong"]
    assert right["scenes"] == 1 and right["relearned"]["colour"] == 1.0 and right["em"]["colour"] == 0.5
    assert right["true_masks"]["colour"] == 1.0 and right["true_masks"]["shape_held_out"] == 1.0
    assert right["true_masks"]["shape_seen"] == 1.0  # scene 0's seen shape is the first seen entry
    assert wrong["true_masks"]["colour"] == 0.0 and wrong["true_masks"]["shape_seen"] == 0.0
    partial.write_text(json.dumps({"results": {"true_masks": {
        "fid_colour": [True], "fid_shape": [True], "fid_held_out_shape": []}}}))
    with pytest.raises(SystemExit, match="holds 1 images"):
        em_relearn.with_true_masks(rows, str(partial))
