from jaxmlo import quickstart


def test_quickstart_learns_to_downweight_noisy_labels(capsys):
    result = quickstart.main(["--steps", "120"])
    assert result["skipped_steps"] == 0
    # With 300 steps it reaches ~74% noisy among the lowest weights (chance 39%); at 120 steps
    # the separation is already clear.
    assert result["mean_weight_noisy"] < result["mean_weight_clean"] - 0.1
    assert result["noisy_precision_of_lowest"] > 0.5
    assert "learned reweighting" in capsys.readouterr().out
