"""open_table on CSV and JSON lines: rows read from disk when indexed, equal to load_table's, with
the same one-line errors."""

from __future__ import annotations

import json

import pytest

import surgical as sg
from surgical.data.table import FileRows, load_table, open_table


def _jsonl(path, rows, blank=False):
    lines = [json.dumps(r) for r in rows]
    if blank:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_rows_are_read_lazily_and_equal_load_tables(tmp_path):
    rows = [{"prompt": f"p{i} é", "response": f"r{i}", "extra": i} for i in range(50)]
    path = _jsonl(tmp_path / "d.jsonl", rows, blank=True)
    lazy = open_table(path, ["prompt", "response"])
    assert isinstance(lazy, FileRows) and len(lazy) == 50 and len(lazy.offsets) == 50
    eager = load_table(path, ["prompt", "response"])
    assert [lazy[i] for i in range(50)] == [{k: r[k] for k in ("prompt", "response")} for r in eager]
    assert lazy[-1] == {"prompt": "p49 é", "response": "r49"} and list(lazy)[3] == lazy[3]
    assert len(open_table(path, ["prompt"], limit=7)) == 7
    with pytest.raises(IndexError):
        lazy[50]


def test_csv_rows_with_quoted_newlines_equal_load_tables(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'prompt,response\n"two\nlines",a\n\nplain,"with, comma"\nshort\n"q ""x""",z\n', encoding="utf-8"
    )
    lazy = open_table(path, ["prompt", "response"])
    eager = load_table(path, ["prompt", "response"])
    assert [lazy[i] for i in range(len(lazy))] == eager
    assert lazy[0] == {"prompt": "two\nlines", "response": "a"} and lazy[2]["response"] is None
    assert lazy[3] == {"prompt": 'q "x"', "response": "z"}


@pytest.mark.parametrize(
    ("content", "suffix", "needle"),
    [
        ("", ".jsonl", "has no rows"),
        ('{"prompt": "a"}\n', ".jsonl", "lacks column(s) response (it has prompt)"),
        ('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', ".jsonl", "row 2 of data file"),
        ('{"prompt": "a", "response": "b"}\n[1, 2]\n', ".jsonl", "every line must be a JSON object"),
        ('{"prompt": "a", "response": \n', ".jsonl", "cannot parse"),
        ("prompt,other\nx,y\n", ".csv", "lacks column(s) response (it has prompt, other)"),
    ],
)
def test_bad_files_fail_in_one_line_as_load_table_does(tmp_path, content, suffix, needle):
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(sg.SurgicalError, match=None) as lazy:
        open_table(path, ["prompt", "response"])
    with pytest.raises(sg.SurgicalError) as eager:
        load_table(path, ["prompt", "response"])
    assert needle in str(lazy.value) and "\n" not in str(lazy.value)
    assert str(lazy.value) == str(eager.value)
