"""adlib imports and measures memory on Windows and macOS too (simulated here on Linux)."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import types

import pytest

evaluate = importlib.import_module("adlib.evaluate")  # the module: adlib.evaluate is also a function


def test_import_adlib_without_the_posix_resource_module():
    """Windows has no ``resource`` module: ``import adlib`` must not need it."""
    code = ("import sys; sys.modules['resource'] = None  # as on Windows: `import resource` fails\n"
            "import adlib, adlib.bench\n"
            "from adlib.evaluate import PeakMemory, rss_mb\n"
            "with PeakMemory('cpu') as peak:\n"
            "    pass\n"
            "print('ok', rss_mb() > 0, peak.peak_mb > 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "True", "True"]


def _no_proc(monkeypatch):
    """Make ``/proc/self/statm`` unreadable, as on every system but Linux."""
    def fake_open(path, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(evaluate, "open", fake_open, raising=False)


def _fake_resource(ru_maxrss: int) -> types.ModuleType:
    module = types.ModuleType("resource")
    module.RUSAGE_SELF = 0
    module.getrusage = lambda who: types.SimpleNamespace(ru_maxrss=ru_maxrss)
    return module


@pytest.mark.parametrize("platform, expected_mb", [("darwin", 3.0), ("linux", 3.0 * 1024)])
def test_ru_maxrss_units_bytes_on_macos_kib_elsewhere(monkeypatch, platform, expected_mb):
    _no_proc(monkeypatch)
    monkeypatch.setitem(sys.modules, "resource", _fake_resource(3 * 2**20))
    monkeypatch.setattr(sys, "platform", platform)
    assert evaluate.rss_mb() == pytest.approx(expected_mb)


def test_windows_uses_psutil_when_installed(monkeypatch):
    _no_proc(monkeypatch)
    monkeypatch.setitem(sys.modules, "resource", None)
    fake = types.ModuleType("psutil")
    fake.Process = lambda: types.SimpleNamespace(memory_info=lambda: types.SimpleNamespace(rss=5 * 2**20))
    monkeypatch.setitem(sys.modules, "psutil", fake)
    monkeypatch.setattr(sys, "platform", "win32")
    assert evaluate.rss_mb() == pytest.approx(5.0)


def test_memory_is_nan_not_zero_when_it_cannot_be_measured(monkeypatch):
    _no_proc(monkeypatch)
    monkeypatch.setitem(sys.modules, "resource", None)
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(sys, "platform", "win32")

    def no_win32_call() -> float:
        raise OSError("GetProcessMemoryInfo failed")

    monkeypatch.setattr(evaluate, "_windows_working_set_mb", no_win32_call, raising=False)
    assert math.isnan(evaluate.rss_mb())
    with evaluate.PeakMemory("cpu", interval_s=0.001) as peak:
        pass
    assert math.isnan(peak.peak_mb)
