"""`make package-check`: build the wheel and the sdist, check both hold the package's data files, install the
wheel into a fresh venv (no system site-packages) and run `byollm --help` from it, outside the checkout.

    python scripts/package_check.py                   # the wheel alone (--no-deps); its dependencies are seen
                                                      # through a .pth naming this Python's site-packages
    python scripts/package_check.py --clean [--torch "torch==2.13.0"]   # a real clean install: torch first, as
                                                      # the Makefile does, then the wheel with constraints.txt
    ... --keep DIR                                    # build and install under DIR and leave them there

The default needs no network and takes seconds (`make package-check`, after `make test` in .ci/run); --clean
downloads the dependencies (the GitHub workflow's package job).

The data files are every file under byollm/ that git tracks and that is not Python (lm-eval task YAMLs, the
red-team labels, the chat page's static files, ...): pyproject's package-data must list each. Exit 1 on failure,
with the missing files or the failing command's output.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str | Path, cwd: Path = ROOT) -> None:
    """Run a command quietly; on failure show its output and stop."""
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-8000:])
        raise SystemExit(f"package-check: `{shlex.join(map(str, cmd))}` failed (exit {result.returncode})")


def data_files() -> list[str]:
    """The package's non-Python files that git tracks, as paths inside the repository (byollm/...)."""
    out = subprocess.run(["git", "ls-files", "byollm"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sorted(p for p in out.splitlines() if not p.endswith(".py") and "__pycache__" not in p)


def missing(expected: list[str], names: list[str], prefix: str = "") -> list[str]:
    have = {n[len(prefix):] if n.startswith(prefix) else n for n in names}
    return [p for p in expected if p not in have]


def main(argv: list[str]) -> int:
    torch = argv[argv.index("--torch") + 1] if "--torch" in argv else "torch==2.13.0"
    keep = Path(argv[argv.index("--keep") + 1]) if "--keep" in argv else None
    clean = "--clean" in argv
    with tempfile.TemporaryDirectory(prefix="byollm-package-") as tmp:
        work = keep or Path(tmp)
        dist, venv = work / "dist", work / "venv"
        t0 = time.perf_counter()
        # the default builds with this Python's setuptools (offline); --clean in build's own isolated env
        run(sys.executable, "-m", "build", "--outdir", dist, *([] if clean else ["--no-isolation"]), ".")
        (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
        t1 = time.perf_counter()
        expected = data_files()
        in_wheel = missing(expected, zipfile.ZipFile(wheel).namelist())
        with tarfile.open(sdist) as tar:
            top = tar.getnames()[0].split("/")[0] + "/"
            in_sdist = missing(expected, tar.getnames(), prefix=top)
        for what, gone in (("wheel", in_wheel), ("sdist", in_sdist)):
            if gone:
                print(f"package-check: the {what} lacks {', '.join(gone)}: add them to [tool.setuptools.package-data] "
                      "in pyproject.toml", file=sys.stderr)
        if in_wheel or in_sdist:
            return 1
        run(sys.executable, "-m", "venv", "--without-pip" if not clean else "--clear", venv)
        if clean:
            pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet"]
            run(*pip, *shlex.split(torch))
            run(*pip, "-c", ROOT / "constraints.txt", wheel)
        else:  # the wheel alone, by this Python's pip; dependencies from this Python's site-packages, after it
            site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig."
                                        "get_paths()['purelib'])"], capture_output=True, text=True).stdout.strip())
            run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet", "--no-deps",
                "--no-index", wheel)
            ours = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
            (site / "zz_dependencies.pth").write_text("".join(p + "\n" for p in sorted(ours)))
        t2 = time.perf_counter()
        where = subprocess.run([venv / "bin" / "python", "-c", "import byollm; print(byollm.__file__)"], cwd=work,
                               capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(venv)):
            raise SystemExit(f"package-check: byollm was imported from {where or '(nowhere)'}, not from the wheel")
        run(venv / "bin" / "byollm", "--help", cwd=work)  # from outside the checkout: the installed package
        run(venv / "bin" / "python", "-c", "import byollm.safety, importlib.resources as r; "
            "assert r.files('byollm.safety').joinpath('tasks/crows_pairs_local.yaml').is_file()", cwd=work)
        t3 = time.perf_counter()
        print(f"package-check: {wheel.name} and {sdist.name} hold all {len(expected)} data files; the wheel installs "
              f"into a clean venv and `byollm --help` runs (build {t1 - t0:.0f} s, install {t2 - t1:.0f} s, "
              f"run {t3 - t2:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
