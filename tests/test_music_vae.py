"""Music bridge, week 4 (MusicVAE): the from-scratch pieces (reparameterisation, KL, free bits, slerp),
the representation and the corpus cache, the model's shapes, bad input, and (with -m full) the
default run's targets on the real corpus."""
import json
import math
import sys

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from conftest import assert_clean_failure, failure_of, load_lab, run_lab

LAB = "week4_transformer_vae/music_vae.py"


@pytest.fixture(scope="module")
def lab():
    return load_lab(LAB)


# %%
# Part 2: the VAE's pieces.
@pytest.mark.exercise("reparameterize")
def test_reparameterization_passes_gradients_to_mu_and_sigma(lab):
    torch.manual_seed(0)
    mu = torch.randn(4, 3, requires_grad=True)
    logvar = torch.randn(4, 3, requires_grad=True)
    z = lab.reparameterize(mu, logvar, torch.Generator().manual_seed(1))
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    z.sum().backward()
    sigma = torch.exp(0.5 * logvar.detach())
    torch.testing.assert_close(z.detach(), mu.detach() + sigma * eps)
    torch.testing.assert_close(mu.grad, torch.ones(4, 3))  # dz/dmu = 1
    torch.testing.assert_close(logvar.grad, 0.5 * sigma * eps)  # dz/dlogvar = dz/dsigma * dsigma/dlogvar


@pytest.mark.exercise("reparameterize")
def test_reparameterized_samples_have_the_right_mean_and_variance(lab):
    mu, logvar = torch.full((200_000, 2), 1.5), torch.full((200_000, 2), math.log(0.25))
    z = lab.reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    assert z.mean().item() == pytest.approx(1.5, abs=0.01)
    assert z.var().item() == pytest.approx(0.25, abs=0.005)


@pytest.mark.exercise("kl_divergence")
def test_kl_per_melody_matches_torch_distributions(lab):
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7) * 0.5
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros(5, 7), torch.ones(5, 7))).sum(-1)
    torch.testing.assert_close(lab.kl_divergence(mu, logvar), expected)
    assert lab.kl_divergence(torch.zeros(2, 4), torch.zeros(2, 4)).abs().max() == 0  # q = prior: no information


@pytest.mark.exercise("free_bits_kl")
def test_free_bits_charge_only_the_nats_above_the_allowance(lab):
    kl = torch.tensor([0.0, 3.0, 10.0, 10.5, 40.0], requires_grad=True)
    paid = lab.free_bits_kl(kl, 10.0)
    torch.testing.assert_close(paid.detach(), torch.tensor([0.0, 0.0, 0.0, 0.5, 30.0]))
    paid.sum().backward()
    torch.testing.assert_close(kl.grad, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))  # no push below the allowance
    torch.testing.assert_close(lab.free_bits_kl(kl.detach(), 0.0), kl.detach())  # no free bits: the plain KL


@pytest.mark.exercise("slerp")
def test_slerp_ends_norm_and_straight_line_fallback(lab):
    torch.manual_seed(0)
    a, b = torch.randn(16), torch.randn(16)
    b = b / b.norm() * a.norm()
    torch.testing.assert_close(lab.slerp(a, b, 0.0), a)
    torch.testing.assert_close(lab.slerp(a, b, 1.0), b)
    for t in (0.25, 0.5, 0.8):  # on the great circle: the norm stays
        assert lab.slerp(a, b, t).norm().item() == pytest.approx(a.norm().item(), rel=1e-5)
    middle = lab.slerp(a, b, 0.5)
    assert torch.dot(middle, a).item() == pytest.approx(torch.dot(middle, b).item(), rel=1e-4)  # halfway in angle
    torch.testing.assert_close(lab.slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: the straight line


# %%
# Part 1: the representation.
def test_grid_marks_note_on_hold_and_rest(lab):
    # a quarter C, an eighth rest, two eighth Ds, a note tied across: one long E
    notes = [(0.0, 60, 1.0), (1.5, 62, 0.5), (2.0, 62, 0.5), (2.5, 64, 1.5)]
    grid = lab.grid_of(notes, 16)
    assert grid == [60, 1, 1, 1, 0, 0, 62, 1, 62, 1, 64, 1, 1, 1, 1, 1]
    assert lab.grid_of([(0.0, 60, 0.0625)], 2) == [60, 0]  # shorter than a sixteenth: still one step


def test_windows_slide_by_a_bar_start_held_notes_and_skip_rests(lab):
    from collections import Counter
    skipped = Counter()
    grid = [62] + [1] * 23 + [64, 1, 1, 1] * 2 + [0] * 32  # in D: moved to C
    windows = lab.windows_of(grid, 2, skipped)
    assert len(windows) == 2 and skipped["mostly rests"] == 1  # starts 0, 16 and 32 (all rests)
    first, second = windows
    assert first[:4] == [lab.note_on(60), 1, 1, 1]
    assert second[0] == lab.note_on(60) and second[8] == lab.note_on(62)  # starts inside a held D: starts it
    assert second[16:] == [0] * 16  # exactly half rests is kept
    assert lab.windows_of([100] + [1] * 15 + [40] + [1] * 15, 0, skipped) == []
    assert skipped["a note out of range"] == 1
    assert lab.note_on(lab.PITCH_LOW) == 2 and lab.note_on(lab.PITCH_HIGH) == lab.VOCAB - 1


def test_transposition_moves_the_tonic_to_c(lab):
    for tonic in range(12):
        shift = lab.transposition_to_c(tonic, [60 + tonic, 64 + tonic])
        assert (tonic + shift) % 12 == 0 and abs(62 + tonic + shift - 66) <= 6


def test_tokens_to_events_and_density(lab):
    on = lab.note_on(67)
    tokens = [on, 1, 1, 1, 0, 0, on, 1] + [0] * 24
    assert lab.tokens_to_events(tokens) == [(67, 1.0), (0, 0.5), (67, 0.5), (0, 6.0)]
    assert lab.note_density(torch.tensor([tokens])).tolist() == [2 / 32]


def test_pitch_class_histogram_counts_note_ons(lab):
    windows = torch.tensor([[lab.note_on(60), 1, lab.note_on(67), 0], [lab.note_on(72), 1, 1, 1]])
    histogram = lab.pitch_class_histogram(windows)
    assert histogram[0] == pytest.approx(2 / 3) and histogram[7] == pytest.approx(1 / 3)
    assert lab.histogram_intersection(histogram, histogram) == pytest.approx(1.0)


def test_split_is_by_tune_and_stable(lab):
    names = [f"oneills1850/x.abc#{i}" for i in range(500)]
    splits = [lab.split_of(n) for n in names]
    assert splits == [lab.split_of(n) for n in names]
    assert 0.05 < splits.count("test") / 500 < 0.15 and 0.05 < splits.count("val") / 500 < 0.15


def test_a_real_tune_read_by_music21_starts_after_its_pickup(lab):
    music21 = lab.import_music21()
    tune = "X:1\nM:C|\nL:1/8\nK:D\nA|dfaf gfed|cABc dAFA|dfaf gfed|cABc d3A|\n"
    record = lab.folk_record("t", tune, music21)
    assert record["metre"] == "2/2" and (record["tonic"], record["mode"]) == (2, "major")
    assert record["grid"][:4] == [74, 1, 78, 1]  # the first full bar: d f (MIDI 74, 78) (the pickup A is left out)
    assert len(record["grid"]) == 4 * 16
    with pytest.raises(ValueError, match="metre"):
        lab.folk_record("jig", "X:2\nM:6/8\nL:1/8\nK:G\nGAB cBA|B2G G2D|\n", music21)


def test_duplicate_chorale_melodies_are_removed_even_when_transposed(lab):
    melody = [60, 1, 62, 1, 64, 1, 1, 1]
    records = [{"name": "bwv1", "source": "chorale", "grid": melody},
               {"name": "bwv2", "source": "chorale", "grid": [p + 2 if p >= 2 else p for p in melody]},
               {"name": "bwv3", "source": "chorale", "grid": melody[:6]},
               {"name": "folk", "source": "folk", "grid": melody}]
    kept, dropped = lab.dedupe_chorales(records)
    assert [r["name"] for r in kept] == ["bwv1", "bwv3", "folk"] and dropped == 1


# %%
# Part 1b: the corpus cache.
def fake_entries(calls):
    def loader(name):
        def load():
            calls.append(name)
            return {"name": name, "source": "folk", "tonic": 7, "mode": "major", "metre": "4/4",
                    "grid": [67, 1, 69, 1] * 8}
        return load
    return [(name, loader(name)) for name in ("a", "b", "c")]


def test_cache_is_written_then_reused(lab, tmp_path):
    calls = []
    path = tmp_path / "corpus.json"
    first = lab.build_corpus(fake_entries(calls), path, "fp", progress=False)
    again = lab.build_corpus(fake_entries(calls), path, "fp", progress=False)
    assert calls == ["a", "b", "c"] and again["records"] == first["records"]  # read back, nothing parsed


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "old version", "other settings", "bad record"])
def test_stale_or_corrupt_cache_is_rebuilt_with_a_note(lab, tmp_path, capsys, damage):
    calls = []
    path = tmp_path / "corpus.json"
    lab.build_corpus(fake_entries(calls), path, "fp", progress=False)
    capsys.readouterr()
    fingerprint, cached = "fp", json.loads(path.read_text())
    if damage == "corrupt":
        path.write_bytes(b"\x00\xffnot json")
    elif damage == "truncated":
        path.write_text(path.read_text()[:40])
    elif damage == "old version":
        path.write_text(json.dumps({**cached, "version": lab.CACHE_VERSION - 1}))
    elif damage == "other settings":
        fingerprint = "fp-other-music21"
    else:
        cached["records"][0]["grid"] = "nonsense"
        path.write_text(json.dumps(cached))
    rebuilt = lab.build_corpus(fake_entries(calls), path, fingerprint, progress=False)
    assert calls == ["a", "b", "c"] * 2, "the damaged cache was not rebuilt"
    assert len(rebuilt["records"]) == 3 and json.loads(path.read_text())["fingerprint"] == fingerprint
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and ("stale" if damage in ("old version", "other settings") else "corrupt") in notes[0]


# %%
# Part 3: the model.
def test_model_shapes_and_eval_is_deterministic(lab):
    torch.manual_seed(0)
    model = lab.MelodyVAE(lab.VAEConfig(embed_dim=8, encoder_hidden=12, decoder_hidden=16, latent_dim=4))
    tokens = torch.randint(0, lab.VOCAB, (3, lab.WINDOW_STEPS))
    logits, mu, logvar = model(tokens)
    assert logits.shape == (3, lab.WINDOW_STEPS, lab.VOCAB) and mu.shape == logvar.shape == (3, 4)
    model.eval()
    torch.testing.assert_close(model(tokens)[0], model(tokens)[0])
    generated = model.generate(mu)
    assert generated.shape == (3, lab.WINDOW_STEPS) and generated.max() < lab.VOCAB


def test_decoder_is_autoregressive(lab):
    """Teacher forcing: the logits of step t depend on the tokens before t, never on t or after."""
    torch.manual_seed(0)
    model = lab.MelodyVAE(lab.VAEConfig(embed_dim=8, encoder_hidden=12, decoder_hidden=16, latent_dim=4)).eval()
    tokens = torch.randint(0, lab.VOCAB, (1, lab.WINDOW_STEPS))
    z = torch.randn(1, 4)
    changed = tokens.clone()
    changed[0, 10] = (tokens[0, 10] + 1) % lab.VOCAB
    a, b = model.decode(z, tokens), model.decode(z, changed)
    torch.testing.assert_close(a[:, :11], b[:, :11])  # steps 0..10 see tokens 0..9 only
    assert not torch.allclose(a[:, 11:], b[:, 11:])


# %%
# The debugging drill: --bug wrong-kl-sign makes the loss reward KL, and the KL the training lines
# report climbs. Checked in-process on tiny random windows, a few dozen steps of a tiny model.
def kl_after_training(lab, bug):
    import types
    torch.manual_seed(0)
    model = lab.MelodyVAE(lab.VAEConfig(embed_dim=8, encoder_hidden=8, decoder_hidden=16, latent_dim=4))
    windows = torch.randint(0, lab.VOCAB, (64, lab.WINDOW_STEPS))
    args = types.SimpleNamespace(lr=1e-2, batch_size=32, seed=0, log_every=10)
    schedule = lab.Schedule("drill", 40, 1.0, 0, 0.0)
    history, _ = lab.train_vae(model, windows, schedule, args, torch.device("cpu"), None, show_progress=False, bug=bug)
    return history["kl"][-1]


def test_wrong_kl_sign_drill_makes_the_kl_climb(lab):
    clean, bugged = kl_after_training(lab, None), kl_after_training(lab, "wrong-kl-sign")
    assert clean < 2.0, clean  # beta = 1, no free bits: the KL is pushed towards 0
    assert bugged > 20 * max(clean, 0.5), (clean, bugged)


# %%
# Bad input: one line on stderr, a non-zero exit, nothing trained or written.
def test_music21_missing_says_how_to_install(lab, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "music21", None)  # `import music21` now raises ImportError
    result = failure_of(lab.main, ["--smoke", "--device", "cpu", "--out-dir", tmp_path / "out",
                                   "--data-dir", tmp_path / "data"])
    assert_clean_failure(result, "pip install music21")
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_interpolate_out_of_range_names_the_valid_range(lab, tmp_path):
    result = failure_of(lab.main, ["--smoke", "--device", "cpu", "--interpolate", "0", "9999",
                                   "--out-dir", tmp_path / "out", "--data-dir", tmp_path / "data"])
    assert_clean_failure(result, "--interpolate 9999", "from 0 to")
    assert not (tmp_path / "out").exists(), "nothing is trained or written before the indices are checked"


def small_checkpoint(lab, path, **changes):
    model = lab.MelodyVAE(lab.VAEConfig(embed_dim=8, encoder_hidden=12, decoder_hidden=16, latent_dim=4))
    lab.save_checkpoint(model, "annealed", torch.zeros(1, lab.WINDOW_STEPS, dtype=torch.long), path, {})
    if changes:
        saved = torch.load(path, weights_only=True)
        saved["config"].update(changes)
        torch.save(saved, path)


@pytest.mark.parametrize("problem, fragment", [
    ("missing", "does not exist"), ("garbage", "cannot be loaded"), ("another lab", "another lab"),
    ("another representation", "another representation"), ("another size", "do not fit")])
def test_bad_checkpoint_gets_one_line(lab, tmp_path, problem, fragment):
    path = tmp_path / "music_vae.pt"
    if problem == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif problem == "another lab":  # what 09_vae.py writes: a config without this lab's name
        torch.save({"model": {}, "config": {"kind": "vae", "latent_dim": 20, "hidden": 512, "num_classes": 0}}, path)
    elif problem == "another representation":
        small_checkpoint(lab, path, steps=64)
    elif problem == "another size":
        small_checkpoint(lab, path, latent_dim=5)
    result = failure_of(lab.main, ["--checkpoint", path, "--device", "cpu", "--smoke", "--out-dir", tmp_path / "out",
                                   "--data-dir", tmp_path / "data"])
    assert_clean_failure(result, "--checkpoint", fragment)
    assert not (tmp_path / "out").exists()


def test_out_of_range_flags_get_one_line(lab, tmp_path):
    for flag, value in (("--lr", "-1"), ("--free-nats", "-3"), ("--anneal-fraction", "1.5"), ("--points", "1")):
        result = failure_of(lab.main, [flag, value, "--out-dir", tmp_path / "out"])
        assert_clean_failure(result, flag)


# %%
# The real run: the targets of the issue, on music21's corpus (it ships with the package, so no
# LAB_DATA_DIR is needed; the parse cache goes to a temporary folder).
@pytest.mark.full
def test_default_run_reaches_the_targets(tmp_path):
    result = run_lab(LAB, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["teacher_forced_accuracy"] >= 0.90, metrics
    assert metrics["cross_z_drop"] >= 0.10, metrics
    assert metrics["kl_per_sequence"] >= 10.0, metrics
    assert metrics["prior_pitch_class_intersection"] >= 0.85, metrics
    assert metrics["collapsed_kl_per_sequence"] < 1.0, metrics
