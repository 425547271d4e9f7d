"""How long `compkit demo` takes, stage by stage (issue: at most 5 minutes after setup).

Runs the whole pipeline on the built-in demo study into a fresh temporary run folder and
prints each stage's wall time (from the pipeline record), each decision, and on the LAST
line the total. Run it on an otherwise idle machine, under the shared benchmark lock::

    flock /tmp/bench.lock python benchmarks/demo_time.py [--keep DIR]

The first run also converts SmolLM2 to its fp32 folder (cached in ~/.cache/compkit); run it
twice and read the second figure for "after setup".
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kit.pipeline import run_pipeline
from kit.resources import demo_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="run folder to keep (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp) / "runs" / "demo"
        start = time.perf_counter()
        result = run_pipeline(demo_dir() / "study.yaml", out, progress=False)
        total = time.perf_counter() - start
        for name, rec in result.record.stages.items():
            print(f"stage {name:<12} {rec.wall_s or 0:8.1f} s  {rec.status}")
        verdict = out / "verdict.json"
        if verdict.exists():
            from kit.verdicts import VerdictReport

            for d in VerdictReport.load(out).decisions:
                print(f"decision {d.candidate}: {d.decision} ({d.reason})")
        print(f"demo total: {total:.1f} s")


if __name__ == "__main__":
    main()
