"""practice.py: every lab marks exercises, each graded by a test marked `exercise`; a practice copy
keeps the lab but the exercise bodies, never overwrites a learner's copy, and fails every exercise
check until the learner writes the bodies (so no grader can pass a stub)."""
import ast
import importlib.util
import re
import shutil

import pytest

from conftest import REPO, all_labs, assert_clean_failure, failure_of

spec = importlib.util.spec_from_file_location("practice", REPO / "practice.py")
practice = importlib.util.module_from_spec(spec)
spec.loader.exec_module(practice)

LABS = all_labs()
IDS = [f"{p.parent.name}/{p.name}" for p in LABS]


def graded_exercises(test_file):
    """The names in the test file's @pytest.mark.exercise("name") marks."""
    return set(re.findall(r'@pytest\.mark\.exercise\("([a-z0-9_]+)"\)', test_file.read_text(encoding="utf-8")))


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_every_lab_marks_exercises_and_its_tests_grade_each_one(lab):
    exercises = {e["name"] for e in practice.find_exercises(lab.read_text(encoding="utf-8"))}
    assert exercises, f"{lab.name} marks no exercise (CONTRIBUTING.md, 'Exercises')"
    graded = graded_exercises(practice.test_file_of(lab))
    assert exercises - graded == set(), f"exercises no test grades: {sorted(exercises - graded)}"
    assert graded - exercises == set(), f"tests grade exercises the lab does not mark: {sorted(graded - exercises)}"


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_a_practice_copy_is_the_lab_with_each_exercise_body_replaced_by_a_stub(lab):
    source = lab.read_text(encoding="utf-8")
    exercises = practice.find_exercises(source)
    copy = practice.practice_source(source)
    tree = ast.parse(copy)                       # it still compiles
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    for exercise in exercises:  # methods share names (forward): one of that name ends in the stub
        ends = [ast.unparse(f.body[-1]) for f in functions if f.name == exercise["function"]]
        assert any(end.startswith("raise NotImplementedError") and f"Exercise {exercise['name']}:" in end
                   for end in ends), (exercise["name"], ends)
    removed = {n for e in exercises for n in range(e["first"], e["last"] + 1)}
    kept = [line for n, line in enumerate(source.splitlines(), start=1) if n not in removed]
    stubs = [line for line in copy.splitlines() if "raise NotImplementedError(\"Exercise" in line
             or "raise NotImplementedError('Exercise" in line]
    assert [line for line in copy.splitlines() if line not in stubs] == kept


def test_start_writes_a_copy_once_and_never_overwrites_it(tmp_path):
    result = failure_of(practice.main, ["start", "09_vae.py", "--practice-dir", tmp_path])
    assert result.returncode == 0 and "reparameterize" in result.stdout
    copy = tmp_path / "09_vae.py"
    copy.write_text(copy.read_text() + "# my work\n")
    again = failure_of(practice.main, ["start", "week4_transformer_vae/09_vae.py", "--practice-dir", tmp_path])
    assert_clean_failure(again, "never overwritten")
    assert copy.read_text().endswith("# my work\n")
    assert_clean_failure(failure_of(practice.main, ["start", "10_nothing.py", "--practice-dir", tmp_path]),
                         "no lab called 10_nothing.py")


def test_fresh_copies_fail_every_exercise_check_and_the_lab_passes_them(tmp_path):
    """One pytest process grades a fresh copy of every lab: each exercise is 'to do' with the stub's
    NotImplementedError. The lab itself, put in the practice folder, passes every check."""
    fresh = tmp_path / "fresh"
    for lab in LABS:
        practice.start(lab.name, fresh)
    rows = practice.score(fresh)
    expected = {(lab.name, e["name"]) for lab in LABS for e in practice.find_exercises(lab.read_text(encoding="utf-8"))}
    assert {(copy, name) for copy, name, _passed, _why in rows} == expected
    for copy, name, passed, why in rows:
        assert not passed and f"Exercise {name}" in why, (copy, name, why)

    solved = tmp_path / "solved"
    solved.mkdir()
    shutil.copy(REPO / "week4_transformer_vae" / "09_vae.py", solved)
    assert [(name, passed) for _copy, name, passed, _why in practice.score(solved)] == \
        [("reparameterize", True), ("kl_divergence", True)]
