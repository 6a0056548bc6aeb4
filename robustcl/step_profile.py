"""What a training step costs and where the time goes: its model passes replayed alone, its FLOPs, the hardware's
peak, and the time spent in augmentation and attacks. Used by ``benchmarks/throughput.py``.

The overhead factor is the step's time over the time of its own model passes measured alone: every forward (and
backward) a network of the method ran during one recorded step, replayed on random inputs of the same shapes, in the
same mode, precision and memory format. Everything else a step does — augmentation, random draws, losses, the
attack's sign/clip, the optimizer, Python — is overhead.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .attacks import frozen_parameters


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):  # transformers' ModelOutput is a dict
        return [v for v in value.values() if isinstance(v, torch.Tensor)]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    channels_last: bool

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        return cls(tuple(t.shape), t.dtype, t.requires_grad, cl)

    def make(self, device: torch.device) -> torch.Tensor:
        x = torch.rand(self.shape, device=device, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(self.requires_grad)


@dataclass(frozen=True)
class ModelPass:
    """One call of one network during the step, and the backward it got (none, input-only or full)."""

    network: int  # index into the recorder's networks
    args: tuple[Any, ...]  # TensorSpec for tensors, the value otherwise
    kwargs: tuple[tuple[str, Any], ...]
    training: bool
    grad_enabled: bool
    autocast: torch.dtype | None
    backward: Literal["none", "input", "full"]
    grad_outputs: tuple[int, ...]  # which of the output tensors received a gradient


@dataclass
class _Call:
    network: int
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    training: bool
    grad_enabled: bool
    autocast: torch.dtype | None
    params_trainable: bool
    grad_outputs: set[int] = field(default_factory=set)

    def freeze(self) -> ModelPass:
        backward = "none" if not self.grad_outputs else ("full" if self.params_trainable else "input")
        return ModelPass(
            self.network, self.args, self.kwargs, self.training, self.grad_enabled, self.autocast, backward,
            tuple(sorted(self.grad_outputs)),
        )  # fmt: skip


def _spec(value: Any) -> Any:
    return TensorSpec.of(value) if isinstance(value, torch.Tensor) else value


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def step_networks(method: nn.Module) -> list[nn.Module]:
    """Every network a training step of ``method`` calls: its own (encoder, heads; module containers opened) and the
    frozen networks it keeps outside its weights (DeACL's teacher). The benchmark times their passes alone."""
    nets: list[nn.Module] = []
    for child in method.children():
        if isinstance(child, nn.ModuleDict):
            nets.extend(child.values())
        elif isinstance(child, nn.ModuleList):
            nets.extend(child)
        else:
            nets.append(child)
    outside = [net for net in method.frozen_networks().values() if not any(net is n for n in nets)]
    return [*nets, *outside]


@contextmanager
def record_model_passes(networks: list[nn.Module], device: torch.device) -> Iterator[list[_Call]]:
    """Record every call of ``networks`` (not of their sub-modules) while the block runs, with the backward each
    call's outputs received. ``[p.freeze() for p in calls]`` after the block gives the :class:`ModelPass` list."""
    calls: list[_Call] = []
    handles = []
    for i, net in enumerate(networks):

        def before(module: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            calls.append(
                _Call(
                    i,
                    tuple(_spec(a) for a in args),
                    tuple(sorted((k, _spec(v)) for k, v in kwargs.items())),
                    module.training,
                    torch.is_grad_enabled(),
                    _autocast_dtype(device),
                    any(p.requires_grad for p in module.parameters()),
                )  # fmt: skip
            )

        def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            call = calls[-1]
            for j, t in enumerate(_tensors(output)):
                if t.requires_grad:
                    t.register_hook(lambda grad, j=j, call=call: call.grad_outputs.add(j))

        handles.append(net.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(net.register_forward_hook(after, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _inputs(p: ModelPass, device: torch.device) -> tuple[list[Any], dict[str, Any]]:
    args = [a.make(device) if isinstance(a, TensorSpec) else a for a in p.args]
    kwargs = {k: v.make(device) if isinstance(v, TensorSpec) else v for k, v in p.kwargs}
    return args, kwargs


def _run_pass(net: nn.Module, p: ModelPass, args: list[Any], kwargs: dict[str, Any], device: torch.device) -> None:
    autocast = torch.autocast(device.type, dtype=p.autocast, enabled=p.autocast is not None)
    net.train(p.training)
    with torch.set_grad_enabled(p.grad_enabled), autocast:
        if p.backward == "input":
            with frozen_parameters(net):
                out = _tensors(net(*args, **kwargs))
                seeds = [out[j] for j in p.grad_outputs]
                leaves = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor) and a.requires_grad]
                torch.autograd.grad(seeds, leaves, [torch.ones_like(s) for s in seeds])
            return
        out = _tensors(net(*args, **kwargs))
        if p.backward == "full":
            seeds = [out[j] for j in p.grad_outputs]
            torch.autograd.backward(seeds, [torch.ones_like(s) for s in seeds])


@contextmanager
def _replaying(networks: list[nn.Module]) -> Iterator[None]:
    """Restore the networks' train/eval flags and buffers (BN statistics) and clear the gradients a replay made."""
    modes = [(m, m.training) for net in networks for m in net.modules()]
    buffers = [(b, b.detach().clone()) for net in networks for b in net.buffers()]
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for net in networks:
            net.zero_grad(set_to_none=True)


def replay_passes(networks: list[nn.Module], passes: list[ModelPass], device: torch.device) -> float:
    """Run the recorded passes one after another, each alone (nothing of the step between them), and return the
    seconds they took: the step's model work without the rest of the step."""
    inputs = [_inputs(p, device) for p in passes]  # made before the clock starts
    with _replaying(networks):
        synchronize(device)
        start = time.perf_counter()
        for p, (args, kwargs) in zip(passes, inputs):
            _run_pass(networks[p.network], p, args, kwargs, device)
        synchronize(device)
        return time.perf_counter() - start


class _FlopCount(TorchDispatchMode):
    # torch's FlopCounterMode also tracks modules with backward hooks, which autograd.grad (the attack) rejects.
    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations (multiply-adds count 2) of the matrix products and convolutions ``fn`` runs,
    forward and backward, by torch's FLOP formulas."""
    with _FlopCount() as counter:
        fn()
    return counter.total


# Dense peak of each data type, TFLOP/s, from the vendors' data sheets (SXM parts; no sparsity).
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "tf32": 494.7},
    "H100": {"bf16": 989.4, "tf32": 494.7},
    "A100": {"bf16": 312.0, "tf32": 156.0},
}


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 2.0) -> float:
    """The best sustained TFLOP/s of a large square matrix product on ``device``: a practical peak where no data
    sheet applies (CPUs)."""
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start) / 1e12)
    return best


def peak_tflops(device: torch.device, mixed_precision: str) -> tuple[float, str]:
    """The peak a step is measured against, and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = "bf16" if mixed_precision == "bf16" else "tf32"
        for model, peaks in GPU_PEAK_TFLOPS.items():
            if model in name:
                return peaks[kind], f"{name} {kind} dense peak (data sheet)"
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    return measured_matmul_tflops(device, dtype), f"measured {str(dtype).removeprefix('torch.')} matmul peak"


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "peak allocated on the GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak resident memory of the process"


@contextmanager
def timed_methods(targets: dict[str, list[tuple[type, str]]], device: torch.device) -> Iterator[dict[str, float]]:
    """Seconds spent inside the given methods (label → [(class, method name)]) while the block runs, synchronising
    the device around each call so the time is the work's own."""
    totals = dict.fromkeys(targets, 0.0)
    saved: list[tuple[type, str, Any]] = []

    def timed(label: str, original: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            synchronize(device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize(device)
                totals[label] += time.perf_counter() - start

        return wrapper

    for label, methods in targets.items():
        for cls, name in methods:
            original = cls.__dict__[name]
            saved.append((cls, name, original))
            setattr(cls, name, timed(label, original))
    try:
        yield totals
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3 if times else math.nan
