"""The simulated T4 itself (tests/simulated_cuda.py): the device rule it enforces, and autocast
giving the dtypes and values a GPU gives. One fresh process runs every check (install() patches torch)."""
from conftest import run_on_simulated_cuda

CHECKS = r"""
import torch, torch.nn as nn, torch.nn.functional as F

# The device rule: a GPU tensor meeting a CPU one fails as on CUDA; a 0-dim CPU number is allowed.
on_gpu, on_cpu = torch.ones(3, device="cuda"), torch.ones(3)
assert on_gpu.device == torch.device("cuda", 0) and on_gpu.is_cuda and not on_cpu.is_cuda
try:
    on_gpu + on_cpu
    raise SystemExit("a cuda tensor met a cpu tensor and nothing failed")
except RuntimeError as err:
    assert "same device" in str(err), err
assert (on_gpu * torch.tensor(2.0)).device.type == "cuda"
assert (on_gpu.cpu() + on_cpu).device.type == "cpu"

# Autocast products: inputs rounded to fp16, sums in float32, the result in fp16 (tensor cores).
torch.manual_seed(0)
layer = nn.Linear(64, 32).cuda()
inputs = torch.randn(16, 64, device="cuda", requires_grad=True)
with torch.autocast("cuda", dtype=torch.float16):
    out = layer(inputs)
assert out.dtype == torch.float16 and out.device.type == "cuda", (out.dtype, out.device)
rounded = lambda t: t.detach().cpu().half().float()
expected = (rounded(inputs) @ rounded(layer.weight).T + rounded(layer.bias)).half()
assert torch.equal(out.detach().cpu(), expected), (out.detach().cpu() - expected).abs().max()
out.float().sum().backward()
assert layer.weight.grad.dtype == torch.float32 and inputs.grad.dtype == torch.float32
torch.testing.assert_close(layer.weight.grad.cpu(), rounded(inputs).sum(0).expand(32, 64), rtol=1e-3, atol=1e-3)

conv = nn.Conv2d(3, 8, 3).cuda()
with torch.autocast("cuda", dtype=torch.float16):
    image_out = conv(torch.randn(2, 3, 8, 8, device="cuda"))
    product = torch.randn(4, 5, device="cuda") @ torch.randn(5, 6, device="cuda")
    summed = image_out.float().sum()         # outside the product list: the dtype it was given
assert image_out.dtype == product.dtype == torch.float16 and summed.dtype == torch.float32

# Recurrent layers under autocast come back in fp16 whatever dtype was asked (AutocastRNN.cpp).
lstm = nn.LSTM(8, 16, batch_first=True).cuda()
with torch.autocast("cuda", dtype=torch.float16):
    sequence_out, _ = lstm(torch.randn(2, 5, 8, device="cuda"))
assert sequence_out.dtype == torch.float16 and sequence_out.device.type == "cuda"

# What a T4 says about bf16: only with emulation.
assert torch.cuda.get_device_name() == "Tesla T4"
assert torch.cuda.is_bf16_supported() and not torch.cuda.is_bf16_supported(including_emulation=False)
print("all simulated-T4 checks passed")
"""


def test_device_rule_and_autocast_dtypes_match_a_t4():
    result = run_on_simulated_cuda(CHECKS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all simulated-T4 checks passed" in result.stdout
