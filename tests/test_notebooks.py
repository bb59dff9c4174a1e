"""Every notebook runs at a small size (JAXMLO_SMALL=1), shows its plots and saves them.

Convention: a notebook lists the figure files it saves in a code line
``FIGURES = ["<stem>_<what>.png", ...]`` and writes them to the folder named by the environment
variable NOTEBOOK_FIGURES (default: ``figures`` beside the notebook).
"""

import ast
import os
import pathlib
import re

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def declared_figures(nb) -> list[str]:
    """The file names in the notebook's ``FIGURES = [...]`` declaration."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        m = re.search(r"^FIGURES = (\[.*?\])", cell.source, re.S | re.M)
        if m:
            return ast.literal_eval(m.group(1))
    return []


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_shows_and_saves_its_figures(path, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    figures = tmp_path / "figures"
    monkeypatch.setenv("JAXMLO_SMALL", "1")
    monkeypatch.setenv("NOTEBOOK_FIGURES", str(figures))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend displays plots
    # The kernel must import this checkout, not an older installed copy.
    root = str(path.parent.parent)
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "_src" not in code, f"{path.name} imports a private module"
    names = declared_figures(nb)
    assert names, f"{path.name} declares no FIGURES"
    assert all(n.startswith(path.stem + "_") and n.endswith(".png") for n in names), names

    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "IProgress" not in stderr, stderr
    shown = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(shown) >= len(names), f"{path.name} showed {len(shown)} of {len(names)} figures"
    for name in names:
        f = figures / name
        assert f.exists() and f.stat().st_size > 0, f"{path.name} did not save {name}"
    assert list(figures.glob(path.stem + "_*.png"))
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and "conclusion" in last.source.lower(), (
        f"{path.name} does not end with a conclusion"
    )
