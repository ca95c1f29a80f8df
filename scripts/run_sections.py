#!/usr/bin/env python
"""Run every section's project in order, each feeding the next as docs/how_the_sections_chain.md describes.

    python scripts/run_sections.py            # the full runs (`make sections`), about 70 minutes on 2 CPU cores
    python scripts/run_sections.py --quick    # their small configurations (`make sections QUICK=1`), minutes
    python scripts/run_sections.py --from 4   # start at section 4 (sections 1-3 already ran)

Full runs write into out/<project>/ (the projects' defaults), small ones into out/quick/<project>/, which is
emptied first. Each project's wall time is printed after it; the first failure stops the chain.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (section, script, OUT folder, options of the full run, options of the small run). Sections 4, 5 and 7 start
# from section 2's models in the full chain; their small runs train tiny ones of their own, as the tests do.
CHAIN = [
    (1, "section_1_transformer.py", "section1", ["--threads", "1"], []),
    (2, "section_2_alignment.py", "section2-align", ["--threads", "2"], []),
    (3, "section_3_scaling.py", "section3-scaling", [], []),
    (4, "section_4_finetuning.py", "section4-finetune", ["--base", "out/section2-align/runs/base", "--threads", "2"],
     ["--threads", "1"]),
    (5, "section_5_deployment.py", "section5-deploy", ["--ckpt", "out/section2-align/runs/sft", "--threads", "2"],
     ["--threads", "1"]),
    (6, "section_6_application.py", "section6-application", [], []),
    (7, "section_7_ethics.py", "section7-ethics", ["--section2", "out/section2-align", "--prompts-per-set", "10",
                                                  "--k", "5", "--redteam-limit", "6"], []),  # the page's sizes
]


def commands(quick: bool, start: int = 1) -> list[tuple[int, list[str]]]:
    """The chain's command lines (from section `start` on), as `python projects/...` argument lists."""
    out = []
    for section, script, folder, full, small in CHAIN:
        if section < start:
            continue
        where = Path("out") / ("quick" if quick else "") / folder
        options = ["--quick", *small] if quick else full
        out.append((section, [sys.executable, f"projects/{script}", "--out", str(where), *options]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every project's small configuration (minutes)")
    parser.add_argument("--from", dest="start", type=int, default=1, help="first section to run (default 1)")
    args = parser.parse_args(argv)
    if args.quick:
        shutil.rmtree(REPO / "out" / "quick", ignore_errors=True)
    times = []
    for section, cmd in commands(args.quick, args.start):
        print(f"\n==== section {section}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.run(cmd, cwd=REPO).returncode
        times.append((section, time.perf_counter() - t0))
        print(f"==== section {section}: {times[-1][1]:.0f} s, exit {code}", flush=True)
        if code != 0:
            return code
    print("\n" + "\n".join(f"section {s}: {t:6.0f} s" for s, t in times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
