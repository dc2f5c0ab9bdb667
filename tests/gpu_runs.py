"""Run chosen labs' default runs on a CUDA GPU and collect one table of figures and wall times.

    python tests/gpu_runs.py --data-dir /path/to/data                   # every lab, default runs
    python tests/gpu_runs.py --data-dir DATA --labs 02_neural_network 04_cnn_basics --precision fp16
    python tests/gpu_runs.py --smoke                                     # quick check of the script

Each lab runs in its own process with --device cuda (and --precision where the lab has it); the
table (Markdown, printed and written to --out-dir/gpu_runs.md, with the GPU's name beside every
figure) lists each lab's headline results from its metrics.json and its wall time.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
LAB_DIRS = ("week1_pytorch", "week2_cnn", "week3_rnn", "week4_transformer_vae", "projects")
HEADLINES = ("test_accuracy", "val_loss", "test_exact_match", "test_neg_elbo", "conditional_accuracy",
             "hf_test_accuracy", "seconds_to_target", "train_time_s")


def all_labs():
    return [p for d in LAB_DIRS for pattern in ("[0-9][0-9]_*.py", "music_*.py")
            for p in sorted((REPO / d).glob(pattern))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labs", nargs="*", help="lab names (file stems); default: every lab")
    parser.add_argument("--data-dir", default="./data", help="the labs' --data-dir")
    parser.add_argument("--out-dir", default="runs/gpu_runs", help="each lab's outputs and the table")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--smoke", action="store_true", help="smoke runs instead of default runs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per lab")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; this script measures labs on one.")
    gpu = torch.cuda.get_device_name(0)
    labs = [lab for lab in all_labs() if not args.labs or lab.stem in args.labs]
    out_root = Path(args.out_dir)
    rows = []
    for lab in labs:
        out_dir = out_root / lab.stem
        command = [sys.executable, str(lab), "--device", "cuda", "--data-dir", args.data_dir, "--out-dir", str(out_dir)]
        if '"--precision"' in lab.read_text(encoding="utf-8"):
            command += ["--precision", args.precision]
        if args.smoke:
            command.append("--smoke")
        print(f"== {lab.stem}: {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, timeout=args.timeout)
        wall = time.perf_counter() - started
        figures = "failed (exit %d)" % result.returncode
        if result.returncode == 0:
            metrics = json.loads((out_dir / "metrics.json").read_text())
            figures = ", ".join(f"{key} {metrics[key]:.4g}" for key in HEADLINES
                                if isinstance(metrics.get(key), (int, float)))
        rows.append(f"| {lab.stem} | {gpu} | {args.precision} | {figures} | {wall:.0f} s |")
    table = "\n".join(["| lab | GPU | precision | figures (metrics.json) | wall time |",
                       "|---|---|---|---|---|", *rows])
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "gpu_runs.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
