"""Lab 09: the reparameterization trick's gradients, the analytic KL against Monte Carlo and
torch.distributions, the conditional VAE's label path, bad input, and (with -m full) the targets."""
import json
import math

import pytest
import torch
import torch.nn as nn
from torch.distributions import Normal, kl_divergence

from conftest import assert_clean_failure, load_lab, run_lab

LAB = "week4_transformer_vae/09_vae.py"
lab = load_lab(LAB)


def test_reparameterization_passes_gradients_to_mu_and_sigma():
    torch.manual_seed(0)
    mu = torch.randn(4, 3, requires_grad=True)
    logvar = torch.randn(4, 3, requires_grad=True)
    generator = torch.Generator().manual_seed(1)
    z = lab.reparameterize(mu, logvar, generator)
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    z.sum().backward()
    sigma = torch.exp(0.5 * logvar.detach())
    torch.testing.assert_close(z.detach(), mu.detach() + sigma * eps)
    torch.testing.assert_close(mu.grad, torch.ones(4, 3))  # dz/dmu = 1
    torch.testing.assert_close(logvar.grad, 0.5 * sigma * eps)  # dz/dlogvar = dz/dsigma * dsigma/dlogvar


def test_reparameterized_samples_have_the_right_mean_and_spread():
    mu, logvar = torch.full((200_000, 1), 1.5), torch.full((200_000, 1), math.log(0.25))
    z = lab.reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    assert z.mean().item() == pytest.approx(1.5, abs=0.01)
    assert z.std().item() == pytest.approx(0.5, abs=0.01)


def test_analytic_kl_matches_monte_carlo_and_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5) * 0.5
    analytic = lab.kl_divergence(mu, logvar)  # (3,)
    q, prior = Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros(3, 5), torch.ones(3, 5))
    torch.testing.assert_close(analytic, kl_divergence(q, prior).sum(-1))
    z = q.sample((200_000,))  # (S, 3, 5)
    monte_carlo = (q.log_prob(z) - prior.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(monte_carlo, analytic, atol=0.03, rtol=0.01)


def test_negative_elbo_is_summed_bce_plus_kl():
    torch.manual_seed(0)
    logits, x = torch.randn(2, 784), torch.rand(2, 784)
    mu, logvar = torch.randn(2, 4), torch.randn(2, 4)
    bce = -(x * torch.log(torch.sigmoid(logits)) + (1 - x) * torch.log(1 - torch.sigmoid(logits))).sum()
    expected = bce + (-0.5 * (1 + logvar - mu ** 2 - logvar.exp())).sum()
    torch.testing.assert_close(lab.negative_elbo(logits, x, mu, logvar), expected)


def test_conditional_vae_uses_the_label_and_eval_mode_is_deterministic():
    torch.manual_seed(0)
    cvae = lab.build_model({"kind": "cvae", "latent_dim": 4, "hidden": 32, "num_classes": 10}).eval()
    x, z = torch.rand(2, 784), torch.randn(2, 4)
    assert not torch.allclose(cvae.decode(z, torch.tensor([1, 1])), cvae.decode(z, torch.tensor([7, 7])))
    first, second = cvae(x, torch.tensor([3, 4])), cvae(x, torch.tensor([3, 4]))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    images = lab.generate_digits(cvae, 5, 6, seed=0, device=torch.device("cpu"))
    assert images.shape == (6, 784) and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("digit", ["10", "-1"])
def test_digit_outside_zero_to_nine_is_refused(digit, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lab.main(["--digit", digit, "--smoke"])
    assert exit_info.value.code == 2
    assert "--digit must be a single digit from 0 to 9" in capsys.readouterr().err


def test_mnist_absent_with_no_network_names_url_layout_and_smoke(tmp_path):
    offline = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    result = run_lab(LAB, "--data-dir", tmp_path / "empty", "--out-dir", tmp_path / "out",
                     env_extra=offline, timeout=120)
    assert_clean_failure(result, "https://ossci-datasets.s3.amazonaws.com/mnist/", "MNIST/raw", "--smoke")
    assert not (tmp_path / "out" / "metrics.json").exists()


def save_vae(path, kind, num_classes, latent_dim=4):
    model = lab.VAE(latent_dim, 32, num_classes)
    config = {"kind": kind, "latent_dim": latent_dim, "hidden": 32, "num_classes": num_classes}
    torch.save({"model": model.state_dict(), "config": config}, path)
    return config


def test_checkpoint_from_another_architecture_says_what_does_not_match(tmp_path):
    unconditional = tmp_path / "vae.pt"
    save_vae(unconditional, "vae", 0)
    with pytest.raises(SystemExit, match=r"holds a 'vae' with num_classes=0.*needs the conditional VAE"):
        lab.main(["--checkpoint", str(unconditional), "--digit", "3", "--out-dir", str(tmp_path)])

    transformer = tmp_path / "gpt.pt"
    torch.save({"model": {}, "config": {"vocab_size": 65, "n_layer": 4}}, transformer)
    with pytest.raises(SystemExit, match=r"another architecture.*n_layer.*need.*latent_dim"):
        lab.main(["--checkpoint", str(transformer), "--out-dir", str(tmp_path)])

    mismatched = tmp_path / "mismatched.pt"
    config = save_vae(mismatched, "cvae", 10, latent_dim=4)
    saved = torch.load(mismatched, weights_only=True)
    saved["config"] = dict(config, latent_dim=8)
    torch.save(saved, mismatched)
    with pytest.raises(SystemExit, match=r"do not fit.*latent_dim=8.*size mismatch"):
        lab.main(["--checkpoint", str(mismatched), "--out-dir", str(tmp_path)])


def test_checkpoint_missing_or_truncated_fails_cleanly(tmp_path):
    result = run_lab(LAB, "--checkpoint", tmp_path / "absent.pt", "--out-dir", tmp_path, timeout=120)
    assert_clean_failure(result, "does not exist")
    truncated = tmp_path / "cvae.pt"
    torch.save({"model": nn.Linear(300, 300).state_dict()}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:400])
    with pytest.raises(SystemExit, match="truncated or not a PyTorch checkpoint"):
        lab.main(["--checkpoint", str(truncated), "--out-dir", str(tmp_path)])


def test_a_saved_cvae_draws_the_digit_asked_for(tmp_path):
    path = tmp_path / "cvae.pt"
    save_vae(path, "cvae", 10)
    lab.main(["--checkpoint", str(path), "--digit", "4", "--out-dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "digit_4.png").is_file()


@pytest.mark.full
def test_default_run_reaches_both_targets(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_neg_elbo"] <= 100.0, metrics["test_neg_elbo"]  # the targets, written out
    assert metrics["conditional_accuracy"] >= 0.95, metrics["conditional_accuracy"]
