"""scripts/bench.py's process measurement: wall, CPU and peak RSS of one child (os.wait4),
and the time limit (the child's whole session is killed)."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("jaxscale_bench_script", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="GNU time not installed (apt-get install time): "
                    "bench.py then reports wait4's peak, which includes the parent's")
def test_peak_memory_and_cpu_of_one_child(bench, tmp_path):
    # a large parent: a child's wait4 ru_maxrss would include the parent's resident set at the
    # (v)fork, so this fails unless the peak is measured for the child alone
    parent_ballast = np.ones(800 * 2**20 // 8)
    # 300 MB touched (ones, not zeros: calloc pages would stay unmapped), then 0.3 s of busy CPU
    code = ("import time, numpy as np; a = np.ones(300 * 2**20 // 8); t = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\nprint('{\"ok\": 1}')")
    run = bench._run_measured([sys.executable, "-c", code], cwd=str(tmp_path))
    assert run["rc"] == 0 and not run["timed_out"]
    assert 300 <= run["peak_mb"] < 600
    assert run["cpu_s"] >= 0.3
    assert run["wall_s"] >= run["cpu_s"] * 0.5  # one thread: CPU cannot exceed wall by much
    assert run["json_lines"] == ['{"ok": 1}']
    assert not list(tmp_path.iterdir())  # the captured output file is removed
    del parent_ballast


def test_time_limit_kills_the_child_and_its_children(bench, tmp_path):
    # the child starts a grandchild that would outlive it; both must be gone after the limit
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)")
    t0 = time.perf_counter()
    run = bench._run_measured([sys.executable, "-c", code], cwd=str(tmp_path), timeout=2.0)
    assert run["timed_out"] and run["rc"] != 0
    assert 2.0 <= time.perf_counter() - t0 < 20.0
    grandchild = int(run["tail"].split()[0])
    time.sleep(0.2)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
