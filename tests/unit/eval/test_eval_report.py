"""surgical.eval.write_report and print_table."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from surgical import SurgicalError
from surgical.eval import print_table, write_report

ONE = {
    "id": {"accuracy": 0.75, "loss": 0.5, "examples": 40},
    "ood": {"accuracy": 0.625, "loss": 0.9, "examples": 16},
    "reference": {"loss_change": 0.01, "kl": 2.5e-05, "tokens": 1200},
}


def test_report_files_are_written_and_the_json_round_trips(tmp_path):
    json_path, png = write_report(ONE, tmp_path / "r", title="tiny", meta={"seed": 0})
    assert json_path == tmp_path / "r" / "report.json" and png == tmp_path / "r" / "report.png"
    doc = json.loads(json_path.read_text())
    assert doc["results"] == ONE
    assert doc["x"] == ["id", "accuracy"] and doc["y"] == ["ood", "accuracy"]
    assert doc["title"] == "tiny" and doc["meta"] == {"seed": 0}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "report.json",
        "report.png",
    ]  # no temp files


def test_several_runs_are_points_and_non_finite_values_are_null(tmp_path):
    runs = {
        "base": {"id": {"loss": 2.0}, "reference": {"kl": 0.0}},
        "scale 0.5": {"id": {"loss": 1.5}, "reference": {"kl": 0.01}},
        "diverged": {"id": {"loss": math.inf}, "reference": {"kl": math.nan}},
    }
    json_path, png = write_report(runs, tmp_path, title="sweep", x=("id", "loss"), y=("reference", "kl"))
    doc = json.loads(json_path.read_text())  # strict JSON: no NaN or Infinity
    assert doc["results"]["diverged"] == {"id": {"loss": None}, "reference": {"kl": None}}
    assert doc["results"]["base"] == runs["base"]
    assert png.is_file()


def test_a_missing_axis_is_a_one_line_error_and_nothing_is_written(tmp_path):
    with pytest.raises(SurgicalError) as e:
        write_report(ONE, tmp_path / "r", title="t", y=("shifted", "accuracy"))
    msg = str(e.value)
    assert "\n" not in msg and "no shifted.accuracy for the y axis" in msg and "id.accuracy" in msg
    assert not (tmp_path / "r").exists()
    with pytest.raises(SurgicalError, match="must map set -> metric"):
        write_report({"id": {"accuracy": "high"}}, tmp_path, title="t")
    with pytest.raises(SurgicalError, match="results are empty"):
        write_report({}, tmp_path, title="t")
    with pytest.raises(SurgicalError, match="must be a \\(set, metric\\) pair"):
        write_report(ONE, tmp_path, title="t", x="id")


def test_print_table_has_a_row_per_set_and_a_column_per_metric():
    console = Console(record=True, width=200)
    table = print_table(ONE, console, title="eval")
    assert [c.header for c in table.columns] == [
        "set",
        "accuracy",
        "loss",
        "examples",
        "loss_change",
        "kl",
        "tokens",
    ]
    assert table.row_count == 3
    text = console.export_text()
    assert "0.75" in text and "2.5e-05" in text and "1,200" in text
    runs = print_table({"a": {"id": {"loss": 1.0}}, "b": {"id": {"loss": 2.0}}}, Console(record=True))
    assert [c.header for c in runs.columns] == ["run", "set", "loss"] and runs.row_count == 2
