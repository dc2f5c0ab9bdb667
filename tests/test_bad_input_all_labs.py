"""Bad input that every lab must refuse the same way (LAB_CONTRACT section 7): one line on stderr,
a non-zero exit, nothing written. In-process (`main(argv)`), since each fails before any work."""
import pytest
import torch

from conftest import REPO, all_labs, assert_clean_failure, failure_of, load_lab

LABS = all_labs()
IDS = [f"{p.parent.name}/{p.name}" for p in LABS]
# The accelerators this machine lacks: the test runs on a GPU machine too (there, mps is missing).
MISSING_DEVICES = [name for name, present in (("cuda", torch.cuda.is_available()),
                                              ("mps", torch.backends.mps.is_available())) if not present]


def lab_main(lab):
    return load_lab(str(lab.relative_to(REPO))).main


@pytest.mark.parametrize("device", MISSING_DEVICES)
@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_a_missing_device_gets_one_line(lab, device, tmp_path):
    result = failure_of(lab_main(lab), ["--device", device, "--smoke", "--out-dir", tmp_path / "out",
                                        "--data-dir", tmp_path / "data"])
    assert_clean_failure(result, f"--device {device}")
    assert not (tmp_path / "out").exists(), "a failing run wrote to --out-dir"


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_an_out_dir_that_is_a_file_gets_one_line(lab, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    result = failure_of(lab_main(lab), ["--smoke", "--device", "cpu", "--out-dir", a_file,
                                        "--data-dir", tmp_path / "data"])
    assert_clean_failure(result, "--out-dir", "not a folder")
    assert a_file.read_text() == "keep me"
    assert sorted(tmp_path.iterdir()) == [a_file], "a failing run created a folder"


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_a_data_dir_that_is_a_file_gets_one_line(lab, tmp_path):
    a_file = tmp_path / "data.txt"
    a_file.write_text("keep me")
    result = failure_of(lab_main(lab), ["--device", "cpu", "--data-dir", a_file, "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "--data-dir", "not a folder")
    assert a_file.read_text() == "keep me"
    assert sorted(tmp_path.iterdir()) == [a_file], "a failing run created a folder"


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_an_unknown_choice_gets_one_line(lab, tmp_path):
    result = failure_of(lab_main(lab), ["--device", "tpu", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "--device")
    assert not (tmp_path / "out").exists()
