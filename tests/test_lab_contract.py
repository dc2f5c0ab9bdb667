"""Static checks of every lab's source against LAB_CONTRACT.md (fast: nothing is imported or run)."""
import ast
import re
import sys

import pytest

from conftest import REPO, all_labs

REQUIRED_FLAGS = ("--device", "--seed", "--data-dir", "--out-dir", "--smoke")
THIRD_PARTY_ALLOWED = {  # import name -> why it is allowed (all in requirements.txt)
    "torch", "torchvision", "torchaudio", "tensorboard", "matplotlib", "seaborn",
    "transformers", "datasets", "tqdm", "numpy", "PIL", "music21", "IPython",
}
REPO_NAMES = {p.stem for p in REPO.rglob("*.py") if ".venv" not in p.parts} | {
    p.name for p in REPO.iterdir() if p.is_dir()
}

LABS = all_labs()
IDS = [f"{p.parent.name}/{p.name}" for p in LABS]


def parse(path):
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_modules(nodes):
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, "." if node.level else (node.module or "").split(".")[0]


def test_there_are_labs():
    assert LABS, "no lab found"


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_imports_are_standalone(lab):
    for line, module in imported_modules(ast.walk(parse(lab))):
        assert module != ".", f"line {line}: relative import"
        if module in sys.stdlib_module_names:
            continue
        assert module not in REPO_NAMES, f"line {line}: imports '{module}', a file of this repository"
        assert module in THIRD_PARTY_ALLOWED, f"line {line}: '{module}' is not in requirements.txt"


@pytest.mark.parametrize("lab", [p for p in LABS if p.parent.name == "projects"],
                         ids=[i for i in IDS if i.startswith("projects")])
def test_capstones_import_only_stdlib_and_torch_at_module_level(lab):
    for line, module in imported_modules(parse(lab).body):
        assert module in sys.stdlib_module_names or module == "torch", (
            f"line {line}: '{module}' at module level; import it inside the function that uses it")


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_shape_of_a_lesson(lab):
    text = lab.read_text(encoding="utf-8")
    tree = parse(lab)
    docstring = ast.get_docstring(tree) or ""
    assert len(docstring) >= 200, "the module docstring says what the lab teaches, how to run it, what it reaches"
    assert len(re.findall(r"^# %%", text, flags=re.M)) >= 3, "split the lab into '# %%' cells"
    assert "parse_known_args" in text and ".parse_args(" not in text, "use parse_known_args (Colab passes -f)"
    for flag in REQUIRED_FLAGS:
        assert f'"{flag}"' in text, f"flag {flag} missing"


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_every_path_a_lab_names_is_in_a_clone(lab):
    """Commands and paths in a lab's text work from a clone of this repository: no folder of the
    machine the figures were measured on (a scratch /tmp folder, ../shared tools, a home folder)."""
    outside = re.findall(r"(?:\.\./shared|/tmp/|/work/|/home/|/Users/)[^\s`'\")]*", lab.read_text(encoding="utf-8"))
    assert not outside, f"paths outside the repository: {sorted(set(outside))}"


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_nothing_is_used_before_the_cell_that_defines_it(lab):
    """Run cell by cell from the top (a notebook, Colab), a function never needs a name that a later
    `# %%` cell defines: the lab reads in the order it runs."""
    text = lab.read_text(encoding="utf-8")
    cell_starts = [n for n, line in enumerate(text.splitlines(), start=1) if line.startswith("# %%")]
    cell_of = lambda line: sum(start <= line for start in cell_starts)
    tree = ast.parse(text)
    defined = {}  # top-level name -> the line that first defines it
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        for name in names:
            defined.setdefault(name, node.lineno)
    too_early = set()
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        inner = list(ast.walk(node))
        local = {a.arg for f in inner if isinstance(f, (ast.FunctionDef, ast.Lambda))
                 for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs}
        local |= {n.id for n in inner if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        local |= {f.name for f in inner if isinstance(f, (ast.FunctionDef, ast.ClassDef)) and f is not node}
        for name in inner:
            if (isinstance(name, ast.Name) and isinstance(name.ctx, ast.Load) and name.id in defined
                    and name.id not in local and cell_of(defined[name.id]) > cell_of(node.lineno)):
                too_early.add(f"{node.name} (line {node.lineno}) uses {name.id}, defined in a later cell "
                              f"(line {defined[name.id]})")
    assert not too_early, sorted(too_early)


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_nothing_runs_on_import(lab):
    tree = parse(lab)
    last = tree.body[-1]
    assert isinstance(last, ast.If) and "__name__" in ast.unparse(last.test), "end with the __main__ guard"
    for node in tree.body[:-1]:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            pytest.fail(f"line {node.lineno}: a call at module level runs on import")
        assert not isinstance(node, (ast.For, ast.While, ast.With, ast.Try, ast.If)), (
            f"line {node.lineno}: a {type(node).__name__} block at module level runs on import")


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_every_torch_load_is_weights_only(lab):
    for node in ast.walk(parse(lab)):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("torch.load"):
            flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert flags.get("weights_only") == "True", f"line {node.lineno}: torch.load without weights_only=True"


# The plumbing (CONTRIBUTING.md, "The same plumbing in every lab"): labs stand alone, so each holds a
# copy, and the copies are one text. Lab 03 is the reference; change it there and copy it everywhere.
PLUMBING_START = "# %%\n# Plumbing: the same text in every lab of the course"
REFERENCE_LAB = REPO / "week1_pytorch" / "03_training_loop.py"


def plumbing_cell(source: str) -> str:
    start = source.find(PLUMBING_START)
    if start < 0:
        return ""
    end = source.find("\n# %%", start + 1)
    return source[start:] if end < 0 else source[start:end + 1]


def main_function(source: str) -> str:
    start = source.rfind("\ndef main(argv=None)")
    return source[start + 1:] if start >= 0 else ""


def first_difference(text: str, reference: str) -> str:
    for number, (line, wanted) in enumerate(zip(text.splitlines(), reference.splitlines()), 1):
        if line != wanted:
            return f"line {number} of the cell is\n  {line!r}\nin lab 03 it is\n  {wanted!r}"
    return f"the cell has {len(text.splitlines())} lines, lab 03's has {len(reference.splitlines())}"


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_the_plumbing_cell_is_the_same_text_in_every_lab(lab):
    source, reference = lab.read_text(encoding="utf-8"), REFERENCE_LAB.read_text(encoding="utf-8")
    assert source.count(PLUMBING_START) == 1, f"one cell starting {PLUMBING_START!r}, copied from lab 03"
    cell = plumbing_cell(source)
    assert cell == plumbing_cell(reference), first_difference(cell, plumbing_cell(reference))
    assert main_function(source) == main_function(reference), "main() and the __main__ guard end the file as in lab 03"


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_the_plumbing_is_defined_once_and_every_file_is_written_through_it(lab):
    source = lab.read_text(encoding="utf-8")
    cell_names = {node.name for node in ast.parse(plumbing_cell(source)).body
                  if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    defined_twice = sorted(name for name in cell_names
                           if len(re.findall(rf"^\s*(?:def|class) {name}\b", source, flags=re.M)) > 1)
    assert not defined_twice, f"defined again outside the plumbing cell: {defined_twice}"
    rest = source.replace(plumbing_cell(source), "")
    for line_number, line in enumerate(rest.splitlines(), 1):
        assert "torch.save(" not in line, f"a checkpoint is saved with torch_save_atomically: {line.strip()}"
        assert not re.search(r"write_text\(json\.dumps", line), f"JSON is written with write_json_atomically: {line.strip()}"


# Predict, then run (CONTRIBUTING.md, "Questions and drills"): every lab closes with a cell of 3-5
# questions, each a command of this lab to run, a prediction to write down first, and the line the
# lab prints (or the metrics.json key it writes) that answers it.
QUESTIONS_START = "# %%\n# Predict, then run."
QUESTION = re.compile(r"^# (\d)\. Run: +(python (\S+)[^\n]*)\n((?:#    [^\n]*\n)+)", flags=re.M)


@pytest.mark.parametrize("lab", LABS, ids=IDS)
def test_a_closing_cell_asks_predict_then_run_questions_about_this_lab(lab):
    source = lab.read_text(encoding="utf-8")
    assert source.count(QUESTIONS_START) == 1, f"one cell starting {QUESTIONS_START!r}"
    start = source.index(QUESTIONS_START)
    end = source.find("\n# %%", start + 1)
    assert end > 0, "the questions cell is followed by the cell of main()"
    cell = source[start:end + 1]
    assert "\ndef main(argv=None)" in source[end:], "the questions come after the lesson, before main()"
    questions = QUESTION.findall(cell)
    assert 3 <= len(questions) <= 5, f"3 to 5 questions '# N. Run: python ...', found {len(questions)}"
    assert [int(q[0]) for q in questions] == list(range(1, len(questions) + 1)), "numbered 1, 2, 3, ..."
    for number, command, path, rest, in questions:
        assert path == lab.relative_to(REPO).as_posix(), f"question {number} runs {path}, not this lab"
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", command):
            assert f'"{flag}"' in source, f"question {number}: {flag} is not a flag of this lab"
        assert "Predict:" in rest and "Answer:" in rest, f"question {number} needs 'Predict:' and 'Answer:' lines"


# A debugging drill in every training lab: --bug NAME plants one bug (CONTRIBUTING.md, "Questions
# and drills"); the lab's own tests check the symptom it writes to metrics.json.
@pytest.mark.parametrize("lab", [lab for lab in LABS if lab.stem != "01_pytorch_basics"],
                         ids=[i for i, lab in zip(IDS, LABS) if lab.stem != "01_pytorch_basics"])
def test_a_training_lab_offers_a_debugging_drill(lab):
    source = lab.read_text(encoding="utf-8")
    assert re.search(r'add_argument\(\s*"--bug"', source), "a --bug flag with the planted bugs as choices"
    assert "# Drill:" in source, "a '# Drill:' comment says the symptom to look for and the tool that finds it"
