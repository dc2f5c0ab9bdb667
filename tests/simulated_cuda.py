"""A simulated CUDA GPU (a Colab T4) on a machine that has none, to catch device-placement bugs.

The labs are written for CUDA, but the machines the tests run on have no GPU. Real CUDA refuses an
operation that mixes a tensor on the GPU with one in main memory ("Expected all tensors to be on the
same device"); a CPU-only run never meets that rule, so a lab can pass every CPU test and still
crash on Colab. This module runs `--device cuda` on the CPU with the rule enforced:

  * `torch.cuda` and `torch.accelerator` answer like one Tesla T4 (compute capability 7.5, bf16
    only by emulation: `is_bf16_supported(including_emulation=False)` is False);
  * a tensor moved to or created on "cuda" becomes a `SimulatedCudaTensor`: its values stay in main
    memory, but `.device` says `cuda:0`, `.is_cuda` is True and `.numpy()` fails as on a GPU;
  * every torch function checks its tensors like CUDA does and raises CUDA's error when a GPU
    tensor meets a CPU one (allowed, as on a real GPU: 0-dim CPU tensors as numbers, CPU index
    tensors, the CPU lengths and batch sizes of packed sequences, and copies between devices);
    a factory given a CPU generator for a GPU tensor fails as on a GPU;
  * `torch.autocast("cuda", ...)` runs as CPU autocast with the same dtype, so fp16/bf16 paths run
    (and `torch.is_autocast_enabled("cuda")`, `torch.get_autocast_dtype("cuda")` answer for it);
    matrix products and convolutions under it read fp16/bf16-rounded inputs, add up in float32 and
    return the autocast dtype, as tensor cores do (the CPU's own fp16 kernels are far slower);
  * each device-to-host read (`.item()`, `float(t)`, `bool(t)`, `.tolist()`, `.cpu()`, formatting
    or printing a tensor, `nonzero`, `allclose`, `torch.cuda.synchronize`) is counted by the lab
    line that made it, per interval between two optimizer steps, so a test can find a read made on
    every training step (a stall on a GPU).

What it cannot see: GPU kernels (cuDNN and fused kernels run as their CPU versions, CUDA
autocast's op lists are CPU autocast's), speed, memory (nothing is allocated on a GPU, so
out-of-memory cannot happen), asynchronous execution and streams, several GPUs, the CUDA random
generator (numbers come from the CPU one), pinned memory (a no-op), and C++ code that reads a
tensor's device itself (it sees the CPU). `torch.save` writes CPU tensors, so a checkpoint loaded
without `map_location` comes back on the CPU instead of failing on a machine without a GPU.
`Module.to("cuda")` replaces the parameter objects (a real GPU keeps them), so an optimizer built
before the move would go on updating the old ones here.

Run a lab on it exactly as `python LAB.py ARGS`:
    python tests/simulated_cuda.py week1_pytorch/02_neural_network.py --device cuda --smoke
or in-process (a notebook kernel): `import simulated_cuda; simulated_cuda.install()`.
With SIMULATED_CUDA_REPORT=path.json set, the device-to-host reads are written there at exit.
"""
import atexit
import collections
import functools
import json
import os
import runpy
import sys
import traceback

import torch
import torch.utils._pytree as pytree

CUDA = torch.device("cuda", 0)
GPU_NAME = "Tesla T4"
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
THIS_FILE = os.path.abspath(__file__)


def is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True                                   # an index means a CUDA device
    return torch.device(device).type == "cuda"


# %%
# Device-to-host reads, by the lab line that made them.
class DeviceReads:
    def __init__(self):
        self.steps = 0
        self.total = 0
        self.lines_this_interval = set()
        self.intervals_with_read = collections.Counter()   # "file:line (what)" -> intervals

    def host_read(self, what: str) -> None:
        self.total += 1
        if any(frame.filename.endswith(os.path.join("amp", "grad_scaler.py")) for frame in traceback.extract_stack()):
            what = "GradScaler"                        # its step() reads found_inf: PyTorch's own sync
        line = lab_line()
        if line:
            self.lines_this_interval.add(f"{line} ({what})")

    def optimizer_stepped(self, *_args) -> None:
        self.steps += 1
        for line in self.lines_this_interval:
            self.intervals_with_read[line] += 1
        self.lines_this_interval = set()

    def as_dict(self) -> dict:
        return {"optimizer_steps": self.steps, "device_to_host_reads": self.total,
                "intervals_with_read_by_line": dict(self.intervals_with_read.most_common())}


def lab_line():
    """The innermost caller that is neither torch, a library, nor this module."""
    for frame in reversed(traceback.extract_stack()):
        name = os.path.abspath(frame.filename)
        if name == THIS_FILE or "site-packages" in name or name.startswith("<") or "/lib/python" in name:
            continue
        return f"{os.path.basename(name)}:{frame.lineno}"
    return None


REPORT = DeviceReads()


# %%
# The tensor that says it is on the GPU.
T = torch.Tensor
HOST_READS = {T.item: "item", T.tolist: "tolist", T.__bool__: "bool", T.__float__: "float",
              T.__int__: "int", T.__index__: "index", T.__format__: "format", T.__repr__: "print",
              T.cpu: "copy to cpu", T.nonzero: "nonzero", torch.nonzero: "nonzero",
              torch.allclose: "allclose", T.allclose: "allclose", torch.equal: "equal", T.equal: "equal"}
INDEXING = {T.__getitem__, T.__setitem__, T.index_put_, T.index_put, torch.index_put}
VF = torch._C._VariableFunctions
RECURRENT_KERNELS = {VF.lstm, VF.gru, VF.rnn_tanh, VF.rnn_relu}
F = torch.nn.functional
# The products autocast runs in fp16/bf16. A GPU's tensor cores read them in half precision and add
# up in float32; the CPU's own half-precision kernels are 20-50 times slower than float32 here.
HALF_PRECISION_PRODUCTS = {F.linear, torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d,
                           torch.conv_transpose2d, torch.conv_transpose3d, torch.matmul, T.matmul, T.__matmul__,
                           T.__rmatmul__, torch.mm, T.mm, torch.bmm, T.bmm, torch.addmm, T.addmm, torch.baddbmm,
                           T.baddbmm, torch.addbmm, torch.einsum, torch.prelu, F.scaled_dot_product_attention,
                           F.multi_head_attention_forward}
PACKED_SEQUENCES = {VF._pack_padded_sequence, VF._pad_packed_sequence} | RECURRENT_KERNELS


class SimulatedCudaTensor(torch.Tensor):
    """Values in main memory; to PyTorch code written for CUDA it looks like a cuda:0 tensor."""

    @property
    def device(self):
        return CUDA

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return 0

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            copy = simulated(plain(self).detach().clone()).requires_grad_(self.requires_grad)
            if getattr(self, "_is_param", False):
                copy._is_param = True                  # still an nn.Parameter to isinstance()
            memo[id(self)] = copy
        return memo[id(self)]

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                        "tensor to host memory first. (simulated CUDA)")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS and isinstance(args[0] if args else None, SimulatedCudaTensor):
            REPORT.host_read(HOST_READS[func])
        if func is T.cpu:
            return plain(args[0]).clone()
        if func is T.to:
            return simulated_to(*args, **kwargs)
        check_devices(func, args, kwargs)
        check_generator(kwargs.get("generator"), gpu=True)
        device = kwargs.get("device")
        if device is not None:                         # e.g. zeros_like(x, device=...)
            kwargs = dict(kwargs, device="cpu")
        with torch._C.DisableTorchFunctionSubclass():
            if func in RECURRENT_KERNELS and torch.is_autocast_enabled("cpu"):
                result = recurrent_kernel_in_low_precision(func, args, kwargs)
            elif func in HALF_PRECISION_PRODUCTS and torch.is_autocast_enabled("cpu"):
                result = product_as_tensor_cores_do(func, args, kwargs)
            else:
                result = func(*args, **kwargs)
        if device is not None and not is_cuda_device(device):
            return result
        if func in PACKED_SEQUENCES:                   # batch sizes and lengths stay on the CPU
            return pytree.tree_map_only(torch.Tensor, lambda t: t if t.dtype in INTEGER_DTYPES
                                        else simulated(t), result)
        return pytree.tree_map_only(torch.Tensor, simulated, result)

    def __repr__(self, *, tensor_contents=None):
        REPORT.host_read("print")
        return repr(plain(self))[:-1] + ", device='cuda:0')"


def recurrent_kernel_in_low_precision(func, args, kwargs):
    """Under CUDA autocast, cuDNN runs LSTM/GRU in fp16 whatever dtype was asked (AutocastRNN.cpp
    casts to kHalf). The CPU may lack that kernel: compute in float32, hand back fp16 as a GPU would."""
    low = torch.float16
    with torch.autocast("cpu", enabled=False):
        to_float = lambda t: t.float() if t.is_floating_point() else t
        result = func(*pytree.tree_map_only(torch.Tensor, to_float, args),
                      **pytree.tree_map_only(torch.Tensor, to_float, kwargs))
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(low) if t.is_floating_point() else t, result)


def product_as_tensor_cores_do(func, args, kwargs):
    """A matrix product under autocast: inputs rounded to the autocast dtype, summed in float32, the
    result in the autocast dtype, as a GPU's tensor cores do (and as fast as float32 on the CPU)."""
    low = torch.get_autocast_dtype("cpu")
    with torch.autocast("cpu", enabled=False):
        rounded = lambda t: t.to(low).float() if t.is_floating_point() else t
        result = func(*pytree.tree_map_only(torch.Tensor, rounded, args),
                      **pytree.tree_map_only(torch.Tensor, rounded, kwargs))
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(low) if t.is_floating_point() else t, result)


def plain(tensor):
    """The same values as an ordinary CPU tensor (shares memory and autograd history)."""
    if isinstance(tensor, SimulatedCudaTensor):
        with torch._C.DisableTorchFunctionSubclass():
            return tensor.as_subclass(torch.Tensor)
    return tensor


def simulated(tensor):
    if isinstance(tensor, SimulatedCudaTensor) or not isinstance(tensor, torch.Tensor):
        return tensor
    with torch._C.DisableTorchFunctionSubclass():
        return tensor.as_subclass(SimulatedCudaTensor)


def check_devices(func, args, kwargs) -> None:
    """Raise CUDA's error where a real GPU would."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    on_gpu = [t for t in tensors if isinstance(t, SimulatedCudaTensor)]
    on_cpu = [t for t in tensors if not isinstance(t, SimulatedCudaTensor)]
    if not on_gpu or not on_cpu or func in (T.copy_, T.to, T.cpu, T.__repr__, T.__format__):
        return
    if func in INDEXING:
        if not isinstance(args[0], SimulatedCudaTensor):
            raise RuntimeError("indices should be either on cpu or on the same device as the indexed "
                               "tensor (cpu) (simulated CUDA)")
        on_cpu = [t for t in on_cpu if t.dtype not in INTEGER_DTYPES and t.dim() > 0]
        if func is T.__setitem__:
            on_cpu = []                                # `gpu[...] = cpu_values` copies across devices
    elif func in PACKED_SEQUENCES:
        on_cpu = [t for t in on_cpu if t.dtype not in INTEGER_DTYPES]
    else:
        # A 0-dim CPU tensor is a number to a CUDA kernel (`gpu_tensor * cpu_scalar_tensor` works).
        on_cpu = [t for t in on_cpu if t.dim() > 0]
    if on_cpu:
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"cuda:0 and cpu! (simulated CUDA, in {name})")


# %%
# Moving tensors and modules, making tensors on the GPU, loading and saving.
REAL_TO = torch.Tensor.to


def simulated_to(self, *args, **kwargs):
    copy = kwargs.pop("copy", False)
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    options = {"dtype": dtype, "non_blocking": non_blocking, "copy": copy}
    if memory_format is not None:
        options["memory_format"] = memory_format
    source = plain(self)
    with torch._C.DisableTorchFunctionSubclass():
        if is_cuda_device(device):
            moved = REAL_TO(source, **options)
            if not isinstance(self, SimulatedCudaTensor) and moved is source:
                moved = source.clone()                 # a real move to the GPU is a copy
            return simulated(moved)
        if device is not None:                         # to the CPU: it leaves the GPU
            if isinstance(self, SimulatedCudaTensor):
                REPORT.host_read("copy to cpu")
                moved = REAL_TO(source, **options)
                return moved.clone() if moved is source else moved
            return REAL_TO(source, device, **options)
        moved = REAL_TO(source, **options)             # only a dtype or memory format changed
        return simulated(moved) if isinstance(self, SimulatedCudaTensor) else moved


def move_to_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return simulated_to(self, "cuda", non_blocking=non_blocking, memory_format=memory_format)


def simulated_factory(real_factory):
    """torch.zeros(..., device="cuda") and friends: made on the CPU, handed back as GPU tensors."""
    @functools.wraps(real_factory)
    def factory(*args, device=None, **kwargs):
        on_gpu = is_cuda_device(device)
        check_generator(kwargs.get("generator"), gpu=on_gpu)
        if not on_gpu:
            return real_factory(*args, **kwargs) if device is None else real_factory(*args, device=device, **kwargs)
        requires_grad = kwargs.pop("requires_grad", False)  # set after the wrap: a leaf, as on a GPU
        return simulated(real_factory(*args, **kwargs)).requires_grad_(requires_grad)
    return factory


def check_generator(generator, gpu: bool) -> None:
    """Random numbers for a GPU tensor need a GPU generator, and for a CPU tensor a CPU one."""
    if generator is None:
        return
    generator_on_gpu = getattr(generator, "simulated_cuda", False)
    if generator_on_gpu != gpu:
        found, wanted = ("cuda", "cpu") if generator_on_gpu else ("cpu", "cuda")
        raise RuntimeError(f"Expected a '{wanted}' device type for generator but found '{found}' (simulated CUDA)")


REAL_GENERATOR = torch.Generator


class AnyGenerator(type(torch.Generator)):
    """isinstance(torch.default_generator, torch.Generator) stays True once torch.Generator is replaced."""

    def __instancecheck__(cls, obj):
        return isinstance(obj, REAL_GENERATOR)


class SimulatedGenerator(REAL_GENERATOR, metaclass=AnyGenerator):
    """torch.Generator(device="cuda") is a CPU generator that says it belongs to cuda:0."""

    def __new__(cls, device="cpu"):
        generator = REAL_GENERATOR.__new__(cls)
        generator.simulated_cuda = is_cuda_device(device)
        return generator

    def __init__(self, device="cpu"):
        super().__init__()

    @property
    def device(self):
        return CUDA if self.simulated_cuda else torch.device("cpu")


FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "logspace",
             "eye", "rand", "randn", "randint", "randperm", "zeros_like", "ones_like", "empty_like",
             "full_like", "rand_like", "randn_like", "randint_like", "empty_strided", "normal",
             "tril_indices", "triu_indices")


def simulated_load(real_load):
    @functools.wraps(real_load)
    def load(*args, map_location=None, **kwargs):
        wants_gpu = isinstance(map_location, (str, int, torch.device)) and is_cuda_device(map_location)
        value = real_load(*args, map_location="cpu" if wants_gpu else map_location, **kwargs)
        return pytree.tree_map_only(torch.Tensor, simulated, value) if wants_gpu else value
    return load


def simulated_save(real_save):
    @functools.wraps(real_save)
    def save(obj, *args, **kwargs):
        return real_save(pytree.tree_map_only(torch.Tensor, lambda t: plain(t).detach(), obj), *args, **kwargs)
    return save


def compatible_shallow_copy_type(real):
    """Module.to: a parameter that changes device gets a new object (see the docstring)."""
    @functools.wraps(real)
    def compatible(tensor, other):
        if isinstance(tensor, SimulatedCudaTensor) != isinstance(other, SimulatedCudaTensor):
            return False
        return real(tensor, other)
    return compatible


def simulated_autocast(real_autocast):
    """CUDA autocast runs as CPU autocast with the same dtype (the op lists differ a little)."""
    class autocast(real_autocast):
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            if device_type == "cuda":
                if enabled and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
                    raise RuntimeError("Current CUDA Device does not support bfloat16. (simulated CUDA)")
                device_type, dtype = "cpu", dtype or torch.float16
            super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
    return autocast


def simulated_autocast_query(real_query):
    """torch.is_autocast_enabled("cuda") and get_autocast_dtype("cuda") answer for the CPU autocast
    that stands in for CUDA's (a lab may ask, e.g. to keep a recurrent layer out of bf16)."""
    @functools.wraps(real_query)
    def query(*args, **kwargs):
        if args and args[0] == "cuda":
            args = ("cpu", *args[1:])
        return real_query(*args, **kwargs)
    return query


def grouped_by_simulated_device(real_group):
    """torch._C._group_tensors_by_device_and_dtype (clip_grad_norm_, foreach code) sees the CPU;
    name the group's device as the tensors report it, so e.g. `coef.to(device)` stays on the GPU."""
    @functools.wraps(real_group)
    def group(tensorlistlist, with_indices=False):
        grouped = real_group(tensorlistlist, with_indices)
        renamed = {}
        for (device, dtype), value in grouped.items():
            first = next((t for tensors in value[0] for t in tensors if t is not None), None)
            renamed[(CUDA if isinstance(first, SimulatedCudaTensor) else device, dtype)] = value
        return renamed
    return group


class IdleStream:
    """The current stream, as the optimizers ask it whether a CUDA graph is being captured."""

    def is_capturing(self):
        return False

    def synchronize(self):
        REPORT.host_read("synchronize")


class T4Properties:
    name, major, minor, total_memory, multi_processor_count = GPU_NAME, 7, 5, 15 * 2**30, 40


def install() -> None:
    """Make this process believe it has one T4 (idempotent)."""
    if getattr(torch, "simulated_cuda_installed", False):
        return
    torch.simulated_cuda_installed = True
    cuda = torch.cuda
    cuda._lazy_init = lambda: None
    cuda.is_available = lambda: True
    cuda.is_initialized = lambda: True
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.get_device_name = lambda device=None: GPU_NAME
    cuda.get_device_capability = lambda device=None: (7, 5)
    cuda.get_device_properties = lambda device=None: T4Properties()
    cuda.is_bf16_supported = lambda including_emulation=True: bool(including_emulation)
    cuda.synchronize = lambda device=None: REPORT.host_read("synchronize")
    cuda.manual_seed = cuda.manual_seed_all = cuda.seed = cuda.seed_all = lambda *args, **kwargs: None
    cuda.get_rng_state = lambda device="cuda": torch.zeros(16, dtype=torch.uint8)
    cuda.get_rng_state_all = lambda: [torch.zeros(16, dtype=torch.uint8)]
    cuda.set_rng_state = lambda state, device="cuda": None
    cuda.set_rng_state_all = lambda states: None
    cuda.empty_cache = lambda: None
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.max_memory_allocated = cuda.memory_allocated = cuda.memory_reserved = lambda device=None: 0
    torch.accelerator.is_available = lambda: True
    torch.accelerator.current_accelerator = lambda check_available=False: torch.device("cuda")
    torch.accelerator.device_count = lambda: 1
    torch.accelerator.current_device_index = lambda: 0
    torch.accelerator.set_device_index = lambda device: None
    torch.accelerator.current_stream = lambda device=None: IdleStream()
    torch.accelerator.synchronize = lambda device=None: REPORT.host_read("synchronize")
    torch.backends.cudnn.is_acceptable = lambda tensor: False   # nn.LSTM: no cuDNN weight flattening
    torch.Tensor.to = simulated_to
    torch.Tensor.cuda = move_to_cuda
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch.Tensor.is_pinned = lambda self, *args, **kwargs: False
    torch._has_compatible_shallow_copy_type = compatible_shallow_copy_type(torch._has_compatible_shallow_copy_type)
    # `with torch.device("meta")` (transformers' from_pretrained) finds factories in a cached set of
    # torch's own functions: fill that cache before they are replaced, or the context is ignored.
    from torch.utils._device import _device_constructors
    _device_constructors()
    for name in FACTORIES:
        setattr(torch, name, simulated_factory(getattr(torch, name)))
    torch.Generator = SimulatedGenerator
    torch.load = simulated_load(torch.load)
    torch.save = simulated_save(torch.save)
    torch.autocast = torch.amp.autocast = simulated_autocast(torch.amp.autocast)
    torch.is_autocast_enabled = simulated_autocast_query(torch.is_autocast_enabled)
    torch.get_autocast_dtype = simulated_autocast_query(torch.get_autocast_dtype)
    torch._C._group_tensors_by_device_and_dtype = grouped_by_simulated_device(
        torch._C._group_tensors_by_device_and_dtype)
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(REPORT.optimizer_stepped)
    report = os.environ.get("SIMULATED_CUDA_REPORT")
    if report:
        atexit.register(lambda: open(report, "w").write(json.dumps(REPORT.as_dict(), indent=2)))


def main() -> None:
    """python tests/simulated_cuda.py LAB.py [ARGS...]: run the lab as __main__ on a simulated T4."""
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/simulated_cuda.py LAB.py [ARGS...]")
    install()
    lab = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(lab)))
    runpy.run_path(lab, run_name="__main__")


if __name__ == "__main__":
    main()
