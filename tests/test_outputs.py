"""Output folders are checked before any compute: writable, and never where an input lies."""

import os

import pytest

from custom.data.datalist import DatalistError
from custom.data.outputs import bundle_writable_dirs, output_path, spare_inputs, writable_dirs


def test_writable_folders_are_created_and_left_clean(tmp_path):
    out = tmp_path / "eval" / "segmentations"
    assert writable_dirs([out]) == [str(out)]
    assert out.is_dir() and not list(out.iterdir())


def test_a_folder_that_cannot_be_created_stops_the_run_naming_it(tmp_path):
    blocker = tmp_path / "models"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(SystemExit, match=rf"error: {blocker}/run: output folder is not writable \(NotADirectoryError"):
        bundle_writable_dirs([blocker / "run"])
    assert blocker.read_text() == "a file where the folder should be"


def test_an_existing_folder_where_no_file_can_be_written_is_refused():
    """An existing folder that refuses new files, for root too (CI runs as root, where a chmod'ed folder
    stays writable): Linux's /proc/self takes no new entries from anyone."""
    folder = "/proc/self"
    assert os.path.isdir(folder)
    with pytest.raises(DatalistError, match=r"^/proc/self: output folder is not writable \((FileNotFound|Permission)"):
        writable_dirs([folder])


def test_output_names_follow_save_imaged():
    assert output_path("/in/case_1.nii.gz", "/out", "seg") == output_path("/x/case_1.nii", "/out", "seg")
    assert str(output_path("/in/case_1.nii.gz", "/out", "seg")) == "/out/case_1_seg.nii.gz"
    assert str(output_path("/in/scan.mha", "/out", "")) == "/out/scan.nii.gz"


def test_an_output_that_would_replace_an_input_is_refused(tmp_path):
    image = tmp_path / "case_1.nii.gz"
    image.write_bytes(b"input")
    items = [{"image": str(image)}]
    assert spare_inputs(items, tmp_path / "out", "seg") == items
    with pytest.raises(DatalistError, match=r"case_1.nii.gz: the segmentation of .* would overwrite an input image"):
        spare_inputs(items, tmp_path, "")
    segmented = tmp_path / "case_1_seg.nii.gz"
    segmented.write_bytes(b"an input that looks like an output")
    with pytest.raises(DatalistError, match="would overwrite an input image"):
        spare_inputs([*items, {"image": str(segmented)}], tmp_path, "seg")
    assert image.read_bytes() == b"input" and segmented.read_bytes() == b"an input that looks like an output"


def test_two_inputs_with_one_output_name_are_refused(tmp_path):
    items = [{"image": str(tmp_path / d / "case.nii.gz")} for d in ("a", "b")]
    with pytest.raises(DatalistError, match=r"case_seg.nii.gz: .*b/case.nii.gz and .*a/case.nii.gz would both be"):
        spare_inputs(items, tmp_path / "out", "seg")
