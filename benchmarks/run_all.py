"""The CPU benchmark set in order: quality, speed, then the README sections (``make bench``).

Quality and speed run on the toy model (``t2ialign/assets/toy``) once it is trained; with
``--smoke`` (or while the toy model does not exist yet) both run on a tiny random model in a
minute or two, which checks the scripts end to end but measures nothing meaningful. The
SD1.5-size speed measurement is slow on a CPU and is not part of this set; its stored result
(``results/speed_sd15-config.json``) is rendered by ``report.py`` like the others.

    python benchmarks/run_all.py            # full set on the toy model (budget: 30 min on 2 cores)
    python benchmarks/run_all.py --smoke
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, toy_model_ready  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, fast; checks the scripts")
    args = parser.parse_args(argv)
    smoke = args.smoke or not toy_model_ready()
    if smoke and not args.smoke:
        print("run_all: the toy model is not trained yet (t2ialign/assets/toy): running the smoke set",
              file=sys.stderr)
    backbone = ["--backbone", "tiny-random", "--smoke"] if smoke else ["--backbone", "toy"]
    steps = [
        ("quality", [sys.executable, str(HERE / "quality.py"), *backbone]),
        ("speed", [sys.executable, str(HERE / "speed.py"), *backbone]),
        ("report", [sys.executable, str(HERE / "report.py")]),
    ]
    for name, cmd in steps:
        tic = time.perf_counter()
        print(f"run_all: {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        if proc.returncode != 0:
            print(f"run_all: {name} failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        print(f"run_all: {name} done in {time.perf_counter() - tic:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
