"""Run the headline benchmarks (or all) at one size and collect the results in one JSON file.

    python -m benchmarks.run_all --size large --budget-s 540   # one GPU, within 10 minutes
    python -m benchmarks.run_all --size small                  # the same code paths on a CPU
    python -m benchmarks.run_all --size small --all            # every benchmark script

By default the three headline sections of :data:`SECTIONS` run, in this order: LoGra logging of
the Llama-style LM (134M parameters at ``large``: seq 512, batch 8, bf16) against its plain
``value_and_grad`` step, SAMA reweighting of the ~110M classifier against plain finetuning
(``benchmarks/scale.py``), and a query over 1M logged rows against the raw read bandwidth
(``benchmarks/store.py``). Each section has a share of ``--budget-s`` as its time limit; a
section that fails or times out is recorded (exit code, stderr tail) and the next one runs;
the JSON is rewritten after every section, so a run cut short keeps what finished.

With ``--all``:
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
# The headline sections: name -> (script, {size: flags}, share of --budget-s).
SECTIONS = {
    "llama_logging": (
        "logra_logging",
        {
            "small": ["--model", "llama", "--config", "small", "--repeats", "3"]
            + ["--write-batches", "2"],
            "large": ["--model", "llama", "--config", "134m", "--batch", "8", "--repeats", "10"]
            + ["--write-batches", "20", "--full-seqs"],
        },
        0.35,
    ),
    "sama": (
        "scale",
        {
            "small": ["--size", "small", "--parts", "reweighting"],
            # plain and SAMA first (the headline), then the implicit adjoints' memory
            "large": ["--size", "large", "--parts", "reweighting"]
            + ["--variants", "sama,cg,neumann"],
        },
        0.35,
    ),
    "query_1m": (
        "store",
        {
            "small": ["--rows", "20000", "--queries", "1,64", "--reps", "1", "--logix-rows", "0"],
            "large": ["--rows", "1048576", "--layers", "16", "--k-out", "8", "--k-in", "8"]
            + ["--queries", "1,64,256", "--reps", "1", "--logix-rows", "0"],
        },
        0.30,
    ),
}
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
    if name in SECTIONS:
        script, flags = SECTIONS[name][0], SECTIONS[name][1][size]
    else:
        script, flags = name, FLAGS.get(name, {}).get(size, [])
    flags, dropped = filter_flags(flags, accepted_flags(script))
    cmd = [sys.executable, "-m", f"benchmarks.{script}", *flags, "--out", out]
    shown = " ".join(["python", "-m", f"benchmarks.{script}", *flags])
    print(f"[run_all] {shown}", flush=True)
    t0 = time.perf_counter()
    rec = {"command": shown, "dropped_flags": dropped, "known": name in FLAGS or name in SECTIONS}
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
        help="small: CPU sizes (minutes on 2 cores); large: GPU sizes",
    )
    ap.add_argument("--only", default=None, help="comma-separated section or benchmark names")
    ap.add_argument("--all", action="store_true", help="every benchmark script, not the sections")
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
    t0 = time.perf_counter()
    present = discover()
    default = present if args.all else list(SECTIONS)
    known = set(present) | set(SECTIONS)
    names = default if args.only is None else [n for n in args.only.split(",") if n in known]
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
            if args.budget_s is not None and name in SECTIONS and not args.all:
                # A section's share of the budget, plus what earlier sections left unused.
                later = sum(SECTIONS[n][2] for n in names[names.index(name) + 1 :] if n in SECTIONS)
                timeout = min(timeout, max(30.0, left - later * args.budget_s))
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
