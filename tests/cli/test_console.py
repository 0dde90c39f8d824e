"""Console output: plain lines off a terminal, silence with --quiet, the parameter text for the log."""
import io

from rich.console import Console

from jaxscale.cli.console import NullProgress, ProgressCallback, RichProgress, format_parameters
from jaxscale.params import ScaleParams, apply_overrides


def test_plain_progress_off_terminal():
    buf = io.StringIO()
    progress = RichProgress(Console(file=buf, force_terminal=False, width=100))
    assert isinstance(progress, ProgressCallback) and isinstance(NullProgress(), ProgressCallback)
    with progress.phase("outlier rejection", total=4):
        progress.on_advance(4)
    progress.on_phase_start("error model", None)
    progress.log("a = 1.02, b = 0.03")
    progress.on_phase_start("merging", 2)  # starting a phase ends the previous one
    progress.on_phase_end()
    lines = buf.getvalue().splitlines()
    assert lines[0] == "outlier rejection ... (4 steps)" and lines[1].startswith("outlier rejection: done in ")
    assert lines[2] == "error model ..." and lines[3] == "a = 1.02, b = 0.03"
    assert lines[4].startswith("error model: done in") and lines[5] == "merging ... (2 steps)"


def test_terminal_progress_and_quiet():
    buf = io.StringIO()
    progress = RichProgress(Console(file=buf, force_terminal=True, width=100))
    with progress.phase("scaling", total=10):
        for _ in range(10):
            progress.on_advance()
    assert "scaling" in buf.getvalue()
    quiet = io.StringIO()
    silent = RichProgress(Console(file=quiet, force_terminal=False), quiet=True)
    with silent.phase("scaling", total=3):
        silent.on_advance(3)
        silent.log("hidden")
    assert quiet.getvalue() == ""


def test_format_parameters_diff_and_full():
    assert format_parameters(ScaleParams(), diff_only=True) == "# all parameters at their defaults\n"
    p = apply_overrides(ScaleParams(), {"d_min": "1.4", "model": "KB"})
    assert format_parameters(p, diff_only=True) == "model = *KB array dose_decay physical\ncut_data {\n  d_min = 1.4\n}\n"
    full = format_parameters(p, diff_only=False)
    assert "d_min = 1.4" in full and "min_Ih = 25" in full and "compute {" in full


def test_statistics_table_on_terminal_and_text_elsewhere(shared_data):
    """A terminal gets a rich summary table; a pipe gets dials.scale's text block unchanged."""
    import io

    from rich.console import Console

    from jaxscale.cli.console import RichProgress
    from jaxscale.io.expt import read_expt
    from jaxscale.io.refl import read_refl
    from jaxscale.merge.merging import scaled_observations
    from jaxscale.merge.statistics import merging_statistics
    from jaxscale.report.text import merging_report

    ref = shared_data / "lcys_4sweep_dials" / "reference_dials3.12_scale"
    obs = scaled_observations(read_refl(ref / "scaled.refl"), read_expt(ref / "scaled.expt"))
    stats = merging_statistics(obs, n_bins=20)
    text = merging_report(stats)

    tty = io.StringIO()
    RichProgress(Console(file=tty, force_terminal=True, width=120)).show_statistics(stats, text)
    shown = tty.getvalue()
    assert "Summary of merging statistics" in shown and "\u2503" in shown  # a drawn table
    assert "11914" in shown and "0.033" in shown  # dials.scale.log: 11914 obs, Rmerge 0.033

    pipe = io.StringIO()
    RichProgress(Console(file=pipe, force_terminal=False)).show_statistics(stats, text)
    assert pipe.getvalue().strip() == text.strip()


def test_phase_step_names_reach_the_bar():
    """A long phase shows which step runs (e.g. 'scaling: error model') beside its bar."""
    import io

    from rich.console import Console

    from jaxscale.cli.console import RichProgress

    out = io.StringIO()
    progress = RichProgress(Console(file=out, force_terminal=True, width=120))
    progress.on_phase_start("scaling", 3)
    progress.on_phase_describe("error model")
    assert progress._progress.tasks[0].description == "scaling: error model"
    progress.on_advance()
    assert progress._progress.tasks[0].completed == 1
    progress.on_phase_end()
    assert "scaling" in out.getvalue()
