"""`make bench` entry point.

    python tests/bench/run.py                 # every case, tables + out/bench/results.json
    python tests/bench/run.py vae sampler     # only groups/modules/cases matching these words
    python tests/bench/run.py --list          # list cases
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import framework  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        framework.run_child(argv[1], argv[2], Path(argv[3]))
    elif argv[:1] == ["--list"]:
        for module, case in framework.discover():
            print(f"{case.group:>14}  {case.name}  ({module})")
    else:
        framework.run_all(argv or None)
