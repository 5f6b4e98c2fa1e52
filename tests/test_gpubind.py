"""tpmpi.core.gpubind: each process takes the device of its launcher's node-local rank (modulo
the visible devices), with no MPI call, on tests/fake_cupy.py's stand-in CuPy."""
from __future__ import annotations

import warnings

import pytest

import fake_cupy
from tpmpi.core import gpubind


@pytest.mark.parametrize("env,devices,want", [
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "3", "SLURM_LOCALID": "0"}, 2, 1),  # launcher before Slurm
    ({"MPI_LOCALRANKID": "2"}, 4, 2),          # MPICH Hydra / Intel MPI
    ({"PMI_LOCAL_RANK": "5"}, 4, 1),
    ({"MV2_COMM_WORLD_LOCAL_RANK": "1"}, 1, 0),  # srun --gpus-per-task=1: one visible device
    ({"PALS_LOCAL_RANKID": "3"}, 2, 1),        # HPE Cray PALS
    ({"SLURM_LOCALID": "6"}, 4, 2),
])
def test_bind_gpu_reads_the_launchers_local_rank(monkeypatch, env, devices, want):
    for var in gpubind.LOCAL_RANK_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    fake = fake_cupy.install(monkeypatch, devices=devices)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        assert gpubind.bind_gpu() == want
    assert fake.current == want


def test_bind_gpu_without_launcher_variable_takes_device_0_with_a_warning(monkeypatch):
    for var in gpubind.LOCAL_RANK_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    fake = fake_cupy.install(monkeypatch, devices=4)
    with pytest.warns(RuntimeWarning, match="using GPU 0 of the 4 visible"):
        assert gpubind.bind_gpu() == 0
    assert fake.current == 0
    fake_cupy.install(monkeypatch, devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one visible device: nothing to warn about
        assert gpubind.bind_gpu() == 0
