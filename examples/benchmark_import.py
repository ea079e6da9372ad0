"""What `import diffusers_gaq` costs on top of `import diffusers`: each timed in a fresh process,
back to back, several repeats, alternating so that a change in machine load hits both alike.

    python examples/benchmark_import.py --repeats 7 [--json docs/data/import_time.json]

Wall seconds depend on what else runs on the machine; the CPU seconds of the child process (user +
system) are what an idle core would take, so both are shown. Also checks that the import writes
nothing to stdout / stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATEMENTS = {"python": "pass", "diffusers": "import diffusers", "diffusers_gaq": "import diffusers_gaq"}


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_once(statement: str) -> tuple[float, float, str]:
    """(wall s, CPU s, stdout + stderr) of one fresh interpreter running ``statement``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cpu0, t0 = _child_cpu(), time.perf_counter()
    r = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True, env=env, cwd=ROOT)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - cpu0
    if r.returncode != 0:
        raise SystemExit(f"{statement!r} failed:\n{r.stderr}")
    return wall, cpu, r.stdout + r.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args()
    samples = {name: {"wall": [], "cpu": []} for name in STATEMENTS}
    output = ""
    for _ in range(args.repeats):
        for name, statement in STATEMENTS.items():
            wall, cpu, text = time_once(statement)
            samples[name]["wall"].append(wall)
            samples[name]["cpu"].append(cpu)
            if name == "diffusers_gaq":
                output += text
    med = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs; "
          f"median of {args.repeats} fresh processes each")
    print(f"{'statement':<22} {'wall s':>8} {'CPU s':>8}")
    for name, statement in STATEMENTS.items():
        print(f"{statement:<22} {med[name]['wall']:8.2f} {med[name]['cpu']:8.2f}")
    extra = {k: med["diffusers_gaq"][k] - med["diffusers"][k] for k in ("wall", "cpu")}
    print(f"diffusers_gaq on top of diffusers: {extra['wall']:+.2f} s wall, {extra['cpu']:+.2f} s CPU")
    print("import output:", "none" if not output else repr(output[:500]))
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": samples, "median": med, "extra": extra,
                                               "loadavg_end": os.getloadavg(), "quiet": not output}, indent=2) + "\n")
    return 0 if not output else 1


if __name__ == "__main__":
    sys.exit(main())
