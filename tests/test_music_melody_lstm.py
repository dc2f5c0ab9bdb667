"""Music bridge, week 3: the from-scratch pieces (n-grams, validity checker, tonic-relative histogram),
the representation, the corpus cache, bad input, and the real run's targets."""
import json
import math
import sys

import pytest
import torch

from conftest import assert_clean_failure, failure_of, load_lab, run_lab

LAB = "week3_rnn/music_melody_lstm.py"

VALID_WITH_PICKUP_AND_ENDINGS = """X:1
M:6/8
L:1/8
K:G
D|:GAB cBA|B2G G2D|GAB cBA|1 B2G G2D:|2 B2G G2z||
|:d|gfe dcB|A3 A2d|gfe dcB|(3ABA G G2:|
"""


@pytest.fixture(scope="module")
def lab():
    return load_lab(LAB)


# %%
# Part 2: n-grams with Witten-Bell smoothing.
def small_ngram(lab, order):
    sequences = [[lab.BOS, 2, 3, 4, 2, 3, lab.EOS], [lab.BOS, 2, 3, 5, lab.EOS], [lab.BOS, 4, 4, 2, lab.EOS]]
    return lab.NGramModel(order, 8).fit(sequences)


@pytest.mark.exercise("ngram_prob")
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("context", [[0], [0, 2], [0, 2, 3], [2, 3, 4], [7, 7, 7], [6], []])
def test_ngram_probabilities_sum_to_one(lab, order, context):
    model = small_ngram(lab, order)
    probabilities = [model.prob(context, token) for token in range(8)]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-12)
    assert min(probabilities) > 0  # smoothing: nothing is impossible, not even a token never seen


@pytest.mark.exercise("ngram_prob")
def test_unigram_is_add_one(lab):
    model = small_ngram(lab, 1)
    tokens = 6 + 4 + 4  # every token after BOS
    assert model.prob([], 2) == pytest.approx((4 + 1) / (tokens + 8))
    assert model.prob([], 7) == pytest.approx(1 / (tokens + 8))


@pytest.mark.exercise("ngram_prob")
def test_unseen_context_falls_back_to_the_lower_order(lab):
    bigram, unigram = small_ngram(lab, 2), small_ngram(lab, 1)
    for token in range(8):
        assert bigram.prob([7], token) == pytest.approx(unigram.prob([], token))  # 7 never seen as a context


@pytest.mark.exercise("ngram_prob")
def test_witten_bell_trusts_a_deterministic_context(lab):
    bigram, unigram = small_ngram(lab, 2), small_ngram(lab, 1)
    # after 2 come 3, 3, 3 and EOS: 4 counts of 2 types, so Witten-Bell gives the unigram weight 2 / (4 + 2)
    assert bigram.prob([2], 3) == pytest.approx((3 + 2 * unigram.prob([], 3)) / (4 + 2))
    assert bigram.prob([2], 3) > unigram.prob([], 3)
    assert bigram.nll([[lab.BOS, 2, 3, lab.EOS]]) < unigram.nll([[lab.BOS, 2, 3, lab.EOS]])


def test_bigram_accuracy_on_a_predictable_progression(lab):
    sequences = [[lab.BOS, 3, 4, 5, lab.EOS]] * 5
    model = lab.NGramModel(2, 6).fit(sequences)
    assert model.most_likely([3]) == 4
    assert lab.bigram_accuracy(model, sequences) == pytest.approx(1.0)


# %%
# Part 1: representation.
def test_event_tokens_round_trip(lab):
    for pitch in (0, lab.PITCH_LOW, 67, lab.PITCH_HIGH):
        for quarters in lab.DURATIONS:
            assert lab.token_event(lab.event_token(pitch, quarters)) == (pitch, quarters)
    assert lab.token_event(lab.event_token(67, 0.74)) == (67, 0.75)  # snapped to the nearest duration
    assert max(lab.event_token(p, q) for p in (0, lab.PITCH_HIGH) for q in lab.DURATIONS) == lab.EVENT_TOKENS - 1
    with pytest.raises(ValueError):
        lab.event_token(lab.PITCH_HIGH + 1, 1.0)


def test_transposition_moves_pitches_and_keeps_rests_and_rhythm(lab):
    melody = [(60, 1.0), (0, 0.5), (64, 0.5), (67, 2.0)]
    up = lab.transpose(melody, 5)
    assert up == [(65, 1.0), (0, 0.5), (69, 0.5), (72, 2.0)]
    assert lab.transpose(melody, lab.PITCH_HIGH - 66) is None  # would leave the pitch range
    versions = lab.augment([(melody, 0, "major")])
    assert len(versions) == 12 and (melody, 0, "major") in versions
    intervals = lambda m: [b[0] - a[0] for a, b in zip(m, m[1:]) if a[0] and b[0]]  # noqa: E731
    assert all(intervals(v) == intervals(melody) for v, _, _ in versions)
    assert len({v[0][0] % 12 for v, _, _ in versions}) == 12  # all 12 keys
    assert all((v[0][0] - tonic) % 12 == 0 and mode == "major" for v, tonic, mode in versions), "the key moves along"


def test_a_melody_starts_with_its_key_token(lab):
    keys = {lab.key_token(tonic, mode) for tonic in range(12) for mode in lab.MODES}
    assert keys == set(lab.KEY_TOKENS) and min(keys) == lab.EVENT_TOKENS and max(keys) == lab.MELODY_VOCAB - 1
    assert lab.key_token(14, "dorian") == lab.key_token(2, "dorian")  # a pitch class, whatever the octave
    tokens = lab.encode_melody([(62, 1.0), (0, 0.5)], 2, "dorian")
    assert tokens == [lab.key_token(2, "dorian"), lab.event_token(62, 1.0), lab.event_token(0, 0.5), lab.EOS]


def test_split_is_by_tune_and_stable(lab):
    names = [f"oneills1850/x.abc#{i}" for i in range(500)]
    splits = [lab.split_of(n) for n in names]
    assert splits == [lab.split_of(n) for n in names]
    assert 0.05 < splits.count("test") / 500 < 0.15 and 0.05 < splits.count("val") / 500 < 0.15


def test_normalise_abc_keeps_the_music_and_drops_the_rest(lab):
    raw = 'X: 7\nT: A title\nM: 6/8\nL: 1/8\nK:G\n"G"(3ABc ~d2{e}d .B|(GA)B !trill!c3|\\\nP:B\nd3 B3|]\n'
    text = lab.normalise_abc(raw)
    assert text == "M:6/8\nL:1/8\nK:G\n(3ABcd2dB|GABc3|d3B3|]\n"  # the tuplet stays; slurs, layout and ornaments go
    assert lab.normalise_abc(raw.replace("M: 6/8", "M:C|")).startswith("M:2/2\n")  # C| is cut time, 2/2
    assert lab.normalise_abc(raw.replace("M: 6/8", "M:C")).startswith("M:4/4\n")
    assert lab.normalise_abc(raw.replace("M: 6/8", "M:12/8")) is None  # not one of the common metres
    assert lab.normalise_abc(raw.replace("L: 1/8", "L:1/16")) is None
    assert lab.normalise_abc(raw.replace("P:B", "K:D")) is None  # the key changes half-way
    assert lab.normalise_abc(raw.replace("d3 B3", "[M:3/4]d3 B3")) is None
    assert lab.normalise_abc(raw.replace("d3 B3", "[dB]3 B3")) is None  # a chord: these tunes are one melody
    assert lab.normalise_abc(raw.replace("d3 B3", "+dB+3 B3")) is None  # a chord in old ABC
    # Layout in other books: backquotes between beamed notes, y spacers, ! as a line break (old ABC),
    # letters H-W and h-w as ornaments. A ! that ends a line is not the start of a !decoration!.
    layout = raw.replace("d3 B3", "d`B`y B3").replace("!trill!c3|", "!trill!c3|!").replace("|]", "kB3 R|]")
    assert lab.normalise_abc(layout) == "M:6/8\nL:1/8\nK:G\n(3ABcd2dB|GABc3|dBB3B3|]\n"


def test_normalised_real_tunes_sound_the_same(lab):
    """Layout is not music: music21 reads the same notes and bars from a tune before and after."""
    music21 = pytest.importorskip("music21")
    raw = "X:1\nM:C|\nL:1/8\nK:D\nA|dfaf gfed|cABc dAFA|\ndfaf gfed|1 cABc d3A:|2 cABc d2||\n"
    def notes(text):
        score = music21.converter.parse(text, format="abc")
        return [(n.pitch.midi, float(n.quarterLength), float(n.getOffsetInHierarchy(score))) for n in score.recurse().notes]
    assert notes(raw) == notes("X:1\n" + lab.normalise_abc(raw))
    assert lab.parse_key_field("Gm") == (7, "minor")
    assert lab.parse_key_field("ADor") == (9, "dorian")
    assert lab.parse_key_field("Bb") == (10, "major")
    assert lab.parse_key_field("Hx") is None


def test_chord_labels(lab):
    assert lab.chord_label([48, 64, 67, 72], tonic=0) == "I"
    assert lab.chord_label([43, 59, 65, 67], tonic=0) == "V7"
    assert lab.chord_label([45, 60, 64, 69], tonic=0) == "vi"
    assert lab.chord_label([47, 62, 65], tonic=0) == "viio"
    assert lab.chord_label([55, 71, 74], tonic=7) == "I"  # G major in G
    assert lab.chord_label([60], tonic=0) == "N"


# %%
# Part 6: the tonic-relative histogram (an exact property) and the statistics.
@pytest.mark.exercise("tonic_relative_histogram")
def test_tonic_relative_histogram_is_invariant_under_transposition(lab):
    melody = [(62, 1.0), (66, 0.5), (0, 0.5), (69, 1.0), (74, 2.0), (73, 0.5), (71, 0.5)]
    original = lab.tonic_relative_histogram([(melody, 2)])
    for shift in range(-5, 7):
        moved = lab.transpose(melody, shift)
        assert lab.tonic_relative_histogram([(moved, (2 + shift) % 12)]) == original
    assert sum(original) == pytest.approx(1.0)
    assert original[0] == pytest.approx(2 / 6)  # two D's out of six notes, the rest ignored
    assert lab.histogram_intersection(original, original) == pytest.approx(1.0)


def test_music_statistics_of_a_scale(lab):
    scale = [(60 + step, 1.0) for step in (0, 2, 4, 5, 7, 9, 11, 12)]
    reference = {"pitch_classes": lab.tonic_relative_histogram([(scale, 0)]),
                 "durations": lab.duration_histogram([(scale, 0)])}
    stats = lab.music_statistics([(scale, 0)], reference, ["major"])
    assert stats["in_key_ratio"] == 1.0 and stats["mean_range_semitones"] == 12
    assert stats["pitch_class_intersection"] == pytest.approx(1.0)
    chromatic = [(60 + i, 1.0) for i in range(12)]
    assert lab.music_statistics([(chromatic, 0)], reference, ["major"])["in_key_ratio"] == pytest.approx(7 / 12)


# %%
# Part 4: the validity checker on hand-written tunes.
@pytest.mark.exercise("abc_validity")
def test_validity_accepts_pickups_and_repeat_endings(lab):
    assert lab.abc_validity(VALID_WITH_PICKUP_AND_ENDINGS) == (True, "valid")
    no_x = VALID_WITH_PICKUP_AND_ENDINGS.split("\n", 1)[1]  # generated tunes start at M:
    assert lab.abc_validity(no_x)[0]
    reel = "M:C|\nL:1/8\nK:D\nA|dfaf gfed|cABc dAFA|dfaf gfed|1 cABc d3A:|2 cABc d2||\n"
    assert lab.abc_validity(reel)[0]


@pytest.mark.exercise("abc_validity")
@pytest.mark.parametrize("tune, reason", [
    ("M:6/8\nL:1/8\nK:G\nGAB cBA|B2G G2DD|GAB cBA|B2G G3|]\n", "lasts"),  # a bar too long
    ("M:6/8\nL:1/8\nK:G\nGAB cBA|B2G G|GAB cBA|B2G G3|]\n", "lasts"),  # a short bar mid-tune
    ("L:1/8\nK:G\nGAB cBA|B2G G2D|]\n", "metre"),
    ("M:6/8\nL:1/8\nGAB cBA|B2G G2D|]\n", "key"),
    ("M:6/8\nL:1/8\nK:G\nGAB cBA|]\n", "two bars"),
])
def test_validity_refuses_broken_tunes(lab, tune, reason):
    valid, why = lab.abc_validity(tune)
    assert not valid and reason in why, why


def test_bars_add_up_agrees_with_the_validity_checker(lab):
    """The training-set filter asks what abc_validity asks about bars, by the bar clock alone."""
    good = [VALID_WITH_PICKUP_AND_ENDINGS, "M:C|\nL:1/8\nK:D\nA|dfaf gfed|cABc dAFA|dfaf gfed|1 cABc d3A:|2 cABc d2||\n",
            "M:3/4\nL:1/8\nK:G\nG>AB2(3cBA|G6|G>AB2(3cBA|G6|]\n"]  # a broken rhythm and a triplet fill their bars
    bad = ["M:6/8\nL:1/8\nK:G\nGAB cBA|B2G G2DD|GAB cBA|B2G G3|]\n",  # a bar too long
           "M:6/8\nL:1/8\nK:G\nGAB cBA|B2G G|GAB cBA|B2G G3|]\n",  # a short bar mid-tune
           "M:6/8\nL:1/8\nK:G\nGAB cBA|B2G G2D|GAB cBA|B2G G3 A|]\n"]  # the last bar too long
    for tune in good + bad:
        text = lab.normalise_abc("X:1\n" + tune)
        assert lab.bars_add_up(text) == (tune in good) == lab.abc_validity(text)[0], tune


def test_score_abc_reports_the_share(lab, tmp_path, capsys):
    path = tmp_path / "tunes.txt"
    path.write_text(VALID_WITH_PICKUP_AND_ENDINGS + "\n" + "X:2\nM:6/8\nL:1/8\nK:G\nGAB cBA|B2G G|GAB cBA|B2G G3|]\n")
    lab.main(["--score-abc", str(path), "--device", "cpu", "--out-dir", str(tmp_path / "out")])
    assert "1 of 2 tunes are valid" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_split_abc_tunes_by_x_or_blank_lines(lab):
    assert len(lab.split_abc_tunes("X:1\nM:2/4\nK:G\nAB|\nX:2\nM:2/4\nK:G\ncd|\n")) == 2
    assert len(lab.split_abc_tunes("M:2/4\nK:G\nAB|\n\nM:2/4\nK:G\ncd|\n\n\n")) == 2


# %%
# Part 1c: ABC tokens (folk-rnn's representation) and the position in the bar.
REAL_LOOKING_ABC = [
    VALID_WITH_PICKUP_AND_ENDINGS,
    "M:2/2\nL:1/8\nK:ADor\nA,B,|:^c2=c'B,/2C/2 D3/2E/4F/4G//A//|[1 [G3B3]z>A B<c(3def|]\n",
    "M:9/8\nL:1/8\nK:Gm\n_B3 =B2^^c __d3::g/a/b/ c'2 x Z|2 d6- d3|]",
    "M:C|\nL:1/8\nK:D\nA|dfaf gfed|cABc dAFA|\\\ndfaf gfed|1 cABc d3A:|2 cABc d2||\n% a comment\n",
]


def test_abc_tokens_round_trip_and_read_as_a_musician_reads(lab):
    generator = torch.Generator().manual_seed(0)  # the --smoke run's tunes (smoke_entries)
    smoke_tunes = [lab.generated_abc_tune(i, generator) for i in range(10)]
    texts = [lab.normalise_abc(t) for t in smoke_tunes] + [lab.normalise_abc(t) for t in REAL_LOOKING_ABC[::3]]
    assert all(texts)
    assert lab.normalise_abc(REAL_LOOKING_ABC[1]) is None  # it plays a chord, [G3B3]
    for text in texts + REAL_LOOKING_ABC + ["", "weird ¬ text {with} @ anything\n\n"]:
        assert "".join(lab.abc_tokens(text)) == text  # nothing is lost
    tokens = lab.abc_tokens("M:6/8\nL:1/8\nK:ADor\n(3^cB,c'2A>B3/2z/|:G//A|1[GB]2:|2d::e|]\n")
    assert tokens == ["M:6/8", "\n", "L:1/8", "\n", "K:ADor", "\n", "(3", "^c", "B,", "c'", "2", "A", ">", "B", "3/2",
                      "z", "/", "|:", "G", "//", "A", "|1", "[", "G", "B", "]", "2", ":|2", "d", "::", "e", "|]", "\n"]


def test_bar_clock_counts_every_bar_of_a_tune(lab):
    """Before each bar line the clock says the bar is exactly full (6 eighths in 6/8): durations,
    broken rhythms and tuplets all count; a bar line starts a new bar of 6."""
    tune = "M:6/8\nL:1/8\nK:G\nD|:GAB cBA|B2G G2D|A>B c/2d/2 (3efg a|G3-G z2|1 B<GA G2D:|2 B2G G2z||\n"
    tokens = lab.abc_tokens(tune.replace(" ", ""))
    positions = lab.bar_positions(tokens)
    full, six_left, five_left = 1, 1 + 4 * 6, 1 + 4 * 5
    before_bars = [positions[i - 1] for i, t in enumerate(tokens) if t in lab.BAR_LINES]
    assert before_bars == [five_left] + [full] * 6  # the pick-up D is one eighth of six
    assert all(positions[i] == six_left for i, t in enumerate(tokens) if t in lab.BAR_LINES)
    assert positions[:7] == [six_left] * 6 + [five_left]  # the header takes no time
    overfull = lab.bar_positions(lab.abc_tokens("M:2/4\nL:1/8\nK:G\nABcde|"))
    assert overfull[-3:] == [full, 0, six_left - 8]  # 5 eighths in a bar of 4: bucket 0 says so
    clock = lab.BarClock()
    assert [clock.read(t) for t in ["M:6/8", "A", ">", "B", "(3", "c", "d", "e"]] == pytest.approx(
        [6, 5, 4.5, 4, 4, 4 - 2 / 3, 4 - 4 / 3, 2])
    clock = lab.BarClock()
    assert [clock.read(t) for t in ["M:3/4", "L:1/16", "A", "4", "/2", "|", "2"]] == pytest.approx(
        [6, 12, 11, 8, 10, 12, 12])  # L:1/16: a bar of 3/4 is 12 units; a duration with no note takes none


def test_generation_feeds_the_model_the_position_of_what_it_drew(lab):
    """The position a generated token is read with is the one bar_positions gives for the same
    tokens in training: the model is never shown a position the data would not give it."""
    vocabulary = ["<s>", "<unk>", "\n", "|", "A", "c", "2", ">", "(3", "/2", "M:6/8", "L:1/8", "K:G"]
    torch.manual_seed(0)
    model = lab.SequenceModel(lab.SeqConfig(vocab_size=len(vocabulary), embed_dim=8, hidden_size=16,
                                            position_buckets=lab.POSITION_BUCKETS))
    calls = []
    forward = model.forward
    def recording(tokens, state=None, positions=None):
        calls.append((tokens.clone(), positions.clone()))
        return forward(tokens, state, positions)
    model.forward = recording
    header = "M:6/8\nL:1/8\nK:G\n"
    with lab.cpu_threads(1):  # one thread, as the lab runs: tiny LSTM steps on 2 busy threads wait at barriers
        tunes = lab.sample_tunes(model, vocabulary, [header, header], 12, torch.device("cpu"),
                                 torch.Generator().manual_seed(0))
    assert all(t.startswith(header) and t.endswith("\n") for t in tunes)
    for row in range(2):
        drawn = [vocabulary[int(tokens[row, 0])] for tokens, _ in calls[2:]]
        fed = [int(positions[row, 0]) for _, positions in calls[2:]]
        assert fed == lab.bar_positions(lab.abc_tokens(header) + drawn)[-len(drawn):]
        _, header_positions = calls[row]
        assert header_positions[0].tolist() == [0] + lab.bar_positions(lab.abc_tokens(header))


def test_training_logs_what_it_reads_to_tensorboard(lab, tmp_path):
    """Each network's training loss, as read at the log lines (the last, shorter interval too), and
    its learning rate go to TensorBoard under the network's name."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = lab.SequenceModel(lab.SeqConfig(vocab_size=20, embed_dim=8, hidden_size=16))
    stream = torch.randint(2, 20, (400,))
    tunes = [([0] + torch.randint(2, 20, (12,)).tolist(), [0] * 13) for _ in range(6)]
    writer = SummaryWriter(tmp_path / "tensorboard")
    with lab.cpu_threads(1):
        melody, *_ = lab.train_tbptt(model, stream, lab.TrainPlan("melody LSTM", 5, 0, 4, 8, 1e-2, 2), cpu, None,
                                     writer)
        lab.train_whole_tunes(model, tunes, lab.TrainPlan("ABC LSTM", 4, 0, 3, 0, 1e-2, 2), cpu, None,
                              torch.Generator().manual_seed(0), writer)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps == {"melody_lstm/loss_train": [2, 4, 5], "melody_lstm/lr": [2, 4, 5],
                     "abc_lstm/loss_train": [2, 4], "abc_lstm/lr": [2, 4]}
    assert [e.value for e in events.Scalars("melody_lstm/loss_train")] == pytest.approx(melody["train_loss"])


# %%
# Part 1d: the corpus cache and skipped entries.
def fake_entries(calls, broken=()):
    def loader(name):
        def load():
            calls.append(name)
            if name in broken:
                raise ValueError("no bar line at all")
            return {"name": name, "source": "folk", "tonic": 7, "mode": "major",
                    "events": [(67, 1.0), (69, 1.0), (71, 1.0), (72, 1.0)]}
        return load
    return [("folk", name, loader(name)) for name in ("a", "b", "c")]


def test_cache_is_written_then_reused(lab, tmp_path):
    calls = []
    path = tmp_path / "corpus.json"
    first = lab.build_corpus(fake_entries(calls), path, "fp", progress=False)
    assert len(first["records"]) == 3 and calls == ["a", "b", "c"]
    again = lab.build_corpus(fake_entries(calls), path, "fp", progress=False)
    assert calls == ["a", "b", "c"] and again["records"] == first["records"]  # read back, nothing parsed


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "old version", "other settings", "bad record"])
def test_stale_or_corrupt_cache_is_rebuilt(lab, tmp_path, capsys, damage):
    calls = []
    path = tmp_path / "corpus.json"
    lab.build_corpus(fake_entries(calls), path, "fp", progress=False)
    fingerprint = "fp"
    cached = json.loads(path.read_text())
    if damage == "corrupt":
        path.write_bytes(b"\x00\xffnot json")
    elif damage == "truncated":
        path.write_text(path.read_text()[:40])
    elif damage == "old version":
        path.write_text(json.dumps({**cached, "version": lab.CACHE_VERSION - 1}))
    elif damage == "other settings":
        fingerprint = "fp-with-more-tunes"
    else:
        cached["records"][0]["events"] = "nonsense"
        path.write_text(json.dumps(cached))
    rebuilt = lab.build_corpus(fake_entries(calls), path, fingerprint, progress=False)
    assert calls == ["a", "b", "c"] * 2, "the damaged cache was not rebuilt"
    assert len(rebuilt["records"]) == 3
    assert "stale" in capsys.readouterr().out or damage not in ("old version", "other settings")
    assert json.loads(path.read_text())["fingerprint"] == fingerprint


def test_unparseable_entry_is_skipped_and_counted(lab, tmp_path):
    calls = []
    corpus = lab.build_corpus(fake_entries(calls, broken={"b"}), tmp_path / "c.json", "fp", progress=False)
    assert [r["name"] for r in corpus["records"]] == ["a", "c"]
    assert corpus["skipped"] == [["b", "ValueError: no bar line at all"]]


def test_a_real_unparseable_abc_tune_is_skipped(lab, tmp_path):
    music21 = lab.import_music21()
    entries = [("folk", "broken", lambda: lab.folk_record("broken", "X:1\nM:6/8\nL:1/8\nK:Hx\nGAB|\n", music21)),
               ("folk", "fine", lambda: lab.folk_record("fine", VALID_WITH_PICKUP_AND_ENDINGS, music21))]
    corpus = lab.build_corpus(entries, tmp_path / "c.json", "fp", progress=False)
    assert [r["name"] for r in corpus["records"]] == ["fine"]
    assert corpus["skipped"][0][0] == "broken" and "key" in corpus["skipped"][0][1]
    assert corpus["records"][0]["tonic"] == 7


def test_duplicate_chorale_melodies_are_removed_even_when_transposed(lab):
    melody = [(60, 1.0), (62, 1.0), (64, 2.0), (60, 1.0)]
    records = [{"name": "bwv1", "source": "chorale", "events": melody},
               {"name": "bwv2", "source": "chorale", "events": lab.transpose(melody, 2)},
               {"name": "bwv3", "source": "chorale", "events": melody[:3]}]
    kept, dropped = lab.dedupe_melodies(records)
    assert [r["name"] for r in kept] == ["bwv1", "bwv3"] and dropped == 1


# %%
# Listening: the synthesiser and the WAV file.
def test_synthesiser_writes_a_wav_of_the_right_length(lab, tmp_path):
    import wave
    events = [(69, 1.0), (0, 0.5), (72, 0.5)]
    audio = lab.synthesise(events, sample_rate=8000, tempo_qpm=120)
    assert audio.shape[0] == 8000 and audio.abs().max() <= 0.8 + 1e-6
    assert audio[4000:6000].abs().max() == 0  # the rest is silent
    lab.write_wav(audio, tmp_path / "a.wav", sample_rate=8000)
    with wave.open(str(tmp_path / "a.wav")) as file:
        assert file.getnframes() == 8000 and file.getsampwidth() == 2


def test_sampling_respects_top_k_and_stop_token(lab):
    torch.manual_seed(0)
    model = lab.SequenceModel(lab.SeqConfig(vocab_size=12, embed_dim=8, hidden_size=16))
    generator = torch.Generator().manual_seed(0)
    drawn = lab.sample_batch(model, [[0, 3], [0]], 30, 1.0, 1, torch.device("cpu"), generator)
    with torch.no_grad():
        logits, _ = model(torch.tensor([[0, 3]]))
    assert drawn[0][0] == int(logits[0, -1].argmax())  # top-k 1 is greedy
    stopped = lab.sample_batch(model, [[0]] * 3, 200, 5.0, 0, torch.device("cpu"), generator, stop_token=1)
    assert all(1 not in row for row in stopped)


# %%
# Bad input: one line on stderr, a non-zero exit, nothing written.
def test_music21_missing_says_how_to_install(lab, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "music21", None)  # `import music21` now raises ImportError
    result = failure_of(lab.main, ["--smoke", "--device", "cpu", "--out-dir", tmp_path / "out",
                                   "--data-dir", tmp_path / "data"])
    assert_clean_failure(result, "pip install music21")
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("content", [None, b"\x00\x01\x02 not music at all", b""])
def test_unreadable_prime_gets_one_line(lab, tmp_path, content):
    prime = tmp_path / "mine.abc"
    if content is not None:
        prime.write_bytes(content)
    result = failure_of(lab.main, ["--smoke", "--device", "cpu", "--prime", prime, "--out-dir", tmp_path / "out",
                                   "--data-dir", tmp_path / "data"])
    assert_clean_failure(result, "--prime")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"), (b"\xff\xfe\x00bad", "not UTF-8"), (b"", "no ABC tune"),
    (b"just some words\nand more\n", "no ABC tune")])
def test_bad_abc_file_for_scoring_gets_one_line(lab, tmp_path, content, fragment):
    path = tmp_path / "generated.txt"
    if content is not None:
        path.write_bytes(content)
    result = failure_of(lab.main, ["--score-abc", path, "--device", "cpu", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "--score-abc", fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, fragment", [(None, "does not exist"), (b"not a checkpoint", "cannot be loaded")])
def test_bad_checkpoint_for_generate_only_gets_one_line(lab, tmp_path, content, fragment):
    path = tmp_path / "melody_lstm.pt"
    if content is not None:
        path.write_bytes(content)
    result = failure_of(lab.main, ["--generate-only", path, "--device", "cpu", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, fragment)
    assert not (tmp_path / "out").exists()


def test_out_of_range_flags_get_one_line(lab, tmp_path):
    for flag, value in (("--lr", "-1"), ("--folk-tunes", "-3"), ("--dropout", "1.5"), ("--temperature", "0")):
        result = failure_of(lab.main, [flag, value, "--out-dir", tmp_path / "out"])
        assert_clean_failure(result, flag)


def test_generate_only_from_a_checkpoint(lab, tmp_path):
    config = lab.SeqConfig(vocab_size=lab.MELODY_VOCAB, embed_dim=8, hidden_size=16)
    model = lab.SequenceModel(config)
    path = tmp_path / "melody_lstm.pt"
    lab.save_checkpoint(model, config, {"task": "melody"}, torch.tensor([[0, 300, 301]]), path)
    prime = tmp_path / "mine.abc"
    prime.write_text("X:1\nM:4/4\nL:1/4\nK:C\nC D E F|G A B c|\n")
    result = failure_of(lab.main, ["--generate-only", path, "--prime", prime, "--device", "cpu",
                                   "--out-dir", tmp_path / "out"])
    assert result.returncode == 0, result.stderr
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"piano_roll.png", "melody_01.mid", "melody_01.wav"} <= written
    abc = tmp_path / "abc.pt"
    lab.save_checkpoint(model, config, {"task": "abc", "chars": "ab"}, torch.tensor([[0, 1]]), abc)
    assert_clean_failure(failure_of(lab.main, ["--generate-only", abc, "--device", "cpu",
                                               "--out-dir", tmp_path / "out2"]), "not this lab's melody")


def fake_music21_with_corpus(tmp_path, books: dict):
    """A stand-in for the music21 package whose corpus folder holds the given ABC books."""
    for name, text in books.items():
        folder = tmp_path / "music21" / "corpus" / name.split("/")[0]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name.split("/")[1]).write_text(text, encoding="latin-1")
    music21 = type(sys)("music21")
    music21.__file__ = str(tmp_path / "music21" / "__init__.py")  # the lab finds the corpus next to it
    return music21


def test_abc_corpus_keeps_each_tune_once_and_counts_what_it_left_out(lab, tmp_path, monkeypatch):
    jig = "M:6/8\nL:1/8\nK:G\nGAB cBA|B2G G2D|GAB cBA|B2G G3|]\n"
    books = {"one/a.abc": f"X:1\nT:Jig\n{jig}\nX:2\nT:Hornpipe\nM:C\nL:1/16\nK:D\nABcd|]\n",
             "two/b.abc": f"X:7\nT:The same jig, another title\n{jig}\nX:8\nT:Waltz\nM:3/4\nL:1/8\nK:D\nA2 B2 c2|d6|]\n"}
    music21 = fake_music21_with_corpus(tmp_path, books)
    monkeypatch.setattr(lab, "ABC_COLLECTIONS", ("one", "two"))
    tunes, counts, duplicates = lab.abc_corpus(music21)
    assert [name for name, _ in tunes] == ["one/a.abc#1", "two/b.abc#8"]
    assert counts == {"one": (2, 1), "two": (2, 1)} and duplicates == 1  # L:1/16 left out, the jig kept once
    assert all(text.startswith("M:") and text.endswith("|]\n") for _, text in tunes)


def test_a_missing_abc_collection_gets_one_line(lab, tmp_path):
    music21 = fake_music21_with_corpus(tmp_path, {"one/a.abc": "X:1\nM:2/4\nL:1/8\nK:G\nAB|cd|]\n"})
    with pytest.raises(lab.LabError, match="ryansMammoth is missing from music21's corpus"):
        lab.collection_tunes(music21, "ryansMammoth")


def test_export_abc_writes_the_training_tunes(lab, tmp_path):
    path = tmp_path / "abc_train.txt"
    result = failure_of(lab.main, ["--export-abc", path, "--device", "cpu", "--out-dir", tmp_path / "out"])
    assert result.returncode == 0, result.stderr
    tunes = lab.split_abc_tunes(path.read_text(encoding="utf-8"))
    assert len(tunes) > 1000 and all(t.startswith("M:") and "\nK:" in t for t in tunes)


# %%
# The real run: the targets of the issue, on music21's corpus (it ships with the package, so no
# LAB_DATA_DIR is needed; the parse cache goes to a temporary folder).
@pytest.mark.full
def test_default_run_reaches_the_targets(tmp_path):
    result = run_lab(LAB, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert math.isfinite(metrics["val_loss"])
    assert metrics["lstm_test_nll"] < metrics["best_ngram_test_nll"], metrics
    assert metrics["abc_valid_share_generated"] >= 0.8 * metrics["abc_valid_share_real"], metrics
    assert metrics["chord_accuracy_lstm"] > metrics["chord_accuracy_bigram"], metrics
    assert metrics["pitch_class_intersection_lstm"] >= 0.9, metrics
    assert metrics["pitch_class_intersection_random"] <= metrics["pitch_class_intersection_lstm"] - 0.1, metrics


# %%
# The debugging drill: --bug split-by-window puts windows of the same tune in training and test.
def test_split_by_window_drill_leaks_test_tunes_into_training(lab):
    records = [{"name": f"oneills1850/t.abc#{i}", "source": "folk", "tonic": 7, "mode": "major",
                "events": [(60 + (i + j) % 12, 1.0) for j in range(96)]} for i in range(40)]
    clean = lab.split_melodies(records, None)
    assert lab.tunes_in_train_and_test(clean) == 0  # by tune: nothing of a test tune is trained on
    assert sum(map(len, clean.values())) == 40
    bug = lab.build_parser().parse_known_args(["--bug", "split-by-window"])[0].bug  # as run() passes it
    leaky = lab.split_melodies(records, bug, window=32)
    test_tunes = {r["tune"] for r in leaky["test"]}
    assert test_tunes and lab.tunes_in_train_and_test(leaky) >= 0.8 * len(test_tunes)
    assert sum(len(r["events"]) for rs in leaky.values() for r in rs) == 40 * 96  # every event, once


def test_bar_clock_can_be_switched_off(lab):
    args = lab.build_parser().parse_known_args(["--abc-bar-clock", "off"])[0]
    assert args.abc_bar_clock == "off"
    model = lab.SequenceModel(lab.SeqConfig(vocab_size=10, embed_dim=4, hidden_size=8, position_buckets=0))
    tokens, positions = torch.tensor([[0, 3, 4]]), torch.tensor([[0, 5, 9]])
    with torch.no_grad():
        assert torch.equal(model(tokens, positions=positions)[0], model(tokens)[0])  # no position input at all
