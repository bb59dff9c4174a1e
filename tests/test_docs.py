"""Code in the docs runs, and prints what the docs say it prints.

A Markdown page marks what this test checks with HTML comments (invisible on GitHub):

- ``<!-- test: run -->`` right before a ```` ```python ```` block: the block is run as a script.
- ``<!-- test: shell -->`` right before a ```` ```bash ```` block: each ``python -m ...`` command
  in it is run (``pip install -e ".[extra]"`` parts are checked against pyproject's extras, and
  ``python -m pytest ...`` against ``.ci/run``, instead of being run).
- ``<!-- test: output -->`` right before a fenced block: it is the stdout of the block run last.
  Text must match exactly; numbers must match to 2 units of their last printed digit (integers
  exactly), or to ``atol=X`` / ``rtol=X`` given in the marker; times (a number followed by
  ``s``) are not compared; a line ``...`` matches any number of lines.

The blocks of one page run in order in one scratch folder (so a later block can read what an
earlier one wrote); ``/tmp/`` in a block is replaced by that folder.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))

BLOCK = re.compile(
    r"<!--\s*test:\s*(?P<kind>run|shell|output)(?P<opts>[^>]*?)\s*-->\s*\n"
    r"```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)```",
    re.S,
)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
TIME = re.compile(r"^ ?s\b")


def marked_blocks(text: str) -> list[dict]:
    """The marked blocks of a page, in order: kind, options, language and body."""
    blocks = []
    for m in BLOCK.finditer(text):
        opts = dict(kv.split("=", 1) for kv in m["opts"].split())
        blocks.append({"kind": m["kind"], "opts": opts, "lang": m["lang"], "body": m["body"]})
    return blocks


def _line_matches(expected: str, got: str, atol: float | None, rtol: float) -> bool:
    e_nums, g_nums = NUMBER.findall(expected), NUMBER.findall(got)
    if NUMBER.split(expected) != NUMBER.split(got) or len(e_nums) != len(g_nums):
        return False
    e_text = NUMBER.split(expected)
    for i, (e, g) in enumerate(zip(e_nums, g_nums)):
        if TIME.match(e_text[i + 1]):
            continue  # wall time: varies from run to run
        decimals = len(e.split(".")[1]) if "." in e else 0
        tol = atol if atol is not None else (2 * 10.0**-decimals if decimals else 0.0)
        tol = max(tol, rtol * abs(float(e))) + 1e-12
        if abs(float(e) - float(g)) > tol:
            return False
    return True


def output_matches(expected: str, got: str, atol: float | None = None, rtol: float = 0.0) -> bool:
    """Whether printed output ``got`` matches a docs output block (see the module docstring)."""
    exp = [line.rstrip() for line in expected.strip("\n").splitlines()]
    out = [line.rstrip() for line in got.strip("\n").splitlines()]

    def match(i: int, j: int) -> bool:
        if i == len(exp):
            return j == len(out)
        if exp[i] == "...":
            return any(match(i + 1, k) for k in range(j, len(out) + 1))
        return j < len(out) and _line_matches(exp[i], out[j], atol, rtol) and match(i + 1, j + 1)

    return match(0, 0)


def _env() -> dict:
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args: list[str], cwd: pathlib.Path, what: str) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"{what} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def _shell_commands(body: str, page: str, cwd: pathlib.Path) -> str:
    """Run a ```bash block's python commands; check its pip extras and its pytest command."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    stdout = ""
    for line in body.replace("\\\n", " ").splitlines():
        for cmd in line.split("#")[0].split("&&"):
            words = cmd.split()
            if words[:3] == ["pip", "install", "-e"]:
                for name in re.findall(r"\[([^\]]*)\]", cmd)[0].split(","):
                    assert name in extras, f"{page}: pip extra [{name}] is not in pyproject.toml"
            elif words[:3] == ["python", "-m", "pytest"]:
                assert " ".join(words[1:]) in (ROOT / ".ci" / "run").read_text(), (
                    f"{page}: `{cmd.strip()}` is not the test command .ci/run runs"
                )
            elif words[:1] == ["python"]:
                stdout += _run([sys.executable, *words[1:]], cwd, f"{page}: `{cmd.strip()}`")
    return stdout


def check_page(page: pathlib.Path, scratch: pathlib.Path) -> int:
    """Run every marked block of ``page`` and compare outputs; returns the number checked."""
    blocks = marked_blocks(page.read_text())
    stdout, ran = None, 0
    for block in blocks:
        body = (
            block["body"]
            .replace('"/tmp/', f'"{scratch}/')
            .replace("file:///tmp/", f"file://{scratch}/")
        )
        if block["kind"] == "run":
            assert block["lang"] == "python", f"{page.name}: `test: run` marks a non-python block"
            stdout = _run([sys.executable, "-c", body], scratch, f"{page.name} example:\n{body}")
        elif block["kind"] == "shell":
            stdout = _shell_commands(body, page.name, scratch)
        else:
            assert stdout is not None, f"{page.name}: an output block with nothing run before it"
            atol = block["opts"].get("atol")
            ok = output_matches(
                block["body"],
                stdout,
                atol=None if atol is None else float(atol),
                rtol=float(block["opts"].get("rtol", 0.0)),
            )
            assert ok, f"{page.name}: printed\n{stdout}\ninstead of\n{block['body']}"
            stdout = None
        ran += 1
    return ran


def test_output_matching_rules():
    assert output_matches("loss 0.005\n", "loss 0.003\n")  # 2 units of the last digit
    assert not output_matches("loss 0.005\n", "loss 0.008\n")
    assert not output_matches("44 of 50\n", "43 of 50\n")  # integers exactly
    assert output_matches("acc 0.80\n", "acc 0.78\n", atol=0.05)
    assert output_matches("steps (6.1 s)\n", "steps (13.0 s)\n")  # times are not compared
    assert not output_matches("accuracy 0.8\n", "precision 0.8\n")
    assert output_matches("a 1\n...\nz 2\n", "a 1\nb\nc\nz 2\n")
    assert not output_matches("a 1\nz 2\n", "a 1\nb\nz 2\n")


@pytest.mark.parametrize("page", DOCS, ids=[p.stem for p in DOCS])
def test_docs_page_examples_run_as_printed(page, tmp_path):
    check_page(page, tmp_path)


def test_docs_links_resolve():
    for page in [ROOT / "README.md", *DOCS]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
