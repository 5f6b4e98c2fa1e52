"""tpmpi.core.devices: the GPU-aware probe's decisions (tests/fake_device.py's FakeDevice: a GPU
backend without GPU-aware MPI) and the device-sharing warning. (The decision made once per
communicator, on nested and overlapping communicators: test_subcomm.py.)"""
from __future__ import annotations

import pytest

from fake_device import FakeDevice
from tpmpi.core import devices
from tpmpi.core.backend import get_backend


@pytest.mark.parametrize("env,library,want", [
    ("0", True, False),    # forced off, whatever the library says
    ("1", False, True),    # forced on, no test
    ("", False, False),    # library without CUDA support -> staging
    ("", None, False),     # library without MPIX_Query_cuda_support -> staging
    ("", True, True),      # library claims support and the device Allreduce checks out
])
def test_probe_gpu_aware_decision(monkeypatch, env, library, want):
    from mpi4py import MPI

    monkeypatch.setenv("TPMPI_GPU_AWARE", env)
    monkeypatch.setattr(devices, "_library_cuda_support", lambda: library)
    assert devices.probe_gpu_aware(MPI.COMM_SELF, FakeDevice()) is want
    assert devices.probe_gpu_aware(MPI.COMM_SELF, get_backend("numpy")) is False


def test_probe_falls_back_when_the_device_allreduce_fails(monkeypatch):
    from mpi4py import MPI

    monkeypatch.setenv("TPMPI_GPU_AWARE", "")
    monkeypatch.setattr(devices, "_library_cuda_support", lambda: True)
    monkeypatch.setattr(devices, "_device_allreduce_ok", lambda comm, backend: False)
    assert devices.probe_gpu_aware(MPI.COMM_SELF, FakeDevice()) is False
    monkeypatch.setenv("TPMPI_GPU_AWARE", "yes")
    with pytest.raises(ValueError, match="TPMPI_GPU_AWARE='yes': expected 0 or 1"):
        devices.probe_gpu_aware(MPI.COMM_SELF, FakeDevice())


@pytest.mark.mpi
def test_probe_is_collective(world, monkeypatch):
    monkeypatch.setenv("TPMPI_GPU_AWARE", "")
    rank = world.comm.Get_rank()
    monkeypatch.setattr(devices, "_library_cuda_support", lambda: rank != 1)
    assert devices.probe_gpu_aware(world.comm, FakeDevice()) is (world.size == 1)


def test_sharing_warning_compares_physical_devices():
    assert devices.sharing_message(["0000:3b:00.0", "0000:5e:00.0"]) is None
    msg = devices.sharing_message(["0000:3b:00.0"] * 4)
    assert msg.startswith("4 ranks share 1 GPU(s) on this node")
