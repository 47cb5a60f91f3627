"""Compare the Pareto fronts of two or more sweeps: hypervolume of each (same objectives, same ref) and one plot.

    python tools/compare_fronts.py --ref 2,2 --out fronts.png grid=multirun/A nsga2=multirun/B

Each sweep is summarised as `mtlsparse report` does (its successful runs, the ε-non-dominated
ones over the objectives, default every test/<task>/loss, minimised unless `max:`), so the
numbers equal those in each sweep's report.json. Prints one line per sweep and a JSON summary;
the plot shows every run faintly and each front as a connected line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtlsparse import pareto  # noqa: E402
from mtlsparse.reporting.collect import collect  # noqa: E402
from mtlsparse.reporting.tables import loss_objectives  # noqa: E402


def front_of(sweep_dir: Path, specs: list[str] | None, ref: list[float] | None) -> dict:
    """The sweep's successful runs, its front and hypervolume (as `mtlsparse report` computes them)."""
    ok = [row for row in collect(sweep_dir) if row["status"] == "ok"]
    specs = specs or loss_objectives(ok)
    result = pareto.pareto_front(ok, specs, ref, 0.0)
    return {"runs": ok, "specs": specs, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", help="LABEL=SWEEP_DIR")
    parser.add_argument("--objectives", type=lambda s: s.split(","), help="metric keys (default test/<task>/loss)")
    parser.add_argument("--ref", type=lambda s: [float(v) for v in s.split(",")], help="hypervolume reference")
    parser.add_argument("--out", type=Path, default=Path("fronts.png"), help="plot file")
    args = parser.parse_args(argv)

    fronts = {}
    for item in args.sweeps:
        label, _, path = item.partition("=")
        fronts[label] = front_of(Path(path), args.objectives, args.ref)
    specs = {tuple(f["specs"]) for f in fronts.values()}
    if len(specs) != 1:
        parser.error(f"the sweeps have different objectives: {sorted(specs)}")
    keys = [pareto.parse_objective(s)[0] for s in next(iter(specs))]

    fig = Figure(figsize=(6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    summary = {}
    for i, (label, f) in enumerate(fronts.items()):
        colour = f"C{i}"
        xs, ys = ([pareto.as_float(r.get(k)) for r in f["runs"]] for k in keys[:2])
        ax.plot(xs, ys, "o", color=colour, alpha=0.3)
        front = sorted(f["front"], key=lambda r: pareto.as_float(r.get(keys[0])))
        fx, fy = ([pareto.as_float(r.get(k)) for r in front] for k in keys[:2])
        hv = f["hypervolume"]
        ax.plot(fx, fy, "o-", color=colour, label=f"{label}: HV {hv:.4g} ({len(front)}/{len(f['runs'])} runs)")
        summary[label] = {"hypervolume": hv, "front": [r["job"] for r in front], "runs": len(f["runs"]),
                          "ref": f["ref"]}
        print(f"{label}: hypervolume {hv:.6g} (ref {f['ref']}), {len(front)} of {len(f['runs'])} runs on the front")
    ax.set(xlabel=keys[0], ylabel=keys[1], title="Pareto fronts (test objectives)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(args.out, dpi=110)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
