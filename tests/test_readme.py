"""The README's self-contained code examples run as printed (paths moved to a temp folder)."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)

# Examples that need no names from the reader's own code, in README order (later ones may use
# files an earlier one wrote, as the store examples do).
RUNNABLE = (
    "jaxmlo.run(",
    'jaxinf.LogWriter("/tmp/my_log"',
    "import json, tensorstore as ts",
)


def test_readme_examples_run(tmp_path):
    chosen = [b for b in BLOCKS if any(marker in b for marker in RUNNABLE)]
    assert len(chosen) == len(RUNNABLE), "a README example this test runs was removed or renamed"
    for block in chosen:
        code = block.replace('"/tmp/', f'"{tmp_path}/').replace(
            "file:///tmp/", f"file://{tmp_path}/"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=README.parent,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"README example failed:\n{block}\n{done.stderr[-3000:]}"
