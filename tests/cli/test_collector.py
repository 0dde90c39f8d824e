"""The command pauses the garbage collector over its imports, then freezes what they made and
turns it back on (jaxscale/cli/main.py), so cyclic garbage made by the run is still collected."""
import subprocess
import sys


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_collector_is_back_on_after_the_engine_import_with_the_imports_frozen():
    code = (
        "import gc\n"
        "from jaxscale.cli import main as m\n"
        "m._pause_collector()\n"
        "print(gc.isenabled())\n"
        "m._engine('jaxscale.io.refl', 'read_refl', 'reader')\n"
        "print(gc.isenabled(), gc.get_freeze_count() > 50_000, gc.get_threshold()[0] == m.GC_YOUNG_THRESHOLD)\n"
        # a reference cycle made afterwards is still collected
        "class Node: pass\n"
        "a = Node(); a.self = a; del a\n"
        "print(gc.collect() >= 1)\n")
    assert _run(code) == ["False", "True", "True", "True", "True"]


def test_a_caller_that_turned_the_collector_off_keeps_it_off():
    code = (
        "import gc\n"
        "gc.disable()\n"
        "from jaxscale.cli import main as m\n"
        "m._pause_collector(); m._resume_collector()\n"
        "print(gc.isenabled(), gc.get_freeze_count())\n")
    assert _run(code) == ["False", "0"]


def test_importing_jaxscale_restores_the_callers_collector_state():
    assert _run("import gc; import jaxscale; print(gc.isenabled())") == ["True"]
    assert _run("import gc; gc.disable(); import jaxscale; print(gc.isenabled())") == ["False"]
