"""CI: the package a user installs (the wheel, not the checkout) holds every module and runs README's commands.

Run from the root of a clone, with the interpreter whose site-packages hold the dependencies:

    python .ci/check_wheel.py WORK_DIR

1. builds the wheel (``pip wheel --no-deps``) into WORK_DIR/wheel;
2. checks its contents against the source tree: every tracked module of ``lightning_msvag/``,
   ``models/`` and ``datamodules/``, every shipped config and the embedded text, under
   ``lightning_msvag/`` (the problem packages as ``lightning_msvag.models`` /
   ``lightning_msvag.datamodules``), and no other top-level name;
3. installs it (``pip install --no-deps --target``) into WORK_DIR/site, outside the checkout;
4. from an empty folder, with only that installation of the project importable, runs
   ``--help``, ``configs --write .``, ``reproduce EXPERIMENT --help`` for each experiment and a
   5-step ``fit`` of the shipped char-RNN config on the embedded text.

Exits non-zero, naming what failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

#: repository folder -> where its files land in the wheel
INSTALLED_AS = {"lightning_msvag": "lightning_msvag", "models": "lightning_msvag/models",
                "datamodules": "lightning_msvag/datamodules", "configs": "lightning_msvag/configs"}
EXPERIMENTS = ("sqp", "factors", "wilson", "benchmark")


def _run(command, cwd, env=None, timeout=900):
    print("$", " ".join(str(c) for c in command), flush=True)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"check_wheel: failed (exit {result.returncode}): {' '.join(map(str, command))}\n"
                         f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def expected_files(repo: Path) -> set:
    """The wheel paths of the tracked files that must ship."""
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    wanted = set()
    for path in tracked:
        top, _, rest = path.partition("/")
        if top not in INSTALLED_AS or not rest:
            continue
        if path.endswith(".py") or (top == "configs" and path.endswith(".yaml")) or path.endswith(".xz"):
            wanted.add(f"{INSTALLED_AS[top]}/{rest}")
    return wanted


def main() -> None:
    work = Path(sys.argv[1]).resolve()
    repo = Path.cwd()
    python = sys.executable
    wheel_dir, site, empty = work / "wheel", work / "site", work / "empty"
    for folder in (wheel_dir, site, empty):
        folder.mkdir(parents=True, exist_ok=True)
    _run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), "."], repo)
    (wheel,) = wheel_dir.glob("lightning_msvag-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(expected_files(repo) - names)
    if missing:
        raise SystemExit(f"check_wheel: {len(missing)} files of the source tree are not in {wheel.name}: {missing}")
    tops = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
    if tops != ["lightning_msvag"]:
        raise SystemExit(f"check_wheel: the wheel installs top-level names {tops}; only lightning_msvag is ours to claim")
    print(f"check_wheel: {wheel.name}: {len(names)} files, every module and config of the source tree, one top-level name")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], repo)

    env = {**os.environ, "PYTHONPATH": str(site), "MPLBACKEND": "Agg"}
    command = [python, "-m", "lightning_msvag"]
    found = _run([python, "-c", "import lightning_msvag; print(lightning_msvag.__file__)"], empty, env).stdout.strip()
    if not found.startswith(str(site)):
        raise SystemExit(f"check_wheel: lightning_msvag imported from {found}, not from the installed wheel in {site}")
    _run(command + ["--help"], empty, env)
    _run(command + ["fit", "--help"], empty, env)
    _run(command + ["configs", "--write", "."], empty, env)
    for experiment in EXPERIMENTS:
        _run(command + ["reproduce", experiment, "--help"], empty, env)
    _run(command + ["fit", "--config", "configs/tolstoi_char_rnn.yaml", "--trainer.max_steps", "5",
                    "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"], empty, env)
    if not list((empty / "lightning_logs" / "tolstoi_char_rnn").rglob("last.ckpt")):
        raise SystemExit("check_wheel: the 5-step fit wrote no last.ckpt")
    print("check_wheel: the installed wheel runs --help, configs --write, reproduce --help (all four) and a 5-step fit")


if __name__ == "__main__":
    main()
