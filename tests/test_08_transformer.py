"""Lab 08: hand-built attention, multi-head attention, LayerNorm and positions against PyTorch's own,
the GPT's two attention paths, sampling, bad input, and (with -m full) the real-data target."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_clean_failure, load_lab, run_lab

LAB = "week4_transformer_vae/08_transformer.py"
lab = load_lab(LAB)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_by_hand_equals_scaled_dot_product_attention(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 5)
    mine, weights = lab.scaled_dot_product_attention(q, k, v, causal=causal)
    torch.testing.assert_close(mine, F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 7))
    if causal:
        assert (weights.triu(1) == 0).all(), "a position attends to the future"


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_attention_equals_nn_multiheadattention(causal):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(24, 4, batch_first=True)
    mine = lab.MultiHeadAttention(24, 4)
    lab.copy_weights_from_torch(mine, theirs)
    x = torch.randn(3, 9, 24)
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1) if causal else None
    with torch.no_grad():
        expected, expected_weights = theirs(x, x, x, attn_mask=mask, average_attn_weights=False)
        got, got_weights = mine(x, causal=causal, by_hand=True)
        fused, _ = mine(x, causal=causal, by_hand=False)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_weights, expected_weights)
    torch.testing.assert_close(fused, expected)


def test_layer_norm_by_hand_equals_nn_layer_norm():
    torch.manual_seed(0)
    theirs, mine = nn.LayerNorm(16), lab.LayerNormByHand(16)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 5, 16) * 7 + 3
    torch.testing.assert_close(mine(x), theirs(x))


def test_sinusoidal_encoding_values_and_shift_invariance():
    table = lab.sinusoidal_positional_encoding(50, 16)
    assert table.shape == (50, 16)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0] * 8))  # sin 0, cos 0
    torch.testing.assert_close(table[3, 0], torch.sin(torch.tensor(3.0)))  # fastest channel: wavelength 2*pi
    dots = table @ table.T  # the dot product of two positions depends only on their distance
    for offset in (1, 5, 20):
        diagonal = dots.diagonal(offset)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_gpt_hand_built_path_equals_fused_path_and_is_causal(norm_first, pos_encoding):
    torch.manual_seed(0)
    model = lab.build_model(dict(vocab_size=30, block_size=16, n_layer=2, n_head=4, n_embd=32,
                                 pos_encoding=pos_encoding, norm_first=norm_first)).eval()
    idx = torch.randint(0, 30, (2, 16))
    with torch.no_grad():
        logits = model(idx)
        torch.testing.assert_close(model(idx, by_hand=True), logits)
        changed = idx.clone()
        changed[:, 10] = (changed[:, 10] + 1) % 30
        later = model(changed)
    torch.testing.assert_close(later[:, :10], logits[:, :10])  # the future does not leak backwards
    assert not torch.allclose(later[:, 10:], logits[:, 10:])
    maps = model.attention_maps(idx)
    assert maps.shape == (2, 2, 4, 16, 16)


def test_sampling_top_k_one_is_greedy_and_crops_the_context():
    torch.manual_seed(0)
    model = lab.build_model(dict(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16,
                                 pos_encoding="learned", norm_first=True))
    prompt = torch.randint(0, 12, (1, 3))
    out = lab.generate(model, prompt, 20, temperature=0.7, top_k=1)  # longer than block_size: must crop
    assert out.shape == (1, 23) and torch.equal(out[:, :3], prompt)
    greedy = prompt
    with torch.no_grad():
        for _ in range(20):
            greedy = torch.cat([greedy, model(greedy[:, -8:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, greedy)


def test_learning_rate_warms_up_then_anneals():
    peak = 1e-3
    assert lab.learning_rate(0.0, peak) < 0.1 * peak
    assert lab.learning_rate(0.02, peak) == pytest.approx(peak)
    assert lab.learning_rate(1.0, peak) == pytest.approx(0.1 * peak)


def test_missing_data_with_no_network_names_url_layout_and_smoke(tmp_path):
    offline = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = run_lab(LAB, "--data-dir", tmp_path / "empty", "--out-dir", tmp_path / "out", "--time-budget", "1",
                     env_extra=offline, timeout=120)
    assert_clean_failure(result, lab.SHAKESPEARE_URL, "tinyshakespeare/input.txt", "--smoke")


def test_checkpoint_missing_corrupt_or_from_another_architecture(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        lab.main(["--checkpoint", str(tmp_path / "nothing.pt")])

    truncated = tmp_path / "truncated.pt"
    torch.save({"model": nn.Linear(200, 200).state_dict()}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(SystemExit, match="truncated or not a PyTorch checkpoint"):
        lab.main(["--checkpoint", str(truncated)])

    other_lab = tmp_path / "vae.pt"
    torch.save({"model": {}, "config": {"kind": "vae", "latent_dim": 20}, "vocab": "ab"}, other_lab)
    with pytest.raises(SystemExit, match=r"another architecture.*kind.*latent_dim.*lacks.*n_embd"):
        lab.main(["--checkpoint", str(other_lab)])

    config = dict(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16, pos_encoding="learned",
                  norm_first=True)
    wider = lab.build_model(dict(config, n_embd=32))
    mismatched = tmp_path / "mismatched.pt"
    torch.save({"model": wider.state_dict(), "config": config, "vocab": "abcdefghij"}, mismatched)
    with pytest.raises(SystemExit, match="do not fit.*size mismatch"):
        lab.main(["--checkpoint", str(mismatched)])


def test_saved_checkpoint_samples_and_refuses_unknown_prompt_characters(tmp_path, capsys):
    config = dict(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16, pos_encoding="learned",
                  norm_first=True)
    path = tmp_path / "model.pt"
    torch.save({"model": lab.build_model(config).state_dict(), "config": config, "vocab": "\n abcdefgh"}, path)
    lab.main(["--checkpoint", str(path), "--prompt", "abc", "--sample-length", "12"])
    assert capsys.readouterr().out.startswith("abc")
    with pytest.raises(SystemExit, match="not in the model's vocabulary"):
        lab.main(["--checkpoint", str(path), "--prompt", "xyz"])


@pytest.mark.parametrize("flag,value", [("--lr", "-1"), ("--time-budget", "0"), ("--temperature", "0"),
                                        ("--top-k", "-2"), ("--n-head", "3")])
def test_out_of_range_hyper_parameters_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lab.main([flag, value, "--smoke"])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.full
def test_default_run_reaches_the_validation_target(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val_loss"] <= 1.80, metrics["val_loss"]  # the target, not the lab's constant
