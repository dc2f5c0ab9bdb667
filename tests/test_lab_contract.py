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
