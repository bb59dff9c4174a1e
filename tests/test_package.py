import json
import os
import pathlib
import re
import subprocess
import sys

import jaxinf
import jaxmlo

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = [
    "jaxmlo.quickstart",
    "jaxinf.demo",
    "jaxmlo.examples.digits",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("[!_]*.py")),
    "benchmarks/_mwn_betty_worker.py",
]

# Runs each script up to its parse_args() and reports the options without a help text.
HELP_CHECK = r"""
import argparse, json, runpy, sys

class Parsed(Exception):
    pass

def check(self, args=None, namespace=None):
    bare = [a.option_strings[0] if a.option_strings else a.dest for a in self._actions
            if not a.help and a.dest != "help"]
    report[script] = bare + ([] if self.description else ["(no description)"])
    raise Parsed

argparse.ArgumentParser.parse_args = check
report = {}
for script in sys.argv[1:]:
    sys.argv = [script]
    try:
        if script.endswith(".py"):
            runpy.run_path(script, run_name="__main__")
        else:
            runpy.run_module(script, run_name="__main__", alter_sys=True)
    except Parsed:
        pass
    except ModuleNotFoundError as e:  # optional side-by-side dependencies (torch, betty)
        report[script] = "skipped: " + str(e)
    report.setdefault(script, ["(no argument parser reached)"])
print(json.dumps(report))
"""


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_public_names_are_exported():
    for pkg in (jaxmlo, jaxinf):
        assert pkg.__version__
        for name in pkg.__all__:
            assert hasattr(pkg, name), f"{pkg.__name__}.{name} is listed in __all__ but missing"


def test_mesh_helpers_have_one_export():
    import jaxmlo.testing

    assert "data_mesh" in jaxmlo.parallel.__all__ and "count_collectives" in jaxmlo.testing.__all__
    assert not {"data_mesh", "count_collectives"} & set(jaxinf.__all__)
    assert not {"data_mesh", "count_collectives"} & set(jaxmlo.__all__)


# The top level is what a user needs, grouped; growing it is a decision, so the set is exact.
JAXMLO_TOP_LEVEL = {
    # hypergradients in your own training loop
    "unroll",
    "hypergradient_transform",
    "bilevel",
    "checkpointed_scan",
    # adjoints: how to differentiate through an unroll
    "HypergradMethod",
    "itd",
    "cg",
    "neumann",
    "direct",
    "finite_difference",
    "sama",
    "implicit",
    "SolveInfo",
    # multi-level programs
    "Problem",
    "Program",
    "ProgramState",
    "init",
    "step",
    "make_step",
    "problem_gradient",
    "ProblemGradient",
    "run",
    "RunResult",
    "save_checkpoint",
    "restore_checkpoint",
}
JAXMLO_SUBMODULES = {
    "functional": {
        "hypergradient",
        "meta_step",
        "BilevelState",
        "HypergradientState",
        "HypergradInfo",
        "Unrolled",
    },
    "parallel": {"data_mesh", "mixed_precision", "parallel_step", "replicate", "shard_batches"},
}


def test_jaxmlo_top_level_is_the_grouped_set():
    assert len(jaxmlo.__all__) == len(set(jaxmlo.__all__)), "a name is listed twice"
    assert set(jaxmlo.__all__) - {"__version__"} == JAXMLO_TOP_LEVEL
    assert len(JAXMLO_TOP_LEVEL) == 25


def test_jaxmlo_submodules_hold_the_rest_once():
    import jaxmlo.testing

    seen = set(jaxmlo.__all__)
    for name, expected in JAXMLO_SUBMODULES.items():
        module = getattr(jaxmlo, name)  # imported with the package
        assert set(module.__all__) == expected, name
        for attr in module.__all__:
            assert hasattr(module, attr), f"jaxmlo.{name}.{attr}"
        assert not seen & expected, f"exported twice: {seen & expected}"
        seen |= expected
    assert not seen & set(jaxmlo.testing.__all__)
    # Moved names are gone from the top level, not aliased.
    for expected in JAXMLO_SUBMODULES.values():
        assert not any(hasattr(jaxmlo, n) for n in expected), expected & set(dir(jaxmlo))


def test_python_m_package_lists_what_it_offers():
    for pkg in ("jaxmlo", "jaxinf"):
        out = subprocess.run(
            [sys.executable, "-m", pkg], env=_env(), capture_output=True, text=True, check=True
        ).stdout
        modules = re.findall(r"python -m ([\w.]+)", out)
        assert modules, out
        for module in modules:  # every entry point listed exists
            assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module
        for page in re.findall(r"(docs/\w+\.md|notebooks/\w+\.ipynb)", out):
            assert (ROOT / page).exists(), page


def test_every_script_help_describes_its_options():
    out = subprocess.run(
        [sys.executable, "-c", HELP_CHECK, *SCRIPTS],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    undocumented = {s: r for s, r in report.items() if r and not str(r).startswith("skipped")}
    assert not undocumented, f"options without help text: {undocumented}"
