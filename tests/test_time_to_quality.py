"""jobs/bench/time_to_quality.py (python jobs/benchmark.py time-to-quality): recipes x seeds trained and evaluated
once each, the steps to each threshold, the table."""

import json
import math

import pytest

from jobs.bench.time_to_quality import CURVES, THRESHOLDS, markdown_table, reached, summarise
from jobs.benchmark import main


@pytest.mark.ray
def test_time_to_quality_trains_each_recipe_and_seed_once_and_reports_every_threshold(demo_set, tmp_path, capsys):
    """Two recipes x two seeds on the tiny preset, in this process; a rerun trains nothing."""
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text("eps: [diffusion.prediction=epsilon, diffusion.snr_floor=null]\n"
                       "v: [diffusion.prediction=v, diffusion.snr_floor=1]\nunused: [optim.lr=1]\n")
    arguments = ["time-to-quality", "--config", "configs/tiny.yaml", "--recipes", str(recipes), "--only", "eps,v",
                 "--seeds", "2", "--steps", "4", "--eval-at", "2", "--samples", "4", "--guidance-scales", "1,3",
                 "--sample-steps", "2", "--out-dir", str(tmp_path), "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}", f"data.train={demo_set}/train", f"data.val={demo_set}/val"]
    assert main(arguments) == 0
    out = capsys.readouterr()
    figures = json.loads(out.out.strip().splitlines()[-1])
    assert figures["recipes"] == {"eps": ["diffusion.prediction=epsilon", "diffusion.snr_floor=null"],
                                  "v": ["diffusion.prediction=v", "diffusion.snr_floor=1"]}
    assert figures["seeds"] == [0, 1] and figures["eval_at"] == [2, 4]
    for name in ("eps", "v"):
        assert len(figures["curves"][name]) == 2
        for curve in figures["curves"][name]:
            assert [point["step"] for point in curve] == [2, 4]
            for metric in CURVES:
                assert math.isfinite(curve[-1][metric]), metric
            assert 0 <= curve[-1]["t2i_colour_low"] <= curve[-1]["t2i_colour"] <= curve[-1]["t2i_colour_high"] <= 1
            assert curve[-1]["t2i_guidance"] in (1.0, 3.0) and curve[-1]["wall_seconds"] > 0
        entry = figures["summary"][name]
        assert set(entry["steps_to"]) == set(THRESHOLDS) and set(entry["final"]) == set(CURVES)
        assert entry["final"]["val_loss"]["values"] == [c[-1]["val_loss"] for c in figures["curves"][name]]
        assert f"| {name} |" in figures["table"]
    assert (tmp_path / "time_to_quality.png").stat().st_size > 0
    assert len(list((tmp_path / "time_to_quality").glob("*.json"))) == 4
    assert main(arguments) == 0  # every (recipe, seed) run is reused
    again = capsys.readouterr()
    assert again.err.count("reusing") == 4 and "train eps" not in again.err
    assert json.loads(again.out.strip().splitlines()[-1])["curves"] == figures["curves"]


def test_time_to_quality_steps_to_a_threshold_are_interpolated_and_never_is_counted():
    def curve(colours, fids):
        return [{"step": step, "wall_seconds": step / 10, "t2i_colour": colour, "fid": fid,
                 **{metric: 0.5 for metric in ("t2i_shape", "t2i_all", "i2t_colour", "i2t_shape", "i2t_position",
                                               "i2t_well_formed", "infill_colour", "joint_colour", "val_loss")}}
                for step, colour, fid in zip((250, 500, 750), colours, fids)]

    fast, slow = curve([0.5, 0.95, 0.97], [40, 10, 8]), curve([0.3, 0.6, 0.8], [60, 30, 20])
    assert THRESHOLDS["t2i_colour"] == (0.90, True) and THRESHOLDS["fid"] == (12.0, False)
    assert reached(fast, "t2i_colour", "step") == pytest.approx(250 + 250 * 0.4 / 0.45)
    assert reached(fast, "fid", "wall_seconds") == pytest.approx(25 + 25 * 28 / 30)
    assert reached(slow, "t2i_colour", "step") == math.inf
    summary = summarise({"a": [fast, fast], "b": [fast, slow], "c": [slow, slow]})
    assert summary["a"]["steps_to"]["t2i_colour"]["mean"] == pytest.approx(472.2, abs=0.1)
    assert summary["b"]["steps_to"]["t2i_colour"]["never"] == 1
    assert summary["b"]["final"]["t2i_colour"]["mean"] == pytest.approx(0.885)
    table = markdown_table(summary)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "472 ± 0" in rows["a"] and "472 ± 0 (1/2 never)" in rows["b"] and "| never |" in rows["c"]
    assert "steps to t2i_colour ≥ 90%" in table and "steps to fid ≤ 12.0" in table
