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

    assert "data_mesh" in jaxmlo.__all__ and "count_collectives" in jaxmlo.testing.__all__
    assert not {"data_mesh", "count_collectives"} & set(jaxinf.__all__)


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
