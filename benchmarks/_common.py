"""Helpers shared by the benchmark scripts (``run_all`` skips files starting with ``_``)."""

import json
import os
import platform

import jax


def write_json(path: str, obj, *, indent: int = 1) -> None:
    """Write ``obj`` as JSON to ``path``, creating its folder if needed; atomic (a temporary
    file renamed over ``path``), so a run killed mid-write leaves the previous file whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def loadavg() -> str | None:
    """``/proc/loadavg`` (1, 5 and 15 minute load averages, run queue), or None where absent.

    Recorded beside timings: on a shared machine a ratio means little without the load.
    """
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return None


def run_record(benchmark: str, args, results) -> dict:
    """The record the digits benchmarks write: name, arguments, machine, results."""
    return {
        "benchmark": benchmark,
        "args": vars(args),
        "backend": jax.default_backend(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "results": results,
    }
