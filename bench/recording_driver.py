"""A Triton driver for a machine without a GPU: kernels compile for a real GPU target (ptxas runs
on the CPU) and every launch goes through Triton's whole host path, JITFunction.run included, up
to the driver's launcher, which records the launch instead of running it.

What it is for: measuring the host time of the op layer's calls, kernel launches included, on any
machine (bench/host_overhead.py). The kernels' outputs stay uninitialized. Use it in a process of
its own, without TRITON_INTERPRET (a kernel is interpreted or compiled for good when it is
imported):

    with recording_driver() as recorder:
        ...  # launchers on CPU tensors
        recorder.launches  # [Launch(kernel, function, grid, args), ...]
"""
from __future__ import annotations

import contextlib
import gc
import itertools
from typing import Iterator, List, NamedTuple, Tuple

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from timellm_fast.kernels._environment import interpreting


class Launch(NamedTuple):
    kernel: object  # the @triton.jit function
    function: int  # the loaded-function handle of the CompiledKernel that was launched
    grid: Tuple[int, int, int]
    args: tuple  # every argument in signature order, constexprs included, as the launcher got them
    num_warps: int
    num_stages: int


class _Utils:
    """The driver's binary loader: a fresh handle per loaded kernel, nothing loaded."""

    def __init__(self, properties: dict):
        self._handles = itertools.count(1)
        self._properties = properties

    def load_binary(self, name, kernel, shared, device):  # -> (module, function, n_regs, n_spills, max threads)
        return next(self._handles), next(self._handles), 0, 0, 1024

    def unload_module(self, module) -> None:
        pass

    def get_device_properties(self, device) -> dict:
        return self._properties


class RecordingDriver:
    """The driver interface JITFunction.run and CompiledKernel use, for one device of `arch`."""

    def __init__(self, arch: int = 90, record: bool = True):
        self.arch = arch
        self.record = record
        self.launches: List[Launch] = []
        # an H100/H200's limits (what the compiled kernels are checked against when loaded)
        self.utils = _Utils({"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                             "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                             "mem_bus_width": 5120})
        self.launched_kernels: set = set()
        recorder = self

        class Launcher:
            def __init__(self, src, metadata):
                self.kernel = src.fn
                self.num_warps, self.num_stages = metadata.num_warps, metadata.num_stages
                recorder.launched_kernels.add(src.fn)

            def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
                         enter_hook, exit_hook, *args):
                if recorder.record:
                    recorder.launches.append(Launch(self.kernel, function, (grid_x, grid_y, grid_z), args,
                                                    self.num_warps, self.num_stages))

        self.launcher_cls = Launcher

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_device_capability(self, device=None) -> tuple:
        return divmod(self.arch, 10)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    @staticmethod
    def is_active() -> bool:
        return True


@contextlib.contextmanager
def recording_driver(arch: int = 90, record: bool = True) -> Iterator[RecordingDriver]:
    """Makes a RecordingDriver Triton's active driver inside the block. On leaving, the compiled
    kernels it loaded (Triton's per-device caches of the kernels launched) are dropped, still
    under it: their handles mean nothing to a real driver. (A CompiledKernel the caller still holds
    is unloaded later by whatever driver is active then.)"""
    if interpreting():
        raise RuntimeError("recording_driver needs compiled kernels: unset TRITON_INTERPRET for this process")
    recorder = RecordingDriver(arch, record)
    previous = driver._active  # None until a driver was needed: restored as it was, not created
    driver.set_active(recorder)
    try:
        yield recorder
    finally:
        # dropped while the recorder is still the driver that unloads them
        for kernel in recorder.launched_kernels:
            kernel.device_caches.clear()
        gc.collect()
        driver.set_active(previous)
