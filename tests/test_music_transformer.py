"""Music bridge, week 4: relative attention by hand (Shaw's explicit tensor, Huang's skew), the chorale
representation, the corpus cache, the comparison's statistics, bad input, and the real run's target."""
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_clean_failure, failure_of, load_lab, run_lab

LAB = "week4_transformer_vae/music_transformer.py"


@pytest.fixture(scope="module")
def lab():
    return load_lab(LAB)


def brute_relative_logits(q, er):
    """Loops: out[..., i, j] = q_i . er[j - i + L - 1] for j <= i (zero above the diagonal)."""
    L = q.size(-2)
    out = torch.zeros(*q.shape[:-1], L)
    for i in range(L):
        for j in range(i + 1):
            row = er[..., j - i + L - 1, :]  # (D,) or (H, D)
            out[..., i, j] = (q[..., i, :] * row).sum(-1)
    return out


def lower(x):
    return x.masked_fill(~torch.ones(x.shape[-2:], dtype=torch.bool).tril(), 0)


# %%
# Part 1: the two ways to get relative logits, against loops and against each other.
@pytest.mark.exercise("relative_logits_explicit")
@pytest.mark.parametrize("shared", [True, False])
def test_explicit_relative_logits_match_loops(lab, shared):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 5, generator=generator)  # (B, H, L, D)
    er = torch.randn(7, 5, generator=generator) if shared else torch.randn(3, 7, 5, generator=generator)
    got = lab.relative_logits_explicit(q, er)
    assert got.shape == (2, 3, 7, 7)
    torch.testing.assert_close(lower(got), brute_relative_logits(q, er), rtol=1e-5, atol=1e-5)


@pytest.mark.exercise("skew")
@pytest.mark.parametrize("L", [1, 2, 5, 9])
def test_skew_moves_each_distance_under_its_key(lab, L):
    rel = torch.randn(2, 3, L, L)  # column r: distance r - (L - 1)
    out = lab.skew(rel)
    assert out.shape == rel.shape
    for i in range(L):
        for j in range(i + 1):
            assert torch.equal(out[..., i, j], rel[..., i, j - i + L - 1])


@pytest.mark.exercise("skew")
def test_skewed_relative_logits_match_loops(lab):
    generator = torch.Generator().manual_seed(1)
    q, er = torch.randn(2, 4, 11, 8, generator=generator), torch.randn(4, 11, 8, generator=generator)
    torch.testing.assert_close(lower(lab.relative_logits_skewed(q, er)), brute_relative_logits(q, er),
                               rtol=1e-5, atol=1e-5)


def test_skewed_attention_equals_explicit_and_zero_embeddings_give_plain_attention(lab):
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=generator) for _ in range(3))
    er = torch.randn(4, 16, 8, generator=generator)
    explicit, w_explicit = lab.relative_attention(q, k, v, er, explicit=True)
    skewed, w_skewed = lab.relative_attention(q, k, v, er)
    torch.testing.assert_close(skewed, explicit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_skewed, w_explicit, rtol=1e-5, atol=1e-5)
    for explicit_path in (True, False):
        plain, _ = lab.relative_attention(q, k, v, torch.zeros_like(er), explicit=explicit_path)
        torch.testing.assert_close(plain, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)
    assert all(value < 1e-4 for value in lab.check_relative_attention(0).values())


def test_causal_masking_holds(lab):
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=generator) for _ in range(3))
    er = torch.randn(2, 12, 8, generator=generator)
    before, weights = lab.relative_attention(q, k, v, er)
    assert torch.all(weights.triu(1) == 0)
    k2, v2 = k.clone(), v.clone()
    k2[..., 7:, :] += 5.0
    v2[..., 7:, :] -= 3.0
    after, _ = lab.relative_attention(q, k2, v2, er)
    torch.testing.assert_close(after[..., :7, :], before[..., :7, :])
    assert not torch.allclose(after[..., 7:, :], before[..., 7:, :])


@pytest.mark.parametrize("attention", ["relative", "absolute"])
def test_model_fast_path_equals_the_hand_built_one_and_never_looks_ahead(lab, attention):
    torch.manual_seed(0)
    model = lab.MusicTransformer(lab.MusicConfig(max_len=24, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                                                 attention=attention)).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # break the zero biases of the initialisation
            parameter.add_(0.05 * torch.randn_like(parameter))
        tokens = torch.randint(0, lab.VOCAB_SIZE, (2, 24))
        fast, by_hand = model(tokens), model(tokens, by_hand=True)
        changed = tokens.clone()
        changed[:, 13:] = (changed[:, 13:] + 7) % lab.VOCAB_SIZE
        later = model(changed)
    torch.testing.assert_close(fast, by_hand, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(later[:, :13], fast[:, :13], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(later[:, 13:], fast[:, 13:])


def test_the_drill_shows_in_relative_logits_error(lab):
    """--bug skew-last-row: the run does not crash, but the fast path's relative logits leave Shaw's."""
    config = lab.MusicConfig(max_len=24, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    torch.manual_seed(0)
    clean = lab.MusicTransformer(config)
    torch.manual_seed(0)
    bugged = lab.MusicTransformer(config, bug="skew-last-row")
    with torch.no_grad():
        for model in (clean, bugged):
            model.blocks[0].attn.er.normal_(generator=torch.Generator().manual_seed(1))
        tokens = torch.randint(0, lab.VOCAB_SIZE, (2, 24))
        assert bugged(tokens).shape == clean(tokens).shape  # nothing crashes
    assert lab.relative_logits_error(clean) < 1e-5
    assert lab.relative_logits_error(bugged) > 0.1
    absolute = lab.MusicTransformer(lab.MusicConfig(max_len=24, n_layer=1, n_head=2, n_embd=16, attention="absolute"))
    assert lab.relative_logits_error(absolute) == 0.0


# %%
# Part 2: representation, corpus, batches.
def test_tokens_round_trip_and_transposition_keeps_rests(lab):
    steps = [[72, 67, 64, 48], [72, 0, 62, 47], [lab.PITCH_HIGH, 65, 60, lab.PITCH_LOW]]
    tokens = lab.grid_tokens(steps)
    assert len(tokens) == 12 and tokens[5] == lab.REST and lab.tokens_grid(tokens) == steps
    moved = lab.transpose_tokens(torch.tensor([lab.BOS] + tokens[:8]), 2).tolist()
    assert moved[0] == lab.BOS and moved[6] == lab.REST
    assert lab.tokens_grid(moved[1:]) == [[p + 2 if p else 0 for p in s] for s in steps[:2]]
    with pytest.raises(ValueError):
        lab.pitch_token(lab.PITCH_HIGH + 1)


def small_score(music21, parts=4):
    score = music21.stream.Score()
    for voice in range(parts):
        part = music21.stream.Part()
        part.append(music21.meter.TimeSignature("3/4"))
        first = music21.note.Note(72 - 5 * voice, quarterLength=1.0)
        first.tie = music21.tie.Tie("start")
        second = music21.note.Note(72 - 5 * voice, quarterLength=0.5)
        second.tie = music21.tie.Tie("stop")
        part.append([first, second, music21.note.Rest(quarterLength=0.25), music21.note.Note(60 - voice, quarterLength=0.25)])
        score.insert(0, part)
    return score


def test_chorale_record_samples_the_grid(lab):
    music21 = lab.import_music21()
    record = lab.chorale_record("tiny", small_score(music21))
    assert record["bar_steps"] == 12 and record["pickup_steps"] == 0
    assert len(record["steps"]) == 8
    assert [s[0] for s in record["steps"]] == [72] * 6 + [0, 60]  # a tied note holds, then a rest
    assert record["steps"][7] == [60, 59, 58, 57]
    with pytest.raises(ValueError, match="parts"):
        lab.chorale_record("two parts", small_score(music21, parts=2))


def test_repeated_soprano_lines_are_removed_even_when_transposed(lab):
    a = [[60, 55, 52, 48], [62, 55, 50, 47], [64, 55, 48, 48]]
    b = [[p + 3 for p in s] for s in a]  # the same tune in another key, harmonised the same
    c = [[60, 57, 53, 41], [62, 57, 53, 41], [62, 57, 53, 41]]  # another soprano rhythm
    records = [{"name": n, "steps": s} for n, s in (("a", a), ("b", b), ("c", c))]
    kept, dropped = lab.dedupe_chorales(records)
    assert [r["name"] for r in kept] == ["a", "c"] and dropped == 1


def test_sampler_gives_the_same_batches_for_the_same_seed_on_step_boundaries(lab):
    chorales = [[[60 + t % 5, 55, 50, 40] for t in range(n)] for n in (12, 20, 9)]
    first, second = lab.WindowSampler(chorales, 8, seed=5), lab.WindowSampler(chorales, 8, seed=5)
    for _ in range(3):
        x1, y1 = first.batch(6)
        x2, y2 = second.batch(6)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == y1.shape == (6, 32)
    assert torch.all(x1[:, 0] == lab.BOS) and torch.equal(x1[:, 1:], y1[:, :-1])
    bass = torch.tensor([[lab.token_pitch(t) for t in row] for row in y1[:, 3::4].tolist()])
    soprano = torch.tensor([[lab.token_pitch(t) for t in row] for row in y1[:, 0::4].tolist()])
    assert torch.all(soprano - bass >= 20), "a window starts on a step: soprano first, bass fourth"
    first.generator.manual_seed(5)
    assert torch.equal(first.batch(6)[0], lab.WindowSampler(chorales, 8, seed=5).batch(6)[0])


def test_evaluation_windows_cover_every_token_once(lab):
    chorales = [[[60, 55, 50, 40]] * 10, [[62, 57, 53, 41]] * 3]
    inputs, targets, owner = lab.evaluation_windows(chorales, 4)
    assert inputs.shape == (4, 16) and owner.tolist() == [0, 0, 0, 1]
    assert int((targets != -100).sum()) == 4 * 13
    assert torch.all(inputs[:, 0] == lab.BOS)


def test_context_window_starts_on_a_step(lab):
    tokens = list(range(2, 2 + 41))  # 10 steps and one voice of the next
    window = lab.context_window(tokens, 16)
    assert window[0] == lab.BOS and len(window) <= 16 and (len(tokens) - (len(window) - 1)) % 4 == 0
    assert lab.context_window(tokens[:8], 16) == [lab.BOS] + tokens[:8]


def test_bootstrap_interval(lab):
    tokens = torch.full((30,), 100.0)
    same = torch.rand(30) * 100 + 200
    result = lab.bootstrap_difference(same, same, tokens)
    assert result["difference"]["value"] == 0 and result["difference"]["ci95"] == [0.0, 0.0]
    better = lab.bootstrap_difference(same + 10 + torch.rand(30), same, tokens)
    low, high = better["difference"]["ci95"]
    assert 0.1 < low <= better["difference"]["value"] <= high < 0.12
    assert better["a"]["value"] == pytest.approx(float((same + 10).sum() / 3000), abs=0.02)


# %%
# The corpus cache: written once, reused, rebuilt (with a note) when stale or corrupt.
def fake_entries(calls, broken=()):
    def loader(name):
        def load():
            calls.append(name)
            if name in broken:
                raise ValueError("3 parts, not 4")
            return {"name": name, "steps": [[72, 67, 64, 48]] * 4, "bar_steps": 16, "pickup_steps": 0}
        return load
    return [(name, loader(name)) for name in ("a", "b", "c")]


def test_cache_is_written_then_reused_and_skips_are_counted(lab, tmp_path):
    calls = []
    path = tmp_path / "chorales.json"
    first = lab.build_corpus(fake_entries(calls, broken={"b"}), path, "fp", progress=False)
    assert [r["name"] for r in first["records"]] == ["a", "c"] and calls == ["a", "b", "c"]
    assert first["skipped"] == [["b", "ValueError: 3 parts, not 4"]]
    again = lab.build_corpus(fake_entries(calls), path, "fp", progress=False)
    assert calls == ["a", "b", "c"] and again["records"] == first["records"]


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "old version", "other music21", "bad record"])
def test_stale_or_corrupt_cache_is_rebuilt_with_a_note(lab, tmp_path, capsys, damage):
    calls = []
    path = tmp_path / "chorales.json"
    lab.build_corpus(fake_entries(calls), path, "fp", progress=False)
    capsys.readouterr()
    fingerprint, cached = "fp", json.loads(path.read_text())
    if damage == "corrupt":
        path.write_bytes(b"\x00\xffnot json")
    elif damage == "truncated":
        path.write_text(path.read_text()[:40])
    elif damage == "old version":
        path.write_text(json.dumps({**cached, "version": lab.CACHE_VERSION - 1}))
    elif damage == "other music21":
        fingerprint = "music21-0.0"
    else:
        cached["records"][0]["steps"] = [[60, 55]]
        path.write_text(json.dumps(cached))
    rebuilt = lab.build_corpus(fake_entries(calls), path, fingerprint, progress=False)
    assert calls == ["a", "b", "c"] * 2, "the damaged cache was not rebuilt"
    assert len(rebuilt["records"]) == 3 and json.loads(path.read_text())["fingerprint"] == fingerprint
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    expected = "stale" if damage in ("old version", "other music21") else "corrupt"
    assert len(notes) == 1 and expected in notes[0], notes


# %%
# Bad input: one line on stderr, exit 1, nothing written.
def test_music21_missing_says_how_to_install(lab, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "music21", None)  # `import music21` now raises ImportError
    result = failure_of(lab.main, ["--smoke", "--device", "cpu", "--out-dir", tmp_path / "out",
                                   "--data-dir", tmp_path / "data"])
    assert_clean_failure(result, "pip install music21")
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"), (b"\x00\x01\x02 not music at all", "cannot be read as music"),
    (b"X:1\nT:words only\n", "--prime")])
def test_a_prime_that_is_not_music_gets_one_line(lab, tmp_path, content, fragment):
    prime = tmp_path / "mine.abc"
    if content is not None:
        prime.write_bytes(content)
    result = failure_of(lab.main, ["--smoke", "--device", "cpu", "--prime", prime, "--out-dir", tmp_path / "out",
                                   "--data-dir", tmp_path / "data"])
    assert_clean_failure(result, "--prime", fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def tiny_model(lab, attention):
    torch.manual_seed(0)
    return lab.MusicTransformer(lab.MusicConfig(max_len=32, n_layer=1, n_head=2, n_embd=16, attention=attention))


def test_a_checkpoint_of_another_model_or_lab_gets_one_line(lab, tmp_path):
    absolute = tmp_path / "absolute.pt"
    lab.save_checkpoint(tiny_model(lab, "absolute"), {}, torch.tensor([[0, 30, 25, 20, 10]]), absolute)
    other_lab = tmp_path / "model.pt"
    torch.save({"model": {}, "config": {"vocab_size": 65, "block_size": 64}, "vocab": "ab"}, other_lab)
    corrupt = tmp_path / "broken.pt"
    corrupt.write_bytes(b"not a checkpoint")
    for path, args, fragments in ((absolute, [], ("absolute model", "--model absolute")),
                                  (other_lab, [], ("not a music_transformer model",)),
                                  (corrupt, [], ("cannot be loaded",)),
                                  (tmp_path / "missing.pt", ["--model", "absolute"], ("does not exist",))):
        result = failure_of(lab.main, ["--generate-only", path, *args, "--device", "cpu", "--out-dir", tmp_path / "out"])
        assert_clean_failure(result, *fragments)
        assert not (tmp_path / "out").exists()


def test_out_of_range_flags_get_one_line(lab, tmp_path):
    for flags, fragment in ((["--lr", "-1"], "--lr"), (["--dropout", "1.5"], "--dropout"),
                            (["--train-seconds", "0"], "--train-seconds"), (["--window-steps", "0"], "--window-steps"),
                            (["--n-embd", "30", "--n-head", "4"], "--n-head"), (["--head", "4"], "--head")):
        result = failure_of(lab.main, [*flags, "--device", "cpu", "--out-dir", tmp_path / "out"])
        assert_clean_failure(result, fragment)
        assert not (tmp_path / "out").exists()


def test_generate_only_continues_your_prime(lab, tmp_path):
    path = tmp_path / "relative.pt"
    lab.save_checkpoint(tiny_model(lab, "relative"), {}, torch.tensor([[0, 30, 25, 20, 10]]), path)
    prime = tmp_path / "mine.abc"
    prime.write_text("X:1\nM:4/4\nL:1/4\nK:C\nC D E F|G A B c|\n")
    result = failure_of(lab.main, ["--generate-only", path, "--prime", prime, "--generate-steps", "4",
                                   "--device", "cpu", "--out-dir", tmp_path / "out"])
    assert result.returncode == 0, result.stderr
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"piano_roll.png", "chorale_01.mid", "chorale_01.wav", "chorale_02.wav"} <= written


@pytest.mark.parametrize("method", ["explicit", "skewed"])
def test_the_benchmark_program_measures_one_call(lab, monkeypatch, capsys, method):
    """What --benchmark-attention runs in each fresh process, run here (in-process: no torch import)."""
    monkeypatch.setattr(sys, "argv", ["-c", "48", method, "1"])
    exec(compile(lab.benchmark_code(), "benchmark", "exec"), {"__name__": "benchmark"})
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["seconds"] > 0 and row["extra_peak_mib"] >= 0


# %%
# The real run: the targets of the issue, on music21's chorales (they ship with the package, so no
# LAB_DATA_DIR is needed; the parse cache goes to a temporary folder).
@pytest.mark.full
def test_default_run_reaches_the_targets(tmp_path):
    result = run_lab(LAB, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert math.isfinite(metrics["val_loss"])
    assert metrics["test_nll_relative"] < metrics["test_nll_absolute"], metrics
    assert metrics["test_nll_difference_ci95"][0] > 0, metrics["test_nll_difference_ci95"]
