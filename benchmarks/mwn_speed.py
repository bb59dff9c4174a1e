"""Whole-program iterations/s and peak memory of MWN reweighting (digits MLP), vs Betty.

Times one compiled ``jaxmlo`` program step (classifier unroll + MWN meta step) for each
hypergradient method against the plain classifier step, reads the compiled program's
memory from XLA (``memory_analysis``), and, when ``betty`` (betty-ml) and torch are
importable, runs the same task under Betty on CPU torch (``_mwn_betty_worker.py``). Every
case runs in its own subprocess, one after the other, so process peak RSS is comparable.

  python -m benchmarks.mwn_speed --out benchmarks/results/mwn_speed_cpu.json
"""

import argparse
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmlo
from jaxmlo.examples import digits as dg


def _batches(prog, data, batch, i):
    srcs = {
        "classifier": dg.sampler(data["train"], batch, 0),
        "reweight": dg.sampler(data["meta"], batch, 1),
    }
    out = {}
    for n in prog.order:
        t = prog.problems[n].unroll_steps
        xs, ys = zip(*[srcs[n](i * t + k) for k in range(t)])
        out[n] = (jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys)))
    return out


def _compiled(method, unroll, args, data):
    prog = dg.reweighting_program(
        method, key=jax.random.PRNGKey(0), hidden=args.hidden, unroll_steps=unroll, steps=10_000
    )
    state = jaxmlo.init(prog)
    batches = [_batches(prog, data, args.batch, i) for i in range(8)]
    t0 = time.perf_counter()
    compiled = jax.jit(lambda s, b: jaxmlo.step(prog, s, b)).lower(state, batches[0]).compile()
    return compiled, state, batches, time.perf_counter() - t0


def measure(name, method, unroll, args, data):
    """Times the case and the plain step in alternating blocks (same process, same load)."""
    runs = {"case": _compiled(method, unroll, args, data), "plain": _compiled(None, 1, args, data)}
    states = {k: v[1] for k, v in runs.items()}

    def block(k, n):
        compiled, _, batches, _ = runs[k]
        s = states[k]
        t0 = time.perf_counter()
        for i in range(n):
            s, _ = compiled(s, batches[i % 8])
        jax.block_until_ready(s)
        states[k] = s
        return (time.perf_counter() - t0) / n

    block("case", 3), block("plain", 3)  # warm up
    times = {"case": [], "plain": []}
    for _ in range(args.repeats):
        for k in ("plain", "case"):
            times[k].append(block(k, args.iters))
    ratios = [c / (unroll * p) for c, p in zip(times["case"], times["plain"])]
    sec = float(np.median(times["case"]))
    mem, pmem = runs["case"][0].memory_analysis(), runs["plain"][0].memory_analysis()
    peak = lambda m: (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {
        "name": name,
        "unroll_steps": unroll,
        "iters_per_s": 1.0 / sec,
        "classifier_updates_per_s": unroll / sec,
        "plain_updates_per_s": 1.0 / float(np.median(times["plain"])),
        "time_per_update_vs_plain": float(np.median(ratios)),
        "time_per_update_vs_plain_blocks": ratios,
        "compile_s": runs["case"][3],
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "peak_bytes": int(peak(mem)),
        "peak_vs_plain": peak(mem) / peak(pmem),
    }


JAX_CASES = {
    "plain": lambda: None,
    "finite_difference": jaxmlo.finite_difference,
    "sama": jaxmlo.sama,
    "sama(nudge=False)": lambda: jaxmlo.sama(nudge=False),
    "cg(maxiter=5)": lambda: jaxmlo.cg(maxiter=5),
    "itd": jaxmlo.itd,
}
CASES = [
    ("plain", 1),
    ("finite_difference", 1),
    ("sama", 1),
    ("sama(nudge=False)", 1),
    ("cg(maxiter=5)", 1),
    ("itd", 1),
    ("itd", 5),
    ("finite_difference", 5),
]
# Betty's name for the same best-response Jacobian.
BETTY_CASES = [
    ("plain", "plain", 1),
    ("finite_difference", "darts", 1),
    ("sama", "sama", 1),
    ("finite_difference", "darts", 5),
]


def _subprocess_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256, help="hidden width of the classifier MLP")
    ap.add_argument("--batch", type=int, default=128, help="classifier batch size")
    ap.add_argument("--iters", type=int, default=200, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=7, help="timed blocks (alternating with plain)")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--out", default="benchmarks/results/mwn_speed_cpu.json", help="JSON results file"
    )
    args = ap.parse_args(argv)
    if args.worker:  # one JAX case in this process; print one JSON line
        name, unroll = args.worker[0], int(args.worker[1])
        row = measure(name, JAX_CASES[name](), unroll, args, dg.long_tailed_digits(10, 0))
        row["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(row))
        return
    common = ["--hidden", str(args.hidden), "--batch", str(args.batch)]
    rows = []
    for name, unroll in CASES:
        rows.append(
            _subprocess_json(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.mwn_speed",
                    "--worker",
                    name,
                    str(unroll),
                    "--iters",
                    str(args.iters),
                    "--repeats",
                    str(args.repeats),
                ]
                + common
            )
        )
    for r in rows:
        r["framework"] = "jaxmlo"
        print(
            f"jaxmlo {r['name']:<18} T={r['unroll_steps']}  {r['classifier_updates_per_s']:9.1f} "
            f"updates/s  {r['time_per_update_vs_plain']:.2f}x plain  XLA peak "
            f"{r['peak_bytes'] / 2**20:.2f} MiB ({r['peak_vs_plain']:.2f}x)  process RSS "
            f"{r['max_rss_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    have_betty = all(importlib.util.find_spec(m) is not None for m in ("betty", "torch"))
    betty_rows, betty_note = [], "skipped: betty (betty-ml) or torch is not importable"
    if have_betty:
        betty_note = (
            "run: betty-ml on CPU torch, 1 intra-op thread (with 2 threads torch was "
            "~40x slower on this shared, loaded 2-core machine)"
        )
        for name, typ, unroll in BETTY_CASES:
            r = _subprocess_json(
                [
                    sys.executable,
                    "-m",
                    "benchmarks._mwn_betty_worker",
                    "--method",
                    typ,
                    "--unroll",
                    str(unroll),
                    "--iters",
                    str(args.iters),
                    "--repeats",
                    str(args.repeats),
                ]
                + common
            )
            r["name"] = name
            jr = next(j for j in rows if j["name"] == name and j["unroll_steps"] == unroll)
            r["jaxmlo_speedup"] = jr["classifier_updates_per_s"] / r["classifier_updates_per_s"]
            betty_rows.append(r)
            print(
                f"betty  {name:<18} T={unroll}  {r['classifier_updates_per_s']:9.1f} updates/s  "
                f"{r['time_per_update_vs_plain']:.2f}x its plain  jaxmlo {r['jaxmlo_speedup']:.1f}x "
                f"faster  process RSS "
                f"{r['max_rss_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )
    out = {
        "benchmark": "mwn_speed",
        "args": vars(args),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "results": rows,
        "betty_results": betty_rows,
        "betty": betty_note,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
