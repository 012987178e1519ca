"""GPU detection through NVML (faked here: this machine has none), the CPU fallback, the card catalog."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

from qlora_studio import hardware
from qlora_studio.hardware import CPU_STATEMENT, describe_machine, detect_gpus, find_gpu, probe_gpus


def test_no_nvml_library_gives_the_cpu_statement(monkeypatch):
    def missing():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    assert detect_gpus() == []
    machine = describe_machine()
    assert not machine.has_gpu
    assert machine.statement.startswith(CPU_STATEMENT)
    assert "driver" in machine.no_gpu_reason
    assert machine.cpu_cores >= 1
    assert f"{machine.cpu_cores} cores" in machine.statement


def test_real_call_on_this_machine_never_raises():
    gpus, reason = probe_gpus()
    assert isinstance(gpus, list)
    assert gpus or reason  # an empty list always comes with a reason
    assert "GiB RAM" in describe_machine().statement or describe_machine().ram_total_bytes is None


def test_missing_package_is_a_reason_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    gpus, reason = probe_gpus()
    assert gpus == [] and "nvidia-ml-py" in reason


@pytest.mark.parametrize("error", [pynvml.NVMLError_DriverNotLoaded, pynvml.NVMLError_Unknown, RuntimeError])
def test_any_init_failure_is_a_reason(monkeypatch, error):
    def fail():
        raise error() if error is not RuntimeError else RuntimeError("broken")

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    gpus, reason = probe_gpus()
    assert gpus == [] and reason


def _fake_nvml(monkeypatch, *, count=1, name="NVIDIA GeForce RTX 3060", cc=(8, 6), fail_on=None):
    """Replace the pynvml calls hardware.py uses with a fake device."""
    def maybe_fail(fn_name, value):
        if fn_name == fail_on:
            raise pynvml.NVMLError_NotSupported()
        return value

    procs = [SimpleNamespace(pid=4242, usedGpuMemory=1_500 * 2**20)]
    calls = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: count,
        "nvmlDeviceGetHandleByIndex": lambda i: f"handle{i}",
        "nvmlDeviceGetName": lambda h: name,
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(total=12 * 2**30, free=10 * 2**30, used=2 * 2**30),
        "nvmlDeviceGetCudaComputeCapability": lambda h: maybe_fail("cc", cc),
        "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=37, memory=5),
        "nvmlSystemGetCudaDriverVersion": lambda: 12040,
        "nvmlSystemGetDriverVersion": lambda: "550.54.14",
        "nvmlDeviceGetTemperature": lambda h, sensor: maybe_fail("temp", 51),
        "nvmlDeviceGetComputeRunningProcesses": lambda h: procs,
        "nvmlDeviceGetGraphicsRunningProcesses": lambda h: [],
    }
    for fn, impl in calls.items():
        monkeypatch.setattr(pynvml, fn, impl)


def test_fake_device_is_read_fully(monkeypatch):
    _fake_nvml(monkeypatch)
    (g,) = detect_gpus()
    assert g.name == "NVIDIA GeForce RTX 3060"
    assert g.total_bytes == 12 * 2**30 and g.free_bytes == 10 * 2**30
    assert g.other_processes_bytes == 1_500 * 2**20
    assert g.cuda_driver_version == "12.4" and g.driver_version == "550.54.14"
    assert g.compute_capability == (8, 6) and g.bf16
    assert g.temperature_c == 51 and g.utilization_pct == 37
    machine = describe_machine()
    assert machine.has_gpu and "RTX 3060" in machine.statement
    json.dumps(machine.to_dict())  # serialisable


def test_bf16_follows_compute_capability_not_emulation(monkeypatch):
    _fake_nvml(monkeypatch, name="Tesla T4", cc=(7, 5))
    (g,) = detect_gpus()
    assert not g.bf16 and g.compute_dtype == "fp16"


def test_unsupported_query_leaves_a_field_empty(monkeypatch):
    _fake_nvml(monkeypatch, fail_on="temp")
    (g,) = detect_gpus()
    assert g.temperature_c is None and g.total_bytes > 0


def test_zero_devices_is_a_reason(monkeypatch):
    _fake_nvml(monkeypatch, count=0)
    gpus, reason = probe_gpus()
    assert gpus == [] and "no GPU" in reason


@pytest.mark.parametrize("name, label, cc", [
    ("rtx 3060", "RTX 3060 12 GB", (8, 6)),
    ("RTX3060 12GB", "RTX 3060 12 GB", (8, 6)),
    ("rtx 3060 8gb", "RTX 3060 8 GB", (8, 6)),
    ("T4", "T4 16 GB", (7, 5)),
    ("Tesla T4", "T4 16 GB", (7, 5)),
    ("NVIDIA GeForce RTX 3060 Laptop GPU", "RTX 3060 Laptop 6 GB", (8, 6)),
    ("NVIDIA A100-SXM4-80GB", "A100 80 GB", (8, 0)),
    ("NVIDIA H100 80GB HBM3", "H100 80 GB", (9, 0)),
    ("gtx 1080ti", "GTX 1080 Ti 11 GB", (6, 1)),
    ("4060 ti 16gb", "RTX 4060 Ti 16 GB", (8, 9)),
    ("NVIDIA RTX A6000", "RTX A6000 48 GB", (8, 6)),
])
def test_find_gpu_is_tolerant(name, label, cc):
    g = find_gpu(name)
    assert g is not None and g.label == label and g.compute_capability == cc
    assert g.bf16 == (cc >= (8, 0))


def test_find_gpu_unknown_is_none():
    assert find_gpu("rtx 9090") is None
    assert find_gpu("") is None
    assert "RTX 5090" in hardware.close_gpu_names("rtx 9090")


def test_catalog_covers_the_families():
    kinds = {g.kind for g in hardware.GPU_CATALOG}
    assert kinds == {"desktop", "laptop", "workstation", "datacenter"}
    for name in ("GTX 1060", "GTX 1660", "RTX 2080 Ti", "RTX 3090", "RTX 4090", "RTX 5090", "RTX 4070 Laptop",
                 "Quadro RTX 8000", "RTX A4000", "L4", "A10G", "A100", "H100"):
        assert find_gpu(name) is not None, name


def test_cli_gpu_json_on_this_machine():
    # run from the repository root so that this checkout's package is the one imported
    out = subprocess.run([sys.executable, "-m", "qlora_studio.cli", "gpu", "--json"],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= {"gpus", "no_gpu_reason", "statement", "cpu_cores", "ram_total_bytes"}
    if not data["gpus"]:
        assert data["statement"].startswith(CPU_STATEMENT)
