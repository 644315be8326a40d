"""Seeds, prompt rendering and the Parquet row contracts of `draftalign generate` (no Ray)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from draftalign.config import SamplingSetting, SeedFields, default_sampling_settings
from draftalign.data.prompts import chat_template_hash, encode_prompt, render_prompt
from draftalign.data.schemas import (
    DISTILL_SCHEMA,
    DISTILL_SCHEMA_VERSION,
    ERROR_SCHEMA,
    SEED_SCHEMA,
    check_table,
    row_key,
    to_table,
)
from draftalign.data.seeds import normalize_text, prepare_seeds, read_seed_file, seed_id
from draftalign.util.atomicio import write_parquet_atomic

SEEDS = Path(__file__).resolve().parents[1] / "examples" / "data" / "seeds.jsonl"
DOLLY = SeedFields(instruction="instruction", input="context", source="category")


# ---------------------------------------------------------------- seeds


def test_bundled_seeds_load_with_default_mapping():
    good, errors = prepare_seeds(read_seed_file(SEEDS), SeedFields(), source="bundled")
    assert errors == []
    assert len(good) >= 300
    assert good[0]["id"] == seed_id(good[0]["instruction"]) and good[0]["source"] == "bundled"
    with_ids, errors = prepare_seeds(read_seed_file(SEEDS), SeedFields(id="id"), source="bundled")
    assert errors == [] and len(with_ids) == len(good) and with_ids[0]["id"] == "seed-0001"
    with_input = [g for g in good if g["input"] is not None]
    assert with_input, "some bundled seeds carry a code snippet"
    g = with_input[0]
    assert g["messages"] == [{"role": "user", "content": g["instruction"] + "\n\n" + g["input"]}]
    assert set(good[0]) == {"id", "source", "instruction", "input", "messages"}


def test_dolly_mapping_uses_context_and_category():
    rows = [
        {"instruction": "Name a sorting algorithm.", "context": "", "response": "x", "category": "open_qa"},
        {"instruction": "Summarize this.", "context": "A passage.", "response": "y", "category": "summarization"},
    ]
    good, errors = prepare_seeds(rows, DOLLY, source="dolly")
    assert errors == []
    assert good[0]["input"] is None and good[0]["source"] == "open_qa"  # empty context = no input
    assert good[0]["messages"][0]["content"] == "Name a sorting algorithm."
    assert good[1]["messages"][0]["content"] == "Summarize this.\n\nA passage."
    assert good[1]["id"] == seed_id("Summarize this.\n\nA passage.")


def test_messages_mapping_takes_openassistant_turns():
    turns = [{"role": "prompter", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "prompter", "content": "what is a list?"}]
    good, errors = prepare_seeds([{"conv": turns, "mid": 7}], SeedFields(messages="conv", id="mid"), "oasst")
    assert errors == []
    assert good[0]["id"] == "7" and good[0]["instruction"] == "what is a list?" and good[0]["input"] is None
    assert [t["role"] for t in good[0]["messages"]] == ["user", "assistant", "user"]


BAD_CASES = [
    ({"prompt": "no instruction column"}, "missing field 'instruction'"),
    ({"instruction": None}, "missing field 'instruction' (null)"),
    ({"instruction": "   \n"}, "empty text in field 'instruction'"),
    ({"instruction": 42}, "not text: field 'instruction' holds int"),
    ({"instruction": ["a", "list"]}, "not text: field 'instruction' holds list"),
    ({"instruction": "ok", "input": 3.5}, "not text: field 'input' holds float"),
    ({"instruction": "bad \ud800 surrogate"}, "invalid UTF-8 in field 'instruction': lone surrogate"),
    ({"instruction": b"\xff\xfe bytes"}, "invalid UTF-8 in field 'instruction'"),
    ({"instruction": "WRITE  a Function\tthat adds."}, "duplicate of an earlier seed"),
]


@pytest.mark.parametrize("bad,reason", BAD_CASES)
def test_each_bad_row_gives_one_error_and_good_rows_survive(bad, reason):
    rows = [{"instruction": "Write a function that adds."}, bad, {"instruction": "Explain decorators."}]
    good, errors = prepare_seeds(rows, SeedFields(), source="t")
    assert [g["instruction"] for g in good] == ["Write a function that adds.", "Explain decorators."]
    assert len(errors) == 1
    assert errors[0]["reason"].startswith(reason), errors[0]["reason"]
    assert errors[0]["source"] == "t"
    assert set(errors[0]) == {"id", "source", "reason", "raw"}
    assert isinstance(errors[0]["raw"], str) and len(errors[0]["raw"]) <= 2000
    errors[0]["raw"].encode("utf-8")  # always writable, even for the surrogate row


def test_duplicate_names_the_kept_id():
    rows = [{"id": "a", "instruction": "Explain  GIL."}, {"id": "b", "instruction": "explain gil."}]
    good, errors = prepare_seeds(rows, SeedFields(id="id"), source="t")
    assert [g["id"] for g in good] == ["a"]
    assert errors[0]["id"] == "b" and "'a'" in errors[0]["reason"]
    rows = [{"id": "a", "instruction": "one"}, {"id": "a", "instruction": "two"}]
    good, errors = prepare_seeds(rows, SeedFields(id="id"), source="t")
    assert len(good) == 1 and errors[0]["reason"].startswith("duplicate id 'a'")


@pytest.mark.parametrize(
    "conv",
    [
        "not a list",
        [],
        [{"role": "user"}],
        [{"role": "wizard", "content": "x"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],  # ends with assistant
        [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}],
        ["just a string"],
    ],
)
def test_malformed_messages(conv):
    rows = [{"m": [{"role": "user", "content": "fine"}]}, {"m": conv}]
    good, errors = prepare_seeds(rows, SeedFields(messages="m"), source="t")
    assert len(good) == 1 and len(errors) == 1
    assert errors[0]["reason"].startswith("malformed messages"), errors[0]["reason"]


def test_bad_jsonl_lines_become_error_rows(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(
        b'{"instruction": "first"}\n'
        b"{not json\n"
        b"[1, 2]\n"
        b"\n"
        b'{"instruction": "bad \xff byte"}\n'
        b'{"instruction": "last"}\n'
    )
    good, errors = prepare_seeds(read_seed_file(path), SeedFields(), source="file")
    assert [g["instruction"] for g in good] == ["first", "last"]
    reasons = [e["reason"] for e in errors]
    assert reasons[0].startswith("line 2: not valid JSON: ")
    assert reasons[1].startswith("line 3: not a JSON object")
    assert reasons[2].startswith("line 5: invalid UTF-8")
    assert errors[0]["raw"] == "{not json" and errors[0]["id"] is None


def test_read_seed_file_parquet_and_bad_paths(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "input": [None, "ctx"]}), path)
    good, errors = prepare_seeds(read_seed_file(path), SeedFields(), source="p")
    assert errors == [] and good[1]["messages"][0]["content"] == "b\n\nctx"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_seed_file(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"\.jsonl, \.parquet"):
        read_seed_file(tmp_path / "s.csv")


def test_max_seeds_and_stable_ids():
    rows = [{"instruction": f"Task number {i}."} for i in range(10)]
    good, _ = prepare_seeds(rows, SeedFields(), source="t", max_seeds=3)
    assert [g["instruction"] for g in good] == ["Task number 0.", "Task number 1.", "Task number 2."]
    again, _ = prepare_seeds(rows, SeedFields(), source="t")
    assert [g["id"] for g in again[:3]] == [g["id"] for g in good]
    assert seed_id("Hello  World") == seed_id(" hello world\n") == seed_id("ｈｅｌｌｏ world")
    assert seed_id("hello") != seed_id("hello!")
    assert seed_id("x").startswith("s-") and len(seed_id("x")) == 18
    assert normalize_text("  A\u00a0B\n\tC ") == "a b c"


# ---------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from draftalign.data.tokenization import load_tokenizer, materialize_tokenizer

    return load_tokenizer(materialize_tokenizer("embedded", tmp_path_factory.mktemp("t") / "tok"))


def test_llama2_rendering(tok):
    msgs = [{"role": "user", "content": "hello"}]
    assert render_prompt(tok, msgs, None) == "<s>[INST] hello [/INST]"
    assert render_prompt(tok, msgs, "") == "<s>[INST] hello [/INST]"
    with_sys = render_prompt(tok, msgs, "Be brief.")
    assert with_sys == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhello [/INST]"
    own = [{"role": "system", "content": "Own."}, *msgs]
    assert "<<SYS>>\nOwn.\n<</SYS>>" in render_prompt(tok, own, "Be brief.")
    ids = encode_prompt(tok, render_prompt(tok, msgs, None))
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # exactly one BOS
    h = chat_template_hash(tok)
    assert len(h) == 16 and h == chat_template_hash(tok)


def test_sampling_settings():
    names = [s.name for s in default_sampling_settings()]
    assert names == ["greedy", "t0.7", "t1.0"]
    greedy, t07, _ = default_sampling_settings(max_tokens=64, seed=3)
    assert greedy.greedy and greedy.seed is None and t07.top_p == 0.95 and t07.seed == 3
    for bad in [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(max_tokens=0), dict(oops=1)]:
        with pytest.raises(ValidationError):
            SamplingSetting(**{"name": "x", "temperature": 0.5, **bad})
    with pytest.raises(ValidationError):
        SamplingSetting(name="a/b", temperature=0.5)  # would break row_key


# ---------------------------------------------------------------- schemas


def _distill_row(i: int = 0) -> dict:
    s = default_sampling_settings()[1]
    return {
        "id": f"seed-{i}", "row_key": row_key(f"seed-{i}", s.name), "source": "bundled",
        "instruction": "hi", "input": None, "messages": [{"role": "user", "content": "hi"}],
        "prompt_text": "<s>[INST] hi [/INST]", "prompt_token_ids": [1, 518, 25580],
        "response_text": "Hello.", "response_token_ids": [15043, 29889, 2], "finish_reason": "stop",
        "sampling": s.model_dump(), "num_input_tokens": 3, "num_generated_tokens": 3,
        "target_model": "tiny", "target_hash": "abc", "chat_template_hash": "0123456789abcdef",
        "generator_model": "tiny", "generator_hash": "abc",
    }


def test_distill_round_trip_through_parquet_and_duckdb(tmp_path):
    table = to_table([_distill_row(0), _distill_row(1)], DISTILL_SCHEMA)
    path = write_parquet_atomic(table, tmp_path / "out" / "distill.parquet")
    assert [p.name for p in path.parent.iterdir()] == ["distill.parquet"]  # no temp file left
    back = pq.read_table(path)
    check_table(back, DISTILL_SCHEMA)
    types = {r[0]: r[1] for r in duckdb.sql(f"describe select * from '{path}'").fetchall()}
    assert types["prompt_token_ids"] == "INTEGER[]" and types["response_token_ids"] == "INTEGER[]"
    assert types["messages"] == "STRUCT(\"role\" VARCHAR, \"content\" VARCHAR)[]"
    assert types["sampling"].startswith("STRUCT(\"name\" VARCHAR, temperature FLOAT, top_p FLOAT, max_tokens INTEGER")
    assert types["schema_version"] == "INTEGER" and types["input"] == "VARCHAR"
    rows = duckdb.sql(f"select row_key, sampling.name, schema_version, input from '{path}' order by 1").fetchall()
    v = DISTILL_SCHEMA_VERSION
    assert rows == [("seed-0/t0.7", "t0.7", v, None), ("seed-1/t0.7", "t0.7", v, None)]


def test_error_and_seed_tables(tmp_path):
    good, errors = prepare_seeds([{"instruction": "a"}, {"instruction": 5}], SeedFields(), source="t")
    seeds = to_table(good, SEED_SCHEMA)
    errs = to_table([{**e, "stage": "seeds"} for e in errors], ERROR_SCHEMA)  # row_key left out: null
    for name, t, schema in [("seeds", seeds, SEED_SCHEMA), ("errors", errs, ERROR_SCHEMA)]:
        path = write_parquet_atomic(t, tmp_path / f"{name}.parquet")
        check_table(pq.read_schema(path), schema)
        assert duckdb.sql(f"select count(*) from '{path}'").fetchall()[0][0] == 1
    assert errs.column("row_key").null_count == 1


@pytest.mark.parametrize(
    "change,match",
    [
        ({"prompt_token_ids": [1, "2"]}, r"row 1, column 'prompt_token_ids'\[1\]"),
        ({"prompt_token_ids": [1, 2**40]}, r"row 1, column 'prompt_token_ids'"),
        ({"num_input_tokens": 1.5}, r"row 1, column 'num_input_tokens'"),
        ({"num_input_tokens": True}, r"row 1, column 'num_input_tokens'"),
        ({"finish_reason": None}, r"row 1, column 'finish_reason'.*required"),
        ({"sampling": {"name": "x"}}, r"row 1, column 'sampling'\.temperature"),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, r"column 'messages'\[0\].*extra"),
        ({"surprise": 1}, r"row 1: unexpected columns \['surprise'\]"),
        ({"schema_version": 99}, r"row 1, column 'schema_version'"),
    ],
)
def test_to_table_errors_name_row_and_column(change, match):
    bad = {**_distill_row(1), **change}
    with pytest.raises(ValueError, match=match):
        to_table([_distill_row(0), bad], DISTILL_SCHEMA)


def test_missing_required_column_and_check_table():
    row = _distill_row()
    del row["target_hash"]
    with pytest.raises(ValueError, match=r"row 0, column 'target_hash'"):
        to_table([row], DISTILL_SCHEMA)
    old = pa.schema([f for f in DISTILL_SCHEMA if f.name != "row_key"]).set(0, pa.field("id", pa.int64()))
    with pytest.raises(ValueError, match=r"schema_version.*missing column 'row_key'.*column 'id' is int64"):
        check_table(old, DISTILL_SCHEMA)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    write_parquet_atomic(to_table([_distill_row()], DISTILL_SCHEMA), path)

    def dies_midway(table, where, **kw):
        where.write(b"PAR1 half a file")
        raise RuntimeError("killed")

    monkeypatch.setattr(pq, "write_table", dies_midway)
    with pytest.raises(RuntimeError, match="killed"):
        write_parquet_atomic(to_table([_distill_row(), _distill_row(1)], DISTILL_SCHEMA), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]
    assert pq.read_table(path).num_rows == 1
    assert pq.read_schema(path).metadata[b"draftalign.schema_version"] == b"2"


def test_a_version_1_distillation_set_still_reads_and_a_newer_one_is_named(tmp_path):
    from draftalign.data.schemas import DISTILL_SCHEMA_V1, distill_schema_for

    v1 = {k: v for k, v in _distill_row().items() if not k.startswith("generator")}
    path = write_parquet_atomic(to_table([v1], DISTILL_SCHEMA_V1), tmp_path / "v1.parquet")
    have = pq.read_schema(path)
    assert pq.read_table(path).column("schema_version").to_pylist() == [1]  # as version 1 wrote it
    assert distill_schema_for(have) is DISTILL_SCHEMA_V1
    check_table(have, distill_schema_for(have))
    with pytest.raises(ValueError, match=r"schema_version 2 \(file says schema_version 1\): missing column 'generator_model'"):
        check_table(have, DISTILL_SCHEMA)  # held to version 2 it would fail: the reader picks by version
    with pytest.raises(ValueError, match=r"row 0, column 'generator_hash'"):
        to_table([{**_distill_row(), "generator_hash": None}], DISTILL_SCHEMA)
    newer = have.with_metadata({b"draftalign.schema_version": b"3"})
    with pytest.raises(ValueError, match="schema_version 3 is not one this draftalign reads"):
        distill_schema_for(newer)
