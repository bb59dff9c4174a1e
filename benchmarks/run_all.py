"""Run every benchmark under benchmarks/ at one size and collect the results in one JSON file.

    python -m benchmarks.run_all --size small     # CPU-sized, minutes on 2 cores
    python -m benchmarks.run_all --size large --budget-s 540   # GPU-sized

Each ``benchmarks/<name>.py`` present is run as ``python -m benchmarks.<name>`` in its own
process (a crash or timeout is recorded, the others still run), with the size's flags from the
table below (flags a script does not declare with ``add_argument`` are dropped and listed) and
``--out`` pointing at a scratch file. Scripts not in the table run with ``--out`` only, at both
sizes. Absent scripts are listed as absent. The combined file is
``benchmarks/results/run_all_<size>_<machine>_<date>.json`` (machine = accelerator kind and count
plus host name), holding each script's command, wall time, exit code and its own JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name: {size: flags}. "large" sizes are for one GPU; "small" fits a 2-core CPU.
FLAGS = {
    "hypergrad": {"small": ["--small"], "large": []},
    "logra_logging": {"small": ["--size", "small", "--repeats", "2"], "large": ["--size", "full"]},
    "store": {
        "small": ["--rows", "20000", "--reps", "1", "--logix-rows", "0"],
        "large": [
            "--rows",
            "1048576",
            "--layers",
            "16",
            "--k-out",
            "16",
            "--k-in",
            "16",
            "--queries",
            "1,64,256",
        ],
    },
    "lds": {"small": ["--small"], "large": []},
    "brittleness": {"small": ["--small"], "large": []},
    "mwn_speed": {
        "small": ["--hidden", "64", "--batch", "64", "--iters", "10", "--repeats", "1"],
        "large": ["--hidden", "1024", "--batch", "256", "--iters", "200"],
    },
    "mwn_digits": {"small": ["--seeds", "1", "--steps", "100"], "large": []},
    "noisy_digits": {"small": ["--seeds", "1", "--steps", "100"], "large": []},
    "domain_digits": {"small": ["--seeds", "1", "--steps", "100"], "large": []},
    "scale": {"small": ["--size", "small"], "large": ["--size", "large"]},
}
SKIP = {"run_all"}
# Run order: the scale-out benchmarks first, so a time budget cuts the least important.
PRIORITY = [
    "scale",
    "logra_logging",
    "store",
    "hypergrad",
    "mwn_speed",
    "lds",
    "mwn_digits",
    "noisy_digits",
    "domain_digits",
    "brittleness",
]
TIMEOUT = {"small": 600, "large": 3600}


def discover() -> list[str]:
    names = [
        f[:-3]
        for f in sorted(os.listdir(HERE))
        if f.endswith(".py") and not f.startswith("_") and f[:-3] not in SKIP
    ]
    rank = {n: i for i, n in enumerate(PRIORITY)}
    return sorted(names, key=lambda n: (rank.get(n, len(PRIORITY)), n))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def machine() -> dict:
    """Accelerator kind/count from a child process (the parent never initialises a GPU)."""
    code = (
        "import jax, json; d = jax.devices(); print(json.dumps({'backend': "
        "jax.default_backend(), 'device_kind': d[0].device_kind, 'device_count': len(d), "
        "'jax': jax.__version__}))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=_env(),
            text=True,
            capture_output=True,
            timeout=300,
        )
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # still write a result
        info = {"backend": "unknown", "device_kind": "unknown", "device_count": 0, "error": repr(e)}
    info["host"] = platform.node()
    info["cpus"] = os.cpu_count()
    return info


def accepted_flags(name: str) -> set[str] | None:
    """Flags the script declares (``add_argument("--x"...)``, read from its source; no import)."""
    with open(os.path.join(HERE, f"{name}.py")) as f:
        src = f.read()
    flags = set(re.findall(r"add_argument\(\s*[\"'](--[A-Za-z0-9][A-Za-z0-9_-]*)", src))
    return flags or None


def filter_flags(flags: list[str], accepted: set[str] | None) -> tuple[list[str], list[str]]:
    if accepted is None:
        return flags, []
    keep, dropped, i = [], [], 0
    while i < len(flags):
        f = flags[i]
        vals = []
        j = i + 1
        while j < len(flags) and not flags[j].startswith("--"):
            vals.append(flags[j])
            j += 1
        (keep if f in accepted else dropped).extend([f] + vals)
        i = j
    return keep, dropped


def run_one(name: str, size: str, scratch: str, timeout: float) -> dict:
    out = os.path.join(scratch, f"{name}.json")
    flags = FLAGS.get(name, {}).get(size, [])
    flags, dropped = filter_flags(flags, accepted_flags(name))
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *flags, "--out", out]
    shown = " ".join(["python", "-m", f"benchmarks.{name}", *flags])
    print(f"[run_all] {shown}", flush=True)
    t0 = time.perf_counter()
    rec = {"command": shown, "dropped_flags": dropped, "known": name in FLAGS}
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=_env(), text=True, capture_output=True, timeout=timeout
        )
        rec["returncode"] = proc.returncode
        if proc.returncode != 0:
            rec["stderr_tail"] = proc.stderr[-3000:]
    except subprocess.TimeoutExpired as e:
        rec["returncode"] = None
        rec["error"] = f"timed out after {timeout:.0f} s"
        rec["stderr_tail"] = (
            (e.stderr or b"")[-3000:].decode(errors="replace")
            if isinstance(e.stderr, bytes)
            else (e.stderr or "")[-3000:]
        )
    rec["wall_s"] = time.perf_counter() - t0
    if os.path.exists(out):
        with open(out) as f:
            try:
                rec["result"] = json.load(f)
            except json.JSONDecodeError as e:
                rec["error"] = f"unreadable JSON: {e}"
    print(f"[run_all] {name}: rc={rec.get('returncode')} in {rec['wall_s']:.1f} s", flush=True)
    return rec


def _write(result: dict, args, tag: str, date: str) -> str:
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"run_all_{args.size}_{tag}_{date}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--size",
        choices=("small", "large"),
        default="small",
        help="small: CPU sizes (about 10 minutes on 2 cores); large: GPU sizes",
    )
    ap.add_argument("--only", default=None, help="comma-separated benchmark names")
    ap.add_argument(
        "--out-dir",
        default=os.path.join(HERE, "results"),
        help="folder of the combined JSON results file",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting benchmarks after this many seconds; a running one is cut "
        "at the budget (for time-limited GPU runs)",
    )
    args = ap.parse_args()
    present = discover()
    names = present if args.only is None else [n for n in args.only.split(",") if n in present]
    info = machine()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    tag = re.sub(
        r"[^A-Za-z0-9]+", "-", f"{info['device_kind']}-x{info['device_count']}-{info['host']}"
    ).strip("-")
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, capture_output=True
            ).stdout.strip()
            or None
        )
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=ROOT, text=True, capture_output=True
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = None, None
    result = {
        "size": args.size,
        "date": date,
        "machine": info,
        "git_commit": commit,
        "git_dirty": dirty,
        "command": "python -m benchmarks.run_all " + " ".join(sys.argv[1:]),
        "present": present,
        "absent": sorted(set(FLAGS) - set(present)),
        "benchmarks": {},
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="run_all_") as scratch:
        for name in names:
            left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - t0)
            if left is not None and left < 30:
                result["benchmarks"][name] = {
                    "skipped": f"time budget of {args.budget_s:.0f} s spent"
                }
                print(f"[run_all] {name}: skipped (budget)", flush=True)
                continue
            timeout = TIMEOUT[args.size] if left is None else min(TIMEOUT[args.size], left)
            result["benchmarks"][name] = run_one(name, args.size, scratch, timeout)
            # keep what finished even if a later benchmark takes the machine down
            _write(result, args, tag, date)
    result["total_wall_s"] = time.perf_counter() - t0
    path = _write(result, args, tag, date)
    print(f"[run_all] wrote {path} ({result['total_wall_s']:.0f} s)")
    failed = [
        n
        for n, r in result["benchmarks"].items()
        if "skipped" not in r and r.get("returncode") != 0
    ]
    if failed:
        print(f"[run_all] failed: {failed}")


if __name__ == "__main__":
    main()
