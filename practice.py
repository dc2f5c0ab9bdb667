"""Practice copies of the labs, graded by the labs' own tests, and your scoreboard.

Each lab marks the pieces you should be able to write yourself: a comment block at the top of the
function's body (after its docstring) that names the exercise, says what to write, and which page
of the documentation to read:

    def kl_divergence(mu, logvar):
        \"\"\"Per image: KL from N(mu, exp(logvar)) to N(0, I), summed over latent dimensions.\"\"\"
        # Exercise kl_divergence: the closed form -1/2 * sum(1 + log sigma^2 - mu^2 - sigma^2).
        # Docs: https://pytorch.org/docs/stable/distributions.html#module-torch.distributions.kl
        return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)

A practice copy keeps every line of the lab except the code under each exercise block, which
becomes `raise NotImplementedError(...)` naming the exercise. Write those bodies, then:

    python practice.py start week4_transformer_vae/09_vae.py   # writes practice/09_vae.py (never overwrites)
    python practice.py score                                    # every exercise of every copy: passed or not
    LAB_FILE=practice/09_vae.py python -m pytest -m exercise -n 0 tests/test_09_vae.py   # the checks, in detail
    python practice/09_vae.py --smoke                           # the whole lab runs on your code

The tests marked `exercise` compare your code with PyTorch's own or with an exact property
(shapes, values, gradients); they are the same tests that check the lab. `practice/` is ignored
by git: your work stays yours.
"""
import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
LAB_DIRS = ("week1_pytorch", "week2_cnn", "week3_rnn", "week4_transformer_vae", "projects")
PRACTICE_DIR = REPO / "practice"
EXERCISE_LINE = re.compile(r"^(?P<indent>\s*)# Exercise (?P<name>[a-z][a-z0-9_]*): (?P<what>.+)$")


class PracticeError(Exception):
    """A problem the learner can fix: printed as one line, exit status 1."""


def all_labs():
    return [p for d in LAB_DIRS for pattern in ("[0-9][0-9]_*.py", "music_*.py")
            for p in sorted((REPO / d).glob(pattern))]


def find_exercises(source: str):
    """Each exercise block of a lab: name, what to write, the docs line, and the lines its stub
    replaces (1-based, inclusive: from after the comment block to the end of the function)."""
    lines = source.splitlines()
    functions = [node for node in ast.walk(ast.parse(source))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    exercises = []
    for number, line in enumerate(lines, start=1):
        match = EXERCISE_LINE.match(line)
        if not match:
            continue
        inside = [f for f in functions if f.lineno < number <= f.end_lineno]
        if not inside:
            raise PracticeError(f"line {number}: '# Exercise {match['name']}' is not inside a function body")
        function = max(inside, key=lambda f: f.lineno)  # the innermost function holding the comment
        block_end = number
        while block_end < len(lines) and lines[block_end].startswith(match["indent"] + "#"):
            block_end += 1                               # the comment lines under the exercise line
        comments = [lines[i].strip()[2:] for i in range(number, block_end)]
        docs = [c for c in comments if c.startswith("Docs:")]
        what = " ".join([match["what"].strip()] + [c for c in comments if not c.startswith("Docs:")])
        if block_end >= function.end_lineno:
            raise PracticeError(f"line {number}: exercise {match['name']} has no code under its comment block")
        exercises.append({"name": match["name"], "what": what, "docs": docs[0] if docs else "",
                          "indent": match["indent"], "function": function.name,
                          "first": block_end + 1, "last": function.end_lineno})
    names = [e["name"] for e in exercises]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PracticeError(f"exercise names used twice: {', '.join(repeated)}")
    return exercises


def practice_source(source: str) -> str:
    """The lab with each exercise's code replaced by a stub that says what to write."""
    lines = source.splitlines(keepends=True)
    for exercise in reversed(find_exercises(source)):  # from the bottom, so line numbers stay valid
        message = f"Exercise {exercise['name']}: {exercise['what']}"
        if exercise["docs"]:
            message += f" {exercise['docs']}"
        stub = f"{exercise['indent']}raise NotImplementedError({message!r})\n"
        lines[exercise["first"] - 1:exercise["last"]] = [stub]
    return "".join(lines)


def lab_named(name: str) -> Path:
    """A lab by its path (week2_cnn/04_cnn_basics.py) or its file name (04_cnn_basics.py)."""
    for lab in all_labs():
        if name in (lab.name, lab.relative_to(REPO).as_posix(), lab.stem):
            return lab
    raise PracticeError(f"no lab called {name}; the labs are: {', '.join(p.name for p in all_labs())}")


def test_file_of(lab: Path) -> Path:
    """tests/test_04_cnn_basics.py for week2_cnn/04_cnn_basics.py, tests/test_p01_... for projects/01_..."""
    return REPO / "tests" / (f"test_p{lab.name}" if lab.parent.name == "projects" else f"test_{lab.name}")


def start(name: str, practice_dir: Path):
    """Write the practice copy of a lab; returns its path and the lab's exercises."""
    lab = lab_named(name)
    copy = practice_dir / lab.name
    if copy.exists():
        raise PracticeError(f"{copy} exists and holds your work: it is never overwritten "
                            f"(move it away to start afresh)")
    source = lab.read_text(encoding="utf-8")
    exercises = find_exercises(source)
    if not exercises:
        raise PracticeError(f"{lab.name} marks no exercises")
    if practice_dir.exists() and not practice_dir.is_dir():
        raise PracticeError(f"--practice-dir {practice_dir} is a file, not a folder")
    practice_dir.mkdir(parents=True, exist_ok=True)
    copy.write_text(practice_source(source), encoding="utf-8")
    return copy, exercises


def score(practice_dir: Path):
    """Run the exercise checks of every practice copy in one pytest process; one row per exercise
    of each copy: (lab file, exercise, passed, why it failed)."""
    copies = sorted(practice_dir.glob("*.py")) if practice_dir.is_dir() else []
    if not copies:
        raise PracticeError(f"no practice copies in {practice_dir}: start one with "
                            f"`python practice.py start 04_cnn_basics.py`")
    labs = [lab_named(copy.name) for copy in copies]
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "exercises.jsonl"
        env = dict(os.environ, LAB_FILE=os.pathsep.join(str(c.resolve()) for c in copies),
                   EXERCISE_REPORT=str(report), MPLBACKEND="Agg")
        subprocess.run([sys.executable, "-m", "pytest", "-m", "exercise", "-n", "0", "-q", "--tb=no",
                        "-p", "no:cacheprovider", *map(str, sorted({test_file_of(lab) for lab in labs}))],
                       cwd=REPO, env=env, capture_output=True, text=True)
        results = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    rows = []
    for copy, lab in zip(copies, labs):
        for exercise in find_exercises(lab.read_text(encoding="utf-8")):
            checks = [r for r in results if r["lab"] == lab.name and r["exercise"] == exercise["name"]]
            failed = [r for r in checks if not r["passed"]]
            why = failed[0]["why"] if failed else ("" if checks else "no check ran (is the copy importable?)")
            rows.append((copy.name, exercise["name"], bool(checks) and not failed, why))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "score"], help="start: write a practice copy; score: grade them")
    parser.add_argument("lab", nargs="?", help="with start: the lab, e.g. week2_cnn/04_cnn_basics.py or 04_cnn_basics.py")
    parser.add_argument("--practice-dir", type=Path, default=PRACTICE_DIR, help="where the practice copies live")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            if not args.lab:
                raise PracticeError("start needs a lab, e.g. `python practice.py start 04_cnn_basics.py`")
            copy, exercises = start(args.lab, args.practice_dir)
            print(f"wrote {copy}: write the bodies of {', '.join(e['name'] for e in exercises)}; "
                  f"then `python practice.py score`")
        else:
            rows = score(args.practice_dir)
            for lab, name, passed, why in rows:
                print(f"{'passed' if passed else 'to do ':6s}  {lab:28s} {name:28s} {why[:110]}")
            print(f"{sum(r[2] for r in rows)} of {len(rows)} exercises pass")
    except PracticeError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
