import json
import os

from jaxinf import demo


def test_demo_runs_end_to_end_and_finds_flipped_labels(tmp_path):
    out = str(tmp_path / "demo")
    summary = demo.main(
        [
            "--out",
            out,
            "--n-train",
            "300",
            "--flip",
            "15",
            "--steps",
            "150",
            "--k",
            "8",
            "--num-queries",
            "2",
        ]
    )
    assert os.path.exists(os.path.join(out, "influence.png"))
    assert json.load(open(os.path.join(out, "summary.json")))["flipped"] == 15
    assert len(summary["helpful_ids"]) == 2 and len(summary["helpful_ids"][0]) == 5
    # Mislabeled examples have large self-influence: far more than the ~0.75 a random ranking finds.
    assert summary["flipped_found_in_top5pct"] >= 4
