#!/usr/bin/env python
"""Write simulated integrated data with planted truth (integrated.refl/.expt, truth.npz).

    python scripts/simulate.py rotation --n-obs 1000000 --out DIR
    python scripts/simulate.py stills --n-stills 100000 --obs-per-still 100 --out DIR [--hdf5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="output directory")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--space-group", default=None, help="e.g. 'P 21 21 21', 'P 4'")
    common.add_argument("--cell", type=float, nargs=6, default=None, metavar=("A", "B", "C", "AL", "BE", "GA"))
    common.add_argument("--d-min", type=float, default=None)
    common.add_argument("--outlier-fraction", type=float, default=None)
    common.add_argument("--error-model", type=float, nargs=2, default=None, metavar=("A", "B"))
    common.add_argument("--anomalous", type=float, default=0.0, help="relative Bijvoet difference sd")
    common.add_argument("--hdf5", action="store_true", help="also write integrated.h5 (jaxscale.io.hdf5)")

    rot = sub.add_parser("rotation", parents=[common], help="one rotation sweep (physical-model truth)")
    rot.add_argument("--n-obs", type=int, default=100_000)
    rot.add_argument("--n-images", type=int, default=3600)
    rot.add_argument("--osc-width", type=float, default=0.1)
    rot.add_argument("--absorption", type=float, default=0.05, help="RMS of the absorption surface")

    st = sub.add_parser("stills", parents=[common], help="serial stills, one experiment each (KB truth)")
    st.add_argument("--n-stills", type=int, default=1000)
    st.add_argument("--obs-per-still", type=int, default=100)
    st.add_argument("--ambiguity-fraction", type=float, default=0.0)
    st.add_argument("--partiality-noise", type=float, default=0.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from jaxscale.sim import simulate_rotation_sweep, simulate_stills, write_simulation

    if args.hdf5:
        try:
            from jaxscale.io.hdf5 import save_table  # noqa: F401
        except ImportError:
            print("error: --hdf5 needs jaxscale.io.hdf5.save_table, which this installation lacks", file=sys.stderr)
            return 2
    options = {"seed": args.seed, "anomalous_signal": args.anomalous}
    for name in ("space_group", "cell", "d_min", "outlier_fraction", "error_model"):
        value = getattr(args, name)
        if value is not None:
            options[name] = tuple(value) if isinstance(value, list) else value
    t0 = time.perf_counter()
    if args.kind == "rotation":
        table, experiments, truth = simulate_rotation_sweep(
            args.n_obs, n_images=args.n_images, osc_width=args.osc_width,
            absorption_strength=args.absorption, **options)
    else:
        table, experiments, truth = simulate_stills(
            args.n_stills, args.obs_per_still, ambiguity_fraction=args.ambiguity_fraction,
            partiality_noise=args.partiality_noise, **options)
    t1 = time.perf_counter()
    print(f"simulated {len(table)} observations in {len(experiments)} experiment(s) "
          f"({truth['space_group']}, cell {tuple(round(float(x), 2) for x in truth['unit_cell'])}) "
          f"in {t1 - t0:.1f} s")
    try:
        written = write_simulation(args.out, table, experiments, truth, hdf5=args.hdf5)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t2 = time.perf_counter()
    for kind, path in written.items():
        print(f"  wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"written in {t2 - t1:.1f} s (total {t2 - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
