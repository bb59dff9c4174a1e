"""Whole-program iterations/s and compiled peak memory of MWN reweighting (digits MLP).

Times one compiled ``jaxmlo`` program step (classifier unroll + MWN meta step) for each
hypergradient method against the plain classifier step in the same run, and reads the
compiled program's memory from XLA (``memory_analysis``). A side-by-side Betty run is done
only when ``betty`` is importable (it is not installed here; the JSON says so).

  python -m benchmarks.mwn_speed --out benchmarks/results/mwn_speed_cpu.json
"""
import argparse
import importlib.util
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmlo
from jaxmlo.examples import digits as dg


def _batches(prog, data, batch, i):
  srcs = {"classifier": dg.sampler(data["train"], batch, 0),
          "reweight": dg.sampler(data["meta"], batch, 1)}
  out = {}
  for n in prog.order:
    t = prog.problems[n].unroll_steps
    xs, ys = zip(*[srcs[n](i * t + k) for k in range(t)])
    out[n] = (jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys)))
  return out


def measure(name, method, unroll, args, data):
  prog = dg.reweighting_program(method, key=jax.random.PRNGKey(0), hidden=args.hidden,
                                unroll_steps=unroll, steps=10_000)
  state = jaxmlo.init(prog)
  step_fn = jax.jit(lambda s, b: jaxmlo.step(prog, s, b))
  batches = [_batches(prog, data, args.batch, i) for i in range(8)]
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  for i in range(3):  # warm up
    state, m = compiled(state, batches[i % 8])
  jax.block_until_ready(state)
  times = []
  for rep in range(args.repeats):
    t0 = time.perf_counter()
    for i in range(args.iters):
      state, m = compiled(state, batches[i % 8])
    jax.block_until_ready(state)
    times.append((time.perf_counter() - t0) / args.iters)
  sec = float(np.median(times))
  row = {"name": name, "unroll_steps": unroll, "iters_per_s": 1.0 / sec,
         "samples_per_s": args.batch * unroll / sec, "compile_s": compile_s}
  if mem is not None:
    row.update(argument_bytes=int(mem.argument_size_in_bytes),
               output_bytes=int(mem.output_size_in_bytes),
               temp_bytes=int(mem.temp_size_in_bytes),
               alias_bytes=int(mem.alias_size_in_bytes))
    row["peak_bytes"] = (row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"]
                         - row["alias_bytes"])
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--iters", type=int, default=100)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="benchmarks/results/mwn_speed_cpu.json")
  args = ap.parse_args(argv)
  data = dg.long_tailed_digits(10, 0)
  cases = [("plain", None, 1), ("finite_difference", jaxmlo.finite_difference(), 1),
           ("sama", jaxmlo.sama(), 1), ("cg(maxiter=5)", jaxmlo.cg(maxiter=5), 1),
           ("itd", jaxmlo.itd(), 1), ("itd", jaxmlo.itd(), 5),
           ("finite_difference", jaxmlo.finite_difference(), 5)]
  rows = []
  for name, method, unroll in cases:
    row = measure(name, method, unroll, args, data)
    rows.append(row)
  base = {r["unroll_steps"]: r for r in rows if r["name"] == "plain"}[1]
  for r in rows:
    # per classifier update, relative to one plain classifier step
    r["time_per_update_vs_plain"] = (base["iters_per_s"] / r["iters_per_s"]) / r["unroll_steps"]
    if "peak_bytes" in r:
      r["peak_vs_plain"] = r["peak_bytes"] / base["peak_bytes"]
    print(f"{r['name']:<18} T={r['unroll_steps']}  {r['iters_per_s']:9.1f} it/s  "
          f"{r['time_per_update_vs_plain']:.2f}x plain/update  "
          f"peak {r.get('peak_bytes', 0) / 2**20:.2f} MiB ({r.get('peak_vs_plain', 0):.2f}x)",
          flush=True)
  betty = importlib.util.find_spec("betty") is not None
  out = {"benchmark": "mwn_speed", "args": vars(args), "backend": jax.default_backend(),
         "device": str(jax.devices()[0]), "platform": platform.platform(),
         "jax": jax.__version__, "results": rows,
         "betty": ("importable: side-by-side run not implemented" if betty else
                   "skipped: betty (betty-ml) is not importable in this environment")}
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
