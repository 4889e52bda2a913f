"""`make bench`: run every benchmarks/bench_*.py (each exposes ``run() -> dict`` of measured numbers) and write
benchmarks/results.json with the machine and the date. ``--only NAME`` runs one (e.g. ``--only logprob``).

Targets live here, never in timed tests; docs/benchmarks.md explains each number.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "num_cores": os.cpu_count(), "memory_gib": mem_gib, "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", default=[], help="run only these benchmarks (name after bench_)")
    p.add_argument("--out", default=str(HERE / "results.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results.setdefault("runs", {})
    failed = 0
    for path in sorted(HERE.glob("bench_*.py")):
        name = path.stem[len("bench_"):]
        if args.only and name not in args.only:
            continue
        print(f"[bench] {name} ...", flush=True)
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        t0 = time.time()
        try:
            spec.loader.exec_module(mod)
            numbers = mod.run()
            status = "ok"
        except Exception:  # record the failure, keep the other benchmarks
            numbers, status = {"error": traceback.format_exc().splitlines()[-1]}, "failed"
            failed += 1
        results["runs"][name] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                 "machine": machine(), "seconds": round(time.time() - t0, 1), "status": status,
                                 "results": numbers}
        print(f"[bench] {name}: {status} {json.dumps(numbers)[:400]}", flush=True)
    out_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"[bench] wrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
