"""The command line raises glibc's mmap/trim thresholds so large numpy temporaries reuse heap
pages instead of faulting in fresh ones (docs/serial.md)."""
import os
import subprocess
import sys

import pytest

from jaxscale.cli import main as cli_main


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


@pytest.mark.skipif(not _is_glibc(), reason="mallopt tuning is glibc-only")
def test_tune_malloc_applies_and_big_temporaries_stop_faulting():
    # In a fresh interpreter (mallopt is process-wide): freeing and re-allocating an 80 MB
    # array must reuse heap pages, i.e. (nearly) no new page faults after the first round.
    code = (
        "import resource, numpy as np\n"
        "from jaxscale.cli.main import _tune_malloc\n"
        "assert _tune_malloc()\n"
        "a = np.ones(10_000_000); del a\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5):\n"
        "    a = np.ones(10_000_000); del a\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    faults = int(out.stdout.split()[-1])
    # Without the tuning each round faults in 80 MB afresh (measured: ~3000 faults here).
    assert faults < 100, faults


def test_thresholds_are_bounded():
    # Above the thresholds memory still goes straight back to the kernel.
    assert cli_main.MMAP_THRESHOLD_BYTES <= 1 << 30
    assert cli_main.TRIM_THRESHOLD_BYTES <= 1 << 30
