"""Lab 05 (transfer learning): freezing, the unfreezing schedule, the new head, and bad input."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_clean_failure, failure_of, load_lab, run_on_simulated_cuda

LAB = "week2_cnn/05_transfer_learning.py"


@pytest.fixture(scope="module")
def lab():
    return load_lab(LAB)


def small_resnet(lab, num_classes=3):
    torch.manual_seed(0)
    return lab.build_model({"arch": "resnet18", "num_classes": num_classes})


def one_step(lab, model, strategy, open_now):
    """One optimizer step as the lab takes it, with `open_now` stages open."""
    lab.open_stages(model, open_now)
    lab.set_train_mode(model, open_now)
    optimizer = lab.make_optimizer(model, strategy, lr=0.1, lr_decay=0.3, weight_decay=1e-4)
    loss = F.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("strategy, open_now", [("feature_extraction", ["head"]),
                                                ("gradual_unfreezing", ["layer4", "head"])])
def test_frozen_stages_do_not_change_after_an_optimizer_step(lab, strategy, open_now):
    model = small_resnet(lab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one_step(lab, model, strategy, open_now)
    after = model.state_dict()
    for stage in lab.STAGES:
        prefixes = {"stem": ("conv1.", "bn1."), "head": ("fc.",)}.get(stage, (stage + ".",))
        keys = [k for k in before if k.startswith(prefixes)]
        changed = [k for k in keys if not torch.equal(before[k], after[k])]
        if stage in open_now:
            assert changed, f"{stage} is open but nothing in it changed"
        else:   # parameters AND batch-norm running statistics stay as they were
            assert not changed, f"{stage} is frozen but {changed[:3]} changed"


# The debugging drill (--bug optimizer-built-before-unfreezing): in-process, one step of a resnet18.
def weight_change_after_unfreezing_layer4(lab, bug):
    """Gradual unfreezing's epoch 1 (the head open) when the optimizer is built, then layer4 opened
    and one step taken, as in run_strategy."""
    model = small_resnet(lab, num_classes=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    lab.open_stages(model, ["head"])
    optimizer = lab.make_optimizer(model, "gradual_unfreezing", lr=0.1, lr_decay=0.3, weight_decay=1e-4, bug=bug)
    lab.open_stages(model, ["layer4", "head"])
    lab.set_train_mode(model, ["layer4", "head"])
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 0, 1]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return lab.stage_weight_change(model, start)


def test_drill_optimizer_built_before_unfreezing_never_moves_the_unfrozen_stage(lab):
    """Measured: layer4 moves by 1.6e-2 of its weights in one clean step, by exactly 0 with the bug."""
    clean = weight_change_after_unfreezing_layer4(lab, None)
    bugged = weight_change_after_unfreezing_layer4(lab, "optimizer-built-before-unfreezing")
    assert clean["layer4"] > 1e-5 and clean["head"] > 0, clean
    assert bugged["layer4"] == 0.0, "--bug optimizer-built-before-unfreezing: layer4 must not move"
    assert bugged["head"] > 0, "the head is in the optimizer either way"
    assert clean["layer3"] == bugged["layer3"] == 0.0, "a frozen stage moves in neither"


def test_the_bug_flag_reaches_make_optimizer(lab, tmp_path, monkeypatch):
    """run() hands --bug to make_optimizer, the function that plants it (stopped at its first call)."""
    received = []

    class Stop(Exception):
        pass

    def first_optimizer(*args, **kwargs):
        received.append(kwargs.get("bug"))
        raise Stop

    monkeypatch.setattr(lab, "make_optimizer", first_optimizer)
    for argv, expected in ((["--bug", "optimizer-built-before-unfreezing"], "optimizer-built-before-unfreezing"),
                           ([], None)):
        with pytest.raises(Stop):
            lab.main([*argv, "--smoke", "--device", "cpu", "--strategies", "gradual_unfreezing",
                      "--out-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
        assert received[-1] == expected


@pytest.mark.exercise("open_stages")
def test_frozen_parameters_get_no_gradient(lab):
    model = small_resnet(lab)
    lab.open_stages(model, ["head"])
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is None for p in lab.stage_parameters(model, "layer4"))
    assert all(p.grad is not None for p in lab.stage_parameters(model, "head"))


@pytest.mark.exercise("set_train_mode")
def test_open_stages_train_and_frozen_stages_stay_in_eval_mode(lab):
    model = small_resnet(lab).eval()
    lab.set_train_mode(model, ["layer4", "head"])
    assert model.training
    for stage, modules in lab.stage_modules(model).items():
        flags = {m.training for module in modules for m in module.modules()}
        assert flags == {stage in ("layer4", "head")}, stage


def test_unfreezing_schedule_opens_exactly_the_named_stages_at_the_named_epochs(lab):
    schedule = lab.parse_schedule("2:layer4, 4:layer3+layer2")
    assert schedule == {2: ["layer4"], 4: ["layer3", "layer2"]}
    expected = {1: {"head"}, 2: {"head", "layer4"}, 3: {"head", "layer4"},
                4: {"head", "layer4", "layer3", "layer2"}, 5: {"head", "layer4", "layer3", "layer2"}}
    model = small_resnet(lab)
    for epoch, stages in expected.items():
        opened = lab.stages_open_at("gradual_unfreezing", epoch, schedule)
        assert set(opened) == stages, epoch
        lab.open_stages(model, opened)
        for stage in lab.STAGES:
            flags = {p.requires_grad for p in lab.stage_parameters(model, stage)}
            assert flags == {stage in stages}, (epoch, stage)
    assert lab.stages_open_at("feature_extraction", 5, schedule) == ["head"]
    assert lab.stages_open_at("fine_tuning", 1, schedule) == list(lab.STAGES)


@pytest.mark.parametrize("text", ["0:layer4", "2:layer9", "two:layer4", "3:"])
def test_bad_schedules_are_refused(lab, text):
    with pytest.raises(ValueError):
        lab.parse_schedule(text)


@pytest.mark.exercise("calibrate_batch_norm")
def test_batch_norm_calibration_sets_running_statistics_from_the_data(lab):
    model = small_resnet(lab)
    images = 3 + 2 * torch.randn(8, 3, 64, 64)
    lab.calibrate_batch_norm(model, [(images, torch.zeros(8))], torch.device("cpu"))
    conv_out = model.conv1(images)
    torch.testing.assert_close(model.bn1.running_mean, conv_out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert model.bn1.momentum == 0.1


@pytest.mark.exercise("make_optimizer")
def test_discriminative_learning_rates_fall_stage_by_stage(lab):
    model = small_resnet(lab)
    optimizer = lab.make_optimizer(model, "fine_tuning", lr=0.01, lr_decay=0.5, weight_decay=0)
    assert isinstance(optimizer, torch.optim.SGD)
    rates = {group["stage"]: group["lr"] for group in optimizer.param_groups}
    assert sorted(rates) == sorted(lab.STAGES)
    for group in optimizer.param_groups:
        assert group["momentum"] == 0.9
        assert [id(p) for p in group["params"]] == [id(p) for p in lab.stage_parameters(model, group["stage"])]
    assert rates["head"] == pytest.approx(0.01)
    assert rates["layer4"] == pytest.approx(0.005)
    assert rates["stem"] == pytest.approx(0.01 * 0.5 ** 5)
    only_head = lab.make_optimizer(small_resnet(lab), "feature_extraction", 0.01, 0.5, 0)
    assert [g["stage"] for g in only_head.param_groups] == ["head"]


def test_head_has_the_datasets_class_count(lab, tmp_path):
    root = lab.make_synthetic_imagefolder(tmp_path / "data", torch.Generator().manual_seed(0), per_class=(2, 1))
    (root / "train" / "greens").mkdir()
    (root / "val" / "greens").mkdir()
    for split in ("train", "val"):
        source = next((root / split / "reds").iterdir())
        (root / split / "greens" / "000.png").write_bytes(source.read_bytes())
    train, val, skipped = lab.load_imagefolder(root, None, None)
    assert train.classes == ["blues", "greens", "reds"] and not skipped
    model = lab.pretrained_model("resnet18", None, len(train.classes))
    assert model.fc.out_features == 3
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


# --- bad input ---------------------------------------------------------------------------------

def test_a_folder_that_is_not_an_imagefolder_names_the_layout(lab, tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "loose.png").write_bytes(b"")        # images must sit in class folders
    with pytest.raises(lab.LabError, match=r"train/<class>/<images>"):
        lab.load_imagefolder(tmp_path, None, None)
    (tmp_path / "train" / "cats").mkdir()
    lab.make_synthetic_imagefolder(tmp_path / "elsewhere", torch.Generator(), per_class=(1, 1))
    (tmp_path / "train" / "cats" / "a.png").write_bytes(
        next((tmp_path / "elsewhere" / "train" / "reds").iterdir()).read_bytes())
    with pytest.raises(lab.LabError, match=r"val.* is missing"):
        lab.load_imagefolder(tmp_path, None, None)


def test_a_class_folder_with_no_images_is_named(lab, tmp_path):
    root = lab.make_synthetic_imagefolder(tmp_path, torch.Generator().manual_seed(0), per_class=(2, 1))
    (root / "train" / "empty_class").mkdir()
    (root / "train" / "empty_class" / "notes.txt").write_text("not an image")
    with pytest.raises(lab.LabError, match="empty_class"):
        lab.load_imagefolder(root, None, None)


def test_an_image_that_does_not_decode_is_skipped_with_a_warning(lab, tmp_path, capsys):
    root = lab.make_synthetic_imagefolder(tmp_path, torch.Generator().manual_seed(0), per_class=(3, 2))
    broken = root / "train" / "reds" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    truncated = root / "val" / "blues" / "truncated.png"
    truncated.write_bytes((root / "val" / "blues" / "000.png").read_bytes()[:60])
    train, val, skipped = lab.load_imagefolder(root, None, None)
    assert set(skipped) == {str(broken), str(truncated)}
    assert str(broken) not in [path for path, _ in train.samples]
    assert len(train) == 6 and len(val) == 4          # 2 x 3 and 2 x 2 good ones remain
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "truncated.png" in err


def test_bad_imagefolder_stops_main_with_a_message(lab, tmp_path):
    (tmp_path / "train" / "ants").mkdir(parents=True)
    (tmp_path / "val" / "ants").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        lab.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--weights", "none",
                  "--arch", "resnet18"])
    message = str(exit_info.value.code)
    assert message.startswith("error:") and "holds no images" in message and "ants" in message


# No network (the no_network fixture: sockets refuse to connect), and an empty TORCH_HOME holds no
# cached weights.
def run_offline(lab, tmp_path, monkeypatch, *args):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return failure_of(lab.main, list(args))


def test_default_dataset_absent_with_no_network_names_url_and_layout(lab, tmp_path, monkeypatch, no_network):
    result = run_offline(lab, tmp_path, monkeypatch, "--data-dir", tmp_path / "empty", "--out-dir", tmp_path / "out",
                         "--weights", "none", "--arch", "resnet18")
    assert_clean_failure(result, "https://download.pytorch.org/tutorial/hymenoptera_data.zip",
                         "train/<class>/<images>", "--smoke")


def test_imagenet_weights_with_no_network_suggest_weights_none(lab, tmp_path, monkeypatch, no_network):
    root = lab.make_synthetic_imagefolder(tmp_path / "data", torch.Generator().manual_seed(0), per_class=(2, 1))
    result = run_offline(lab, tmp_path, monkeypatch, "--data-dir", root, "--out-dir", tmp_path / "out",
                         "--arch", "resnet18", "--image-size", "32")
    assert_clean_failure(result, "https://download.pytorch.org/models/resnet18", "--weights none")


@pytest.mark.parametrize("flags, fragment", [(["--unfreeze-schedule", "0:layer4"], "epochs start at 1"),
                                             (["--lr", "-1"], "--lr: must be a finite number above 0 and at most 10"),
                                             (["--lr-decay", "2"], "--lr-decay: must be a finite number above 0 and at most 1"),
                                             (["--weight-decay", "nan"], "--weight-decay: must be a finite number at least 0"),
                                             (["--epochs", "0"], "--epochs: must be a whole number at least 1"),
                                             (["--batch-size", "1"], "--batch-size: must be a whole number at least 2"),
                                             (["--image-size", "16"], "--image-size: must be a whole number at least 32"),
                                             (["--workers", "-1"], "--workers: must be a whole number at least 0"),
                                             (["--strategies", "magic"], "--strategies"),
                                             (["--bug", "typo"], "--bug: invalid choice"),
                                             (["--precision", "fp8"], "--precision"),
                                             (["--precision", "bf16"], "--precision bf16 is for CUDA")])
def test_out_of_range_flags_are_refused_in_one_line(lab, flags, fragment, tmp_path):
    out_dir = tmp_path / "out"
    result = failure_of(lab.main, [*flags, "--device", "cpu", "--smoke", "--out-dir", out_dir])
    assert_clean_failure(result, fragment)
    assert not out_dir.exists()


def test_a_bad_flag_in_a_notebook_prints_one_line_and_does_not_exit(lab, monkeypatch, capsys):
    import types
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    lab.main(["--lr-decay", "0"])                                # no SystemExit: a notebook cell just ends
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--lr-decay" in lines[0]


def test_missing_corrupt_or_foreign_checkpoint_is_a_clean_error(lab, tmp_path):
    with pytest.raises(lab.LabError, match="does not exist"):
        lab.load_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(lab.LabError, match="truncated or corrupt"):
        lab.load_checkpoint(tmp_path / "bad.pt")
    model = small_resnet(lab, num_classes=2)
    good = {"model": model.state_dict(), "config": {"arch": "resnet18", "num_classes": 2},
            "sample_inputs": torch.zeros(1, 3, 32, 32), "sample_outputs": torch.zeros(1, 2)}
    torch.save(good, tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:100_000])
    with pytest.raises(lab.LabError, match="truncated or corrupt"):
        lab.load_checkpoint(tmp_path / "truncated.pt")
    torch.save(dict(good, config={"arch": "resnet34", "num_classes": 2}), tmp_path / "mismatch.pt")
    with pytest.raises(lab.LabError, match="another architecture"):
        lab.load_checkpoint(tmp_path / "mismatch.pt")
    # What lab 04 saves: a CIFAR-10 CNN with {"kind", "widths", "logit_scale"} as its config.
    torch.save(dict(good, config={"kind": "cifar", "widths": [32, 64, 128], "logit_scale": 1 / 9}),
               tmp_path / "lab04.pt")
    with pytest.raises(lab.LabError, match="not written by this lab") as caught:
        lab.load_checkpoint(tmp_path / "lab04.pt")
    assert "truncated or corrupt" not in str(caught.value) and "\n" not in str(caught.value)


# --- precision, data loading and the GPU (simulated on this CPU: tests/simulated_cuda.py) ----------

@pytest.mark.parametrize("gpu, native_bf16, expected", [("T4", False, torch.float16), ("H200", True, torch.bfloat16)])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it_natively(lab, monkeypatch, gpu, native_bf16, expected):
    # A T4 answers True to the plain question (it emulates bf16) and False without emulation.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or native_bf16)
    cuda = torch.device("cuda")
    assert lab.pick_precision("auto", cuda) is expected
    assert lab.pick_precision("fp16", cuda) is torch.float16 and lab.pick_precision("bf16", cuda) is torch.bfloat16
    assert lab.pick_precision("fp32", cuda) is None
    assert lab.grad_scaler(torch.device("cpu"), torch.float16).is_enabled()
    assert not lab.grad_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()


def test_cpu_trains_in_fp32_and_refuses_half_precision(lab):
    cpu = torch.device("cpu")
    assert lab.pick_precision("auto", cpu) is None and lab.pick_precision("fp32", cpu) is None
    for name in ("fp16", "bf16"):
        with pytest.raises(lab.LabError, match=f"--precision {name} is for CUDA"):
            lab.pick_precision(name, cpu)


def test_loaders_use_persistent_workers_and_pin_memory_only_for_cuda(lab):
    dataset = torch.utils.data.TensorDataset(torch.zeros(10, 3, 8, 8), torch.zeros(10, dtype=torch.long))
    assert lab.build_parser().parse_known_args([])[0].workers == min(4, os.cpu_count())
    cuda = lab.make_loader(dataset, 4, torch.device("cuda"), workers=2, shuffle=True)
    assert cuda.num_workers == 2 and cuda.persistent_workers and cuda.pin_memory and cuda.drop_last
    cpu = lab.make_loader(dataset, 4, torch.device("cpu"), workers=0)
    assert not cpu.persistent_workers and not cpu.pin_memory and not cpu.drop_last


def test_training_on_a_simulated_t4_in_fp16_reads_the_gpu_once_per_epoch():
    result = run_on_simulated_cuda(f"""
import torch, simulated_cuda
lab = load_lab({LAB!r})
cuda = torch.device("cuda")
torch.manual_seed(0)
dataset = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 2, (16,)))
train = lab.make_loader(dataset, 4, cuda, workers=0, shuffle=True, generator=torch.Generator().manual_seed(0))
val = lab.make_loader(torch.utils.data.Subset(dataset, range(4)), 4, cuda, workers=0)
model = lab.build_model({{"arch": "resnet18", "num_classes": 2}}).to(cuda, memory_format=torch.channels_last)
lab.calibrate_batch_norm(model, train, cuda, max_batches=1)
open_now = ["layer4", "head"]                        # a short backward pass: fp16 is slow on a CPU
lab.open_stages(model, open_now)
optimizer = lab.make_optimizer(model, "gradual_unfreezing", 0.01, 0.3, 1e-4)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
scaler = lab.grad_scaler(cuda, torch.float16)
assert scaler.is_enabled()
for epoch in (1, 2):
    lab.set_train_mode(model, open_now)
    accuracy, loss = lab.train_one_epoch(model, train, optimizer, scheduler, scaler, cuda, torch.float16,
                                         epoch, "gradual_unfreezing")
    lab.evaluate(model, val, cuda, torch.float16)
reads, steps = simulated_cuda.REPORT.intervals_with_read, simulated_cuda.REPORT.steps
assert 4 <= steps <= 8, steps       # 2 epochs of 4 batches; the GradScaler skips steps whose fp16 gradients overflow
# A read once per epoch shows in 1 interval between steps (epoch 1's end); a read every step in all of them.
per_step = {{line: n for line, n in reads.items() if "GradScaler" not in line and n > 1}}
assert not per_step, ("lines that read from the GPU on most steps", per_step, steps)
""")
    assert result.returncode == 0, result.stderr[-3000:]


# Reads the terminal smoke run of tests/test_smoke_all_labs.py (same worker: the lab's xdist group).
@pytest.mark.xdist_group("05_transfer_learning")
def test_smoke_run_saves_the_best_model_of_each_strategy(lab, smoke_output):
    out_dir = smoke_output(LAB)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics["strategies"]) == {"feature_extraction", "fine_tuning", "gradual_unfreezing"}
    assert metrics["precision"] == "fp32" and metrics["device"] == "cpu"
    for strategy, outcome in metrics["strategies"].items():
        assert (out_dir / f"best_{strategy}.pt").is_file()
        assert [h["open_stages"] for h in outcome["history"]][0] == (
            ["head"] if strategy != "fine_tuning" else ["stem", "layer1", "layer2", "layer3", "layer4", "head"])
    gradual = metrics["strategies"]["gradual_unfreezing"]["history"]
    assert gradual[1]["open_stages"] == ["layer4", "head"]
    assert gradual[2]["open_stages"] == ["layer2", "layer3", "layer4", "head"]
    assert (out_dir / "strategy_comparison.png").is_file() and (out_dir / "comparison.md").is_file()
    assert metrics["best_strategy"] in metrics["strategies"]
    # The drill's symptom in a clean run: the stages opened later (layer4, layer3, layer2) moved.
    assert metrics["bug"] is None and metrics["late_stages_weight_change"] > 0
    moved = metrics["strategies"]["feature_extraction"]["stage_weight_change"]
    assert moved["head"] > 0 and all(moved[stage] == 0.0 for stage in lab.STAGES[:-1])
