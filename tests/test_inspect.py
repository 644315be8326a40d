"""`draftalign inspect`: statistics, rendering, plotting and bad-input handling on small Parquet sets."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from draftalign.data.datasetinfo import CLIP, inspect_main, render, summarize

SAMPLING = pa.struct([("name", pa.string()), ("temperature", pa.float64()), ("top_p", pa.float64()),
                      ("max_tokens", pa.int32()), ("seed", pa.int64())])
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
IDS = pa.list_(pa.int32())
LONG_LINE = "first line\nsecond line " + "x" * 400


def _distill_rows(start: int, n: int, rng: np.random.Generator) -> pa.Table:
    """A distillation-like table; row `start` carries a long multi-line response to check clipping."""
    rows = []
    for i in range(start, start + n):
        plen, rlen = int(rng.integers(3, 60)), int(rng.integers(0, 120))
        greedy = i % 3 == 0
        rows.append({
            "id": f"r{i}", "row_key": f"k{i}", "source": "alpaca", "instruction": f"do thing {i}", "input": "",
            "messages": [{"role": "user", "content": f"do thing {i}"}],
            "prompt_text": f"<user>do thing {i}", "prompt_token_ids": list(range(100, 100 + plen)),
            "response_text": LONG_LINE if i == start else f"answer {i}",
            "response_token_ids": list(range(rlen)),
            "finish_reason": "length" if rlen > 100 else "stop",
            "sampling": {"name": "greedy" if greedy else "t0.7", "temperature": 0.0 if greedy else 0.7,
                         "top_p": 1.0, "max_tokens": 128, "seed": i},
            "num_input_tokens": plen, "num_generated_tokens": rlen,
            "target_model": "tiny-target", "target_hash": "abc", "chat_template_hash": "def",
            "schema_version": 1,
        })
    schema = pa.schema([
        ("id", pa.string()), ("row_key", pa.string()), ("source", pa.string()), ("instruction", pa.string()),
        ("input", pa.string()), ("messages", MESSAGES), ("prompt_text", pa.string()),
        ("prompt_token_ids", IDS), ("response_text", pa.string()), ("response_token_ids", IDS),
        ("finish_reason", pa.string()), ("sampling", SAMPLING), ("num_input_tokens", pa.int32()),
        ("num_generated_tokens", pa.int32()), ("target_model", pa.string()), ("target_hash", pa.string()),
        ("chat_template_hash", pa.string()), ("schema_version", pa.int32()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


@pytest.fixture
def stage_dir(tmp_path):
    """A stage output: data/ in two files, errors/, and a manifest.json."""
    rng = np.random.default_rng(0)
    out = tmp_path / "generate"
    (out / "data").mkdir(parents=True)
    (out / "errors").mkdir()
    a, b = _distill_rows(0, 13, rng), _distill_rows(13, 9, rng)
    pq.write_table(a, out / "data" / "part-0.parquet")
    pq.write_table(b, out / "data" / "part-1.parquet")
    errors = pa.table({"id": ["e0", "e1", "e2"], "row_key": ["k90", "k91", "k92"], "source": ["alpaca"] * 3,
                       "stage": ["generate"] * 3,
                       "reason": ["prompt_too_long", "prompt_too_long", "empty_response"],
                       "raw": ['{"a": 1}', "{}", "{}"], "schema_version": pa.array([1, 1, 1], pa.int32())})
    pq.write_table(errors, out / "errors" / "part-0.parquet")
    (out / "manifest.json").write_text(json.dumps({"stage": "generate", "rows": 22, "errors": 3,
                                                   "config": {"seed": 0}}))
    return out, pa.concat_tables([a, b])


def _expected(values) -> dict:
    """The same statistics from numpy (percentile method "linear", its default), as inspect documents."""
    v = np.asarray(values)
    return {"count": len(v), "mean": v.mean(), "p50": np.median(v),
            "p95": np.percentile(v, 95, method="linear"), "min": v.min(), "max": v.max()}


def test_summarize_stage_folder(stage_dir):
    out, table = stage_dir
    s = summarize(out)
    assert set(s["datasets"]) == {"data", "errors"}
    assert s["manifest"]["stage"] == "generate"
    data, errors = s["datasets"]["data"], s["datasets"]["errors"]
    assert (data["rows"], data["files"]) == (22, 2)
    assert (errors["rows"], errors["files"]) == (3, 1)
    assert ("prompt_token_ids", "list<element: int32>") in data["schema"]

    plens = [len(x) for x in table["prompt_token_ids"].to_pylist()]
    rlens = [len(x) for x in table["response_token_ids"].to_pylist()]
    cases = {"prompt_token_ids": plens, "response_token_ids": rlens,
             "num_input_tokens": plens, "num_generated_tokens": rlens}
    assert set(data["lengths"]) == set(cases)
    for col, values in cases.items():
        got, want = data["lengths"][col], _expected(values)
        assert got["count"] == want["count"] and got["nulls"] == 0
        for k in ("mean", "p50", "p95", "min", "max"):
            assert got[k] == pytest.approx(want[k]), (col, k)

    finish = table["finish_reason"].to_pylist()
    assert data["counts"]["finish_reason"] == {r: finish.count(r) for r in set(finish)}
    names = [s["name"] for s in table["sampling"].to_pylist()]
    assert data["counts"]["sampling.name"] == {"t0.7": names.count("t0.7"), "greedy": names.count("greedy")}
    assert data["counts"]["schema_version"] == {1: 22}
    assert errors["counts"]["reason"] == {"prompt_too_long": 2, "empty_response": 1}
    assert list(errors["counts"]["reason"]) == ["prompt_too_long", "empty_response"]  # most frequent first
    assert errors["lengths"] == {}


def test_inspect_main_prints_stats_counts_and_clipped_samples(stage_dir):
    out, table = stage_dir
    buf = io.StringIO()
    assert inspect_main(str(out), rows=2, out=buf) == 0
    text = buf.getvalue()
    assert "== data: 22 rows in 2 files ==" in text and "== errors: 3 rows in 1 file ==" in text
    assert "manifest.json:" in text and "stage: generate" in text
    rlens = [len(x) for x in table["response_token_ids"].to_pylist()]
    want = _expected(rlens)
    table_lines = text.split("token lengths:\n", 1)[1].splitlines()
    line = next(ln for ln in table_lines if ln.strip().startswith("response_token_ids "))
    assert line.split()[1:] == [str(want["count"]), f"{want['mean']:.1f}", f"{want['p50']:.1f}",
                                f"{want['p95']:.1f}", str(want["max"])]
    assert "prompt_too_long" in text and "empty_response" in text
    assert "sample row 1:" in text and "sample row 2:" not in text
    # The long multi-line response: newline shown as ⏎, cut at CLIP characters with the rest counted.
    clipped = render(LONG_LINE)
    assert clipped.startswith("first line⏎second line x") and clipped.endswith(f"… (+{len(LONG_LINE) - CLIP} chars)")
    assert clipped in text
    first = table.slice(0, 1).to_pylist()[0]
    assert f"{len(first['prompt_token_ids'])} ids [100, 101, 102, 103, 104, 105, 106, 107, …]" in text
    assert "name=greedy, temperature=0, top_p=1, max_tokens=128, seed=0" in text
    assert "1 item: {role=user, content=do thing 0}" in text


def test_render_values():
    assert render(None) == "null"
    assert render("a\r\nb") == "a⏎b"
    assert render([1, 2, 3]) == "3 ids [1, 2, 3]"
    assert render([]) == "[] (empty)"
    assert render({"k": "v", "n": 2}) == "k=v, n=2"
    assert render(b"\x00ab").startswith("<3 bytes>")


def test_plot_writes_png(stage_dir, tmp_path):
    out, _ = stage_dir
    png = tmp_path / "lengths.png"
    buf = io.StringIO()
    assert inspect_main(str(out), rows=0, plot=str(png), out=buf) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert f"4 histograms written to {png}" in buf.getvalue()
    assert inspect_main(str(out), rows=0, plot=str(tmp_path / "no" / "such" / "dir.png"), out=io.StringIO()) == 2


def test_single_file_and_zero_rows(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"response_token_ids": pa.array([], IDS), "finish_reason": pa.array([], pa.string())}),
                   path)
    s = summarize(path)
    assert list(s["datasets"]) == ["empty.parquet"]
    ds_ = s["datasets"]["empty.parquet"]
    assert ds_["rows"] == 0 and ds_["lengths"]["response_token_ids"]["count"] == 0 and ds_["samples"] == []
    buf = io.StringIO()
    assert inspect_main(str(path), plot=str(tmp_path / "p.png"), out=buf) == 0
    assert "0 rows (empty data set)" in buf.getvalue() and "nothing written" in buf.getvalue()
    assert not (tmp_path / "p.png").exists()


def test_any_parquet_hive_partitions_and_nulls(tmp_path):
    """No column is required; Hive partition folders belong to the set above them."""
    for part, ids in (("a", [[1, 2], None]), ("b", [[3]])):
        (tmp_path / f"lang={part}").mkdir()
        pq.write_table(pa.table({"x_token_ids": pa.array(ids, IDS)}), tmp_path / f"lang={part}" / "p.parquet")
    s = summarize(tmp_path)
    only = s["datasets"]["."]
    assert only["rows"] == 3 and ("lang", "string") in only["schema"]
    assert only["lengths"]["x_token_ids"] == {"count": 2, "nulls": 1, "mean": 1.5, "p50": 1.5, "p95": 1.95,
                                               "min": 1, "max": 2}
    other = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"v": [1.5]}), other)
    assert summarize(other)["datasets"]["plain.parquet"]["lengths"] == {}


@pytest.mark.parametrize("case", ["missing", "not_parquet", "empty_folder", "folder_of_junk"])
def test_bad_paths_exit_2_with_one_line(tmp_path, capsys, case):
    path = tmp_path / case
    if case == "not_parquet":
        path = tmp_path / "notes.parquet"
        path.write_text("id,text\n1,hello\n")
    elif case == "empty_folder":
        path.mkdir()
        (path / "README.txt").write_text("nothing here")
    elif case == "folder_of_junk":
        path.mkdir()
        (path / "part-0.parquet").write_bytes(b"not parquet at all")
    buf = io.StringIO()
    assert inspect_main(str(path), out=buf) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err
    assert buf.getvalue() == ""
