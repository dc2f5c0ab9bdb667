"""README.md and README.ko.md (its Korean translation) say the same thing.

Pure text, no torch: a figure changed in one README must be changed in the other, and the two
week-by-week checklists must run the same commands and read the same metrics.

What is compared, language-independently:
  - the course map: every table row whose first cell names a lab (`week*/NAME.py`, `projects/NAME.py`);
    the same labs in both, every lab of the repository among them, and in each row's last column
    (the measured result and time) the same numbers;
  - the checklist: the `##` section holding `- [ ]` items; the same `###` weeks in the same order,
    the same number of items in each, and item by item the same code spans and the same numbers;
    every `python`/`torchrun` command in it names a file of the repository, and every metric key
    it names is one a lab writes.
"""
import re
import shlex
from collections import Counter

import pytest

from conftest import REPO, all_labs

README = "README.md"
README_KO = "README.ko.md"
BOTH = (README, README_KO)

LAB_PATH = re.compile(r"(?:week\d\w*|projects)/[\w.-]+\.py")
NUMBER = re.compile(r"\d+(?:\.\d+)*")           # 98.57, 2.800, 49, 7.1, 04 (kept as written)
CODE_SPAN = re.compile(r"`([^`]+)`")
METRIC_KEY = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")   # test_accuracy, hf_test_accuracy, ...
RUNNABLE = ("python ", "torchrun ")


def read(name):
    path = REPO / name
    assert path.is_file(), f"{name} is missing: README.md and README.ko.md must both exist"
    return path.read_text(encoding="utf-8")


def course_map(name):
    """{lab path: last cell} for every table row whose first cell names a lab, in file order."""
    rows = {}
    for number, line in enumerate(read(name).splitlines(), 1):
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        found = LAB_PATH.fullmatch(cells[0].strip("`"))
        if found is None:
            continue
        path = found.group(0)
        assert path not in rows, f"{name}, line {number}: the course map lists {path} twice"
        assert len(cells) == 4, (f"{name}, line {number}: the course map row of {path} has {len(cells)} "
                                 f"cells, not 4 (lab | days | what you learn | result, wall time)")
        rows[path] = cells[-1]
    return rows


def numbers(text):
    return Counter(NUMBER.findall(text))


def show(counter):
    return ", ".join(sorted(counter.elements(), key=lambda n: (float(n), n))) or "(none)"


def checklist(name):
    """The checklist section: (intro text, [(week heading, [item text, ...]), ...])."""
    sections = re.split(r"(?m)^## ", read(name))
    found = [s for s in sections if re.search(r"(?m)^- \[ \] ", s)]
    assert len(found) == 1, (f"{name}: expected one '## ' section holding the week-by-week checklist "
                             f"('- [ ] ' items), found {len(found)}")
    intro, *weeks = re.split(r"(?m)^### ", found[0])
    parsed = []
    for week in weeks:
        heading, _, body = week.partition("\n")
        items, current = [], None
        for line in body.splitlines():
            if line.startswith("- [ ] "):
                current = [line[len("- [ ] "):].strip()]
                items.append(current)
            elif current is not None and line.startswith("  ") and line.strip():
                current.append(line.strip())
            else:
                current = None
        parsed.append((heading.strip(), [" ".join(item) for item in items]))
    return intro, parsed


def spans(text):
    return Counter(" ".join(span.split()) for span in CODE_SPAN.findall(text))


def commands(text):
    return {span for span in spans(text) if span.startswith(RUNNABLE)}


def test_course_maps_list_the_same_labs_and_every_lab_of_the_repository():
    english, korean = course_map(README), course_map(README_KO)
    only_english, only_korean = sorted(english.keys() - korean.keys()), sorted(korean.keys() - english.keys())
    assert not only_english and not only_korean, (
        f"the course maps differ: only in {README}: {only_english or '(none)'}; "
        f"only in {README_KO}: {only_korean or '(none)'}. Add or remove the row in both READMEs")
    assert list(english) == list(korean), (
        f"the course maps list the same labs in another order: {README}: {list(english)}; "
        f"{README_KO}: {list(korean)}")
    labs = [lab.relative_to(REPO).as_posix() for lab in all_labs()]
    assert labs, "all_labs() found no lab"
    missing = [lab for lab in labs if lab not in english]
    assert not missing, f"labs of the repository missing from the course map of both READMEs: {missing}"
    stale = [path for path in english if not (REPO / path).is_file()]
    assert not stale, f"the course maps name labs that do not exist: {stale}"


def labs_in_course_map():
    """The course map's labs, for parametrize; a README that cannot be read fails the tests above instead."""
    try:
        return list(course_map(README))
    except AssertionError:
        return []


@pytest.mark.parametrize("lab", labs_in_course_map())
def test_course_map_rows_give_the_same_figures(lab):
    english, korean = course_map(README), course_map(README_KO)
    assert lab in korean, f"{README_KO}'s course map has no row for {lab}"
    ours, theirs = numbers(english[lab]), numbers(korean[lab])
    assert ours == theirs, (
        f"course map row {lab}, last column: the figures differ.\n"
        f"  only in {README}: {show(ours - theirs)}\n"
        f"  only in {README_KO}: {show(theirs - ours)}\n"
        f"  {README}: {english[lab]}\n"
        f"  {README_KO}: {korean[lab]}\n"
        f"Whoever changes a figure in one README changes it in the other.")


def test_checklists_run_the_same_commands():
    (intro_en, weeks_en), (intro_ko, weeks_ko) = checklist(README), checklist(README_KO)
    ours = commands(intro_en) | {c for _, items in weeks_en for item in items for c in commands(item)}
    theirs = commands(intro_ko) | {c for _, items in weeks_ko for item in items for c in commands(item)}
    assert any(c.startswith("python ") for c in ours), f"{README}'s checklist names no `python ...` command"
    assert "python practice.py score" in commands(intro_en) and "python practice.py score" in commands(intro_ko), (
        "the checklist's self-assessment (theory 40%, code 40%, practice 20%) must point the code part "
        "at `python practice.py score`, in both READMEs")
    assert ours == theirs, (f"the checklists' commands differ: only in {README}: {sorted(ours - theirs) or '(none)'}; "
                            f"only in {README_KO}: {sorted(theirs - ours) or '(none)'}")


def test_checklists_agree_week_by_week_and_item_by_item():
    (intro_en, weeks_en), (intro_ko, weeks_ko) = checklist(README), checklist(README_KO)
    assert numbers(intro_en) == numbers(intro_ko) and spans(intro_en) == spans(intro_ko), (
        f"the checklists' introductions differ: numbers only in {README}: {show(numbers(intro_en) - numbers(intro_ko))}, "
        f"only in {README_KO}: {show(numbers(intro_ko) - numbers(intro_en))}; code only in {README}: "
        f"{sorted((spans(intro_en) - spans(intro_ko)).elements())}, only in {README_KO}: "
        f"{sorted((spans(intro_ko) - spans(intro_en)).elements())}")
    assert len(weeks_en) == len(weeks_ko), (
        f"{README}'s checklist has {len(weeks_en)} weeks ({[h for h, _ in weeks_en]}), "
        f"{README_KO}'s has {len(weeks_ko)} ({[h for h, _ in weeks_ko]})")
    for (head_en, items_en), (head_ko, items_ko) in zip(weeks_en, weeks_ko):
        assert numbers(head_en) == numbers(head_ko), (
            f"checklist week '{head_en}' / '{head_ko}': the headings' numbers differ "
            f"({show(numbers(head_en))} against {show(numbers(head_ko))})")
        assert 3 <= len(items_en) <= 6, f"{README}, checklist week '{head_en}': {len(items_en)} items, not 3-6"
        assert len(items_en) == len(items_ko), (
            f"checklist week '{head_en}': {len(items_en)} items in {README}, {len(items_ko)} in {README_KO} "
            f"('{head_ko}')")
        for index, (en, ko) in enumerate(zip(items_en, items_ko), 1):
            where = f"checklist week '{head_en}', item {index}"
            code_en, code_ko = spans(en), spans(ko)
            assert code_en == code_ko, (
                f"{where}: the code differs (commands, metric keys, files stay as written).\n"
                f"  only in {README}: {sorted((code_en - code_ko).elements()) or '(none)'}\n"
                f"  only in {README_KO}: {sorted((code_ko - code_en).elements()) or '(none)'}\n"
                f"  {README}: {en}\n  {README_KO}: {ko}")
            assert numbers(en) == numbers(ko), (
                f"{where}: the figures differ.\n"
                f"  only in {README}: {show(numbers(en) - numbers(ko))}\n"
                f"  only in {README_KO}: {show(numbers(ko) - numbers(en))}\n"
                f"  {README}: {en}\n  {README_KO}: {ko}")
            assert any(span.startswith(RUNNABLE) for span in code_en) or "same run" in en, (
                f"{where}: names no command (`python ...`) and is not read from the previous item's run: {en}")


def lab_files_named(command):
    """The .py files a checklist command names, each resolved to a path of the repository or None."""
    resolved = {}
    names = {lab.name: lab for lab in all_labs()}
    for token in shlex.split(command):
        if not token.endswith(".py") or "=" in token:
            continue
        path = REPO / token
        resolved[token] = path if path.is_file() else names.get(token) if "/" not in token else None
    return resolved


@pytest.mark.parametrize("name", BOTH)
def test_every_checklist_command_names_a_file_of_the_repository(name):
    intro, weeks = checklist(name)
    runnable = sorted(commands(intro) | {c for _, items in weeks for item in items for c in commands(item)})
    assert runnable, f"{name}'s checklist names no command"
    for command in runnable:
        files = lab_files_named(command)
        assert files, f"{name}, checklist command `{command}` names no .py file"
        missing = [token for token, path in files.items() if path is None]
        assert not missing, (f"{name}, checklist command `{command}` names {missing}, which the repository "
                             f"does not have (a lab's bare file name counts for `practice.py start`)")


@pytest.mark.parametrize("name", BOTH)
def test_every_metric_key_in_the_checklist_is_written_by_a_lab(name):
    sources = "\n".join(lab.read_text(encoding="utf-8") for lab in all_labs())
    _, weeks = checklist(name)
    named = {span for _, items in weeks for item in items for span in spans(item) if METRIC_KEY.fullmatch(span)}
    assert named, f"{name}'s checklist names no metric key"
    unknown = sorted(key for key in named if f'"{key}"' not in sources)
    assert not unknown, (f"{name}'s checklist names metric keys that no lab writes to metrics.json "
                         f"(no \"key\" in any lab's source): {unknown}")
