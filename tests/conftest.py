"""Shared helpers for the tests (tests may share code; the labs may not).

Labs have file names that start with a digit, so they cannot be imported with a plain `import`:
`load_lab` imports one by path, which runs nothing because every lab guards its work with
`if __name__ == "__main__"`.
"""
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The suite runs on two pytest workers (pytest.ini): one PyTorch thread per worker and per lab process
# keeps them from fighting over the same cores. Set before torch starts its thread pool.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
LAB_DIRS = ("week1_pytorch", "week2_cnn", "week3_rnn", "week4_transformer_vae", "projects")


def all_labs():
    """Every lab script: `NN_*.py` and the music bridges `music_*.py` in the five lab folders."""
    return [p for d in LAB_DIRS for pattern in ("[0-9][0-9]_*.py", "music_*.py")
            for p in sorted((REPO / d).glob(pattern))]


def lab_path(relative: str) -> Path:
    """The lab under test: the file in the repository, or the learner's practice copy of it when
    LAB_FILE names one (several copies: joined with os.pathsep), e.g.
    `LAB_FILE=practice/09_vae.py python -m pytest -m exercise -n 0 tests/test_09_vae.py`."""
    for practice_copy in filter(None, os.environ.get("LAB_FILE", "").split(os.pathsep)):
        if Path(practice_copy).name == Path(relative).name:
            return Path(practice_copy).resolve()
    return REPO / relative


def load_lab(relative: str):
    """Import a lab file as a module, e.g. load_lab("week1_pytorch/02_neural_network.py")."""
    path = lab_path(relative)
    name = "lab_" + path.parent.name + "_" + path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def run_lab(relative: str, *args, timeout=300, env_extra=None):
    """Run a lab in a fresh Python process, as a learner would; returns CompletedProcess."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(lab_path(relative)), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )


def assert_clean_failure(result, *expected_fragments):
    """Bad input: non-zero exit and ONE line on stderr that names the problem (no traceback, no
    usage dump). `result` is a CompletedProcess, or `failure_of(main, argv)` for an in-process run."""
    assert result.returncode != 0, f"expected a failure, got exit 0\n{result.stdout[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr[-2000:]}"
    for fragment in expected_fragments:
        assert fragment.lower() in result.stderr.lower(), (fragment, result.stderr[-2000:])


def failure_of(main, argv):
    """Call a lab's main(argv) in-process as a terminal run would end: returns an object with
    returncode, stdout and stderr like subprocess.CompletedProcess (SystemExit("msg") prints msg)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as exit:
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
                code = 1
            else:
                code = exit.code or 0
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@functools.lru_cache(maxsize=None)
def terminal_smoke_run(lab: Path, out_dir: Path):
    """A lab's smoke run on the CPU in a terminal, once per test process: the smoke, notebook and
    lab tests that read its outputs share it (they share a pytest-xdist worker: xdist_group)."""
    return run_lab(str(lab.relative_to(REPO)), "--smoke", "--device", "cpu", "--out-dir", out_dir, "--data-dir",
                   out_dir.parent / "data")


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")


@pytest.fixture
def smoke_output(smoke_root):
    """smoke_output("week2_cnn/05_transfer_learning.py") -> the out-dir of that lab's terminal smoke
    run, to read and never to write (a test that adds a file would change what the others see)."""
    def out_dir_of(relative: str) -> Path:
        lab = lab_path(relative)
        out_dir = smoke_root / lab.stem / "out"
        out_dir.parent.mkdir(exist_ok=True)
        result = terminal_smoke_run(lab, out_dir)
        assert result.returncode == 0, f"smoke run failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return out_dir
    return out_dir_of


@pytest.fixture
def no_network(monkeypatch):
    """In this process every connection attempt fails at once, as on a machine with no network:
    a lab's download error is then tested in-process, without a process of its own to start."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def lab_data_dir():
    """Real datasets for `-m full` runs: LAB_DATA_DIR (see README, 'Measuring on real data')."""
    value = os.environ.get("LAB_DATA_DIR")
    if not value or not Path(value).is_dir():
        # A full run selected without its data must not pass as a green run of skips.
        pytest.fail("set LAB_DATA_DIR to a folder holding the real datasets for -m full runs "
                    "(README, 'Measuring on real data')")
    return Path(value)


SIMULATOR = REPO / "tests" / "simulated_cuda.py"


def run_lab_on_simulated_cuda(relative: str, *args, timeout=300, report=None):
    """Run a lab on the simulated T4 of tests/simulated_cuda.py (pass `--device cuda` in args);
    with `report=path`, the device-to-host reads are written there as JSON."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    if report is not None:
        env["SIMULATED_CUDA_REPORT"] = str(report)
    return subprocess.run(
        [sys.executable, str(SIMULATOR), str(lab_path(relative)), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )


def run_on_simulated_cuda(code: str, timeout=120):
    """Run a Python snippet on the simulated T4, in a fresh process. The snippet may call
    `load_lab("week1_pytorch/02_neural_network.py")`; returns CompletedProcess."""
    prelude = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
               "import simulated_cuda; simulated_cuda.install()\n"
               "from conftest import load_lab\n")
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


# Exercises (practice.py): a test marked `@pytest.mark.exercise("name")` grades the exercise of that
# name in the lab its file tests. With EXERCISE_REPORT set, each result is written there (one JSON
# line) for `python practice.py score`; with LAB_FILE set, the run ends with one line per exercise.
EXERCISE_RESULTS = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("exercise")
    if marker is None or not (report.when == "call" or report.failed):
        return
    why = call.excinfo.exconly().strip().splitlines()[0][:300] if call.excinfo else ""
    lab_file = Path(item.module.LAB).name if hasattr(item.module, "LAB") else "?"
    result = {"lab": lab_file, "exercise": marker.args[0], "test": item.nodeid, "passed": report.passed, "why": why}
    EXERCISE_RESULTS.append(result)
    if os.environ.get("EXERCISE_REPORT"):
        with open(os.environ["EXERCISE_REPORT"], "a", encoding="utf-8") as report_file:
            report_file.write(json.dumps(result) + "\n")


def pytest_terminal_summary(terminalreporter):
    if not os.environ.get("LAB_FILE") or not EXERCISE_RESULTS:
        return
    terminalreporter.section("exercises")
    for name in dict.fromkeys(r["exercise"] for r in EXERCISE_RESULTS):
        failed = [r for r in EXERCISE_RESULTS if r["exercise"] == name and not r["passed"]]
        terminalreporter.write_line(f"{name}: " + (f"FAILED ({failed[0]['why']})" if failed else "passed"))
