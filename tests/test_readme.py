"""The README is a front page whose commands and printed outputs are what the code does."""

import json
import pathlib
import re

from tests.test_docs import check_page, marked_blocks

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"


def _result(file, *path):
    value = json.loads((RESULTS / file).read_text())
    for key in path:
        value = value[key]
    return value


def _variant(file, name):
    return next(r for r in _result(file, "results") if r["variant"] == name)["mean"]


# Each headline number of the README's results table, and where it comes from.
HEADLINES = {
    "87.6% plain": 100 * _variant("noisy_digits_cpu.json", "plain"),
    "**94.2%**": 100 * _variant("noisy_digits_cpu.json", "reweight+correct"),
    "83.5% finetune only": 100 * _variant("domain_digits_cpu.json", "finetune only"),
    "**92.0%**": 100 * _variant("domain_digits_cpu.json", "pretrain+finetune+reweight"),
    "**2.33×**": _result(
        "hypergrad_cpu.json", "models", "mlp", "methods", "sama", "min_time_ratio_to_plain"
    ),
    "Betty 0.2.1: 4.07×": _result(
        "hypergrad_cpu.json", "betty", "methods", "sama", "time_ratio_to_plain"
    ),
    "**1.05×**": _result("logging_full_cpu.json", "results", 1, "time_ratio_logging_over_plain"),
    "0.87× its memory": _result("logging_full_cpu.json", "results", 1, "peak_memory_ratio"),
    "LogIX 0.1.1: 1.82×": _result(
        "logging_full_cpu.json", "logix", "results", 1, "time_ratio_logging_over_plain"
    ),
    "LoGra-PCA **0.360**": _result("lds_cpu.json", "tasks", "mlp", "methods", "logra_pca_32x32")[
        "lds"
    ],
    "TRAK 0.328": _result("lds_cpu.json", "tasks", "mlp", "methods", "trak_2368")["lds"],
    "exact influence 0.319": _result("lds_cpu.json", "tasks", "mlp", "methods", "exact_influence")[
        "lds"
    ],
}


def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for word in ("issue", "session", "engineer", "design target"):
        assert word not in text.lower(), f"README speaks of how the project was made: {word!r}"
    runs = [b["body"] for b in marked_blocks(text) if b["kind"] == "run"]
    assert any("import jaxmlo" in b for b in runs) and any("import jaxinf" in b for b in runs)


def test_readme_headline_numbers_are_the_committed_results():
    text = README.read_text()
    for shown, value in HEADLINES.items():
        assert shown in text, f"README headline {shown!r} is gone; update HEADLINES"
        digits = re.findall(r"\d+\.(\d+)", shown)[-1]  # the last number shown is the result
        number = float(re.findall(r"\d+\.\d+", shown)[-1])
        decimals = len(digits)
        assert round(value, decimals) == number, f"{shown!r}: the results file says {value}"


def test_readme_commands_and_examples_run_as_printed(tmp_path):
    # The quickstart, the demo, both examples; pip extras and the test command are checked.
    assert check_page(README, tmp_path) >= 7
