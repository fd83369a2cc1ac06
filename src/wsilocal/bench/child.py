"""Benchmark measurements in a fresh interpreter, so one measurement's memory never colours the next.

A benchmark module ``M`` ends with ``if __name__ == "__main__": print(json.dumps(child_main(spec)))``;
:func:`run_child` starts ``python -m M SPEC_JSON`` and returns the last line of its stdout, parsed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from wsilocal.errors import WsilocalError


def run_child(module: str, spec: dict[str, Any]) -> Any:
    """Run ``python -m module SPEC`` and return its JSON result; a failure is a one-line WsilocalError."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the package's root, in case it is not installed
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(spec)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        cause = lines[-1] if lines else f"exit status {proc.returncode}"
        if proc.returncode < 0:
            cause = f"killed by signal {-proc.returncode} (out of memory?)"
        raise WsilocalError(cause)
    return json.loads(proc.stdout.strip().splitlines()[-1])
