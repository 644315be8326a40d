"""Checks on the hand-written data bundled in examples/data (see its README.md).

Standard library plus pytest only; runs in well under a second.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from pathlib import Path

import pytest

DATA = Path(__file__).parent.parent / "examples" / "data"
SEEDS = DATA / "seeds.jsonl"
EVAL = {
    "open_ended": DATA / "eval" / "open_ended.jsonl",
    "summarize": DATA / "eval" / "summarize.jsonl",
    "translate": DATA / "eval" / "translate.jsonl",
}

SEED_CATEGORIES = {
    "write-function",
    "explain-code",
    "fix-bug",
    "docstring",
    "refactor",
    "test",
    "stdlib-usage",
    "concept-question",
}

# file -> (required fields, optional fields, id pattern)
SCHEMAS = {
    "seeds": ({"id", "instruction", "category"}, {"input"}, r"seed-\d{4}"),
    "open_ended": ({"id", "instruction"}, set(), r"open-\d{3}"),
    "summarize": ({"id", "instruction", "input"}, set(), r"sum-\d{3}"),
    "translate": ({"id", "instruction", "input"}, set(), r"tr-\d{3}"),
}
PATHS = {"seeds": SEEDS, **EVAL}
MIN_ROWS = {"seeds": 300, "open_ended": 50, "summarize": 50, "translate": 50}

_PUNCT = set(string.punctuation)


def normalise(text: str) -> str:
    """Lowercase, drop punctuation (ASCII and Unicode P*), collapse whitespace."""
    kept = (ch for ch in text.lower() if ch not in _PUNCT and not unicodedata.category(ch).startswith("P"))
    return " ".join("".join(kept).split())


def load(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf"), f"{path.name}: unexpected UTF-8 BOM"
    text = raw.decode("utf-8")  # strict: raises on invalid UTF-8
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the empty remainder after the final newline
    rows = []
    for lineno, line in enumerate(lines, 1):
        assert line.strip(), f"{path.name}:{lineno}: blank line"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:  # pragma: no cover - failure path
            pytest.fail(f"{path.name}:{lineno}: invalid JSON: {exc}")
        assert isinstance(obj, dict), f"{path.name}:{lineno}: not a JSON object"
        rows.append(obj)
    return rows


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {name: load(path) for name, path in PATHS.items()}


def test_files_exist():
    for path in [*PATHS.values(), DATA / "README.md"]:
        assert path.is_file(), f"missing {path}"


@pytest.mark.parametrize("name", list(PATHS))
def test_schema_and_strings(data, name):
    required, optional, id_pattern = SCHEMAS[name]
    for row in data[name]:
        keys = set(row)
        assert required <= keys, f"{name} {row.get('id')}: missing {required - keys}"
        assert keys <= required | optional, f"{name} {row.get('id')}: extra {keys - required - optional}"
        for key, value in row.items():
            assert isinstance(value, str), f"{name} {row['id']}.{key}: not a string"
            assert value.strip(), f"{name} {row['id']}.{key}: empty"
            allowed = {"\n", "\t"} if key == "input" else set()
            for ch in value:
                cat = unicodedata.category(ch)
                assert cat != "Cc" or ch in allowed, f"{name} {row['id']}.{key}: control char {ch!r}"
                assert cat != "Cs", f"{name} {row['id']}.{key}: lone surrogate"
                assert ch != "\ufffd", f"{name} {row['id']}.{key}: replacement character"
        assert re.fullmatch(id_pattern, row["id"]), f"{name}: bad id {row['id']!r}"


@pytest.mark.parametrize("name", list(PATHS))
def test_ids_unique_and_counts(data, name):
    ids = [row["id"] for row in data[name]]
    assert len(ids) == len(set(ids)), f"{name}: duplicate ids"
    assert len(ids) >= MIN_ROWS[name], f"{name}: only {len(ids)} rows"


def test_seed_categories(data):
    seeds = data["seeds"]
    cats = {row["category"] for row in seeds}
    assert cats <= SEED_CATEGORIES, f"unknown categories: {cats - SEED_CATEGORIES}"
    assert cats == SEED_CATEGORIES, f"unused categories: {SEED_CATEGORIES - cats}"
    assert sum("input" in row for row in seeds) >= 20


def test_no_duplicate_seeds(data):
    seen: dict[str, str] = {}
    for row in data["seeds"]:
        key = normalise(row["instruction"] + " " + row.get("input", ""))
        assert key not in seen, f"{row['id']} duplicates {seen[key]}"
        seen[key] = row["id"]
    instr = [normalise(row["instruction"]) for row in data["seeds"]]
    dupes = {t for t in instr if instr.count(t) > 1}
    assert not dupes, f"duplicate seed instructions: {sorted(dupes)[:3]}"


def test_eval_pairs_unique(data):
    for name in EVAL:
        pairs = [(normalise(r["instruction"]), normalise(r.get("input", ""))) for r in data[name]]
        assert len(pairs) == len(set(pairs)), f"{name}: duplicate instruction/input pairs"


def test_summarize_passages(data):
    for row in data["summarize"]:
        assert row["instruction"].lower().startswith("summarize"), row["id"]
        words = len(row["input"].split())
        assert 60 <= words <= 150, f"{row['id']}: passage has {words} words"


def test_eval_disjoint_from_seeds(data):
    seed_texts = set()
    seed_pairs = set()
    for row in data["seeds"]:
        seed_texts.add(normalise(row["instruction"]))
        if "input" in row:
            seed_texts.add(normalise(row["input"]))
        seed_pairs.add(normalise(row["instruction"] + " " + row.get("input", "")))
    for name in EVAL:
        for row in data[name]:
            for key in ("instruction", "input"):
                if key in row:
                    assert normalise(row[key]) not in seed_texts, (
                        f"{row['id']}.{key} also appears in the seeds"
                    )
            pair = normalise(row["instruction"] + " " + row.get("input", ""))
            assert pair not in seed_pairs, f"{row['id']} duplicates a seed"


def test_eval_not_near_copy_of_seeds(data):
    seed_sets = [set(normalise(r["instruction"]).split()) for r in data["seeds"]]
    for name in EVAL:
        for row in data[name]:
            for key in ("instruction", "input"):
                words = set(normalise(row.get(key, "")).split())
                if len(words) < 4:
                    continue
                for i, seed in enumerate(seed_sets):
                    jaccard = len(words & seed) / len(words | seed)
                    assert jaccard < 0.8, (
                        f"{row['id']}.{key} is a near-copy of {data['seeds'][i]['id']} "
                        f"(Jaccard {jaccard:.2f})"
                    )
