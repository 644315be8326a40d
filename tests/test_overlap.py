"""Word n-gram overlap: near duplicates, and the evaluation prompts kept out of the distillation set
(data/overlap.py), checked on made-up texts and on the bundled seeds against the bundled evaluation sets."""

import json
from pathlib import Path

import pytest

from draftalign.config import ConfigError, ExcludeEvalConfig, load_config
from draftalign.data.overlap import HeldOutPrompt, HeldOutPrompts, NearDuplicates, jaccard, shingles, words
from draftalign.data.seeds import prepare_seeds, read_seed_file
from draftalign.pipelines.generate import drop_held_out, held_out_prompts, seed_text

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = EXAMPLES / "tiny.yaml"
THRESHOLD = ExcludeEvalConfig().threshold  # the default the tests hold to

SUMMARY = ("collections.Counter is a dictionary subclass for counting hashable objects. You can build one from "
           "any iterable, and it tallies how often each element appears.")
PROMPTS = [
    HeldOutPrompt("open/1", "Which parts of the standard library should a beginner learn first, and why?"),
    HeldOutPrompt("sum/1", f"Summarize the following passage in one or two sentences.\n\n{SUMMARY}", SUMMARY),
    HeldOutPrompt("tr/1", 'Convert the following Python 2 code into Python 3 code.\n\nprint "Hello, world"',
                  'print "Hello, world"'),
    HeldOutPrompt("tr/2", 'Convert the following Python 2 code into Python 3 code.\n\nprint "Total:", total,',
                  'print "Total:", total,'),
    HeldOutPrompt("short/1", "Explain decorators."),
]


def test_words_and_shingles_ignore_case_punctuation_and_spacing():
    assert words("  What's   NEW?\u00a0in 3.12 ") == ["what", "s", "new", "in", "3", "12"]
    assert shingles(words("a b c d")) == {"a b c", "b c d"}
    assert shingles(words("a b")) == {"a b"} and shingles([]) == set()
    assert jaccard({"x"}, {"x"}) == 1.0 and jaccard(set(), set()) == 0.0


def test_near_duplicates_by_jaccard_with_the_opener_left_out():
    seen = NearDuplicates(0.6)
    seen.add("seed 1", "Explain how a hash map works in simple terms.")
    match = seen.match("explain how a HASH map works in simple terms, please")
    assert match is not None and match.key == "seed 1" and match.score == pytest.approx(7 / 8, abs=1e-3)
    assert seen.match("Explain how a linked list works.") is None
    # The opener is the pipeline's text, not the model's: alone it would make these look alike.
    opener = "Write a Python function that"
    code = NearDuplicates(0.6)
    code.add("request 0", f"{opener} reverses a string.", opener)
    assert code.match(f"{opener} reverses a list.", opener) is None
    assert code.match(f"{opener} reverses a string!", opener).key == "request 0"


@pytest.mark.parametrize("text, key", [
    ("Which parts of the standard library should a beginner learn first, and why?", "open/1"),  # exact
    ("WHICH parts of the standard-library should a beginner learn first and why", "open/1"),  # case, punctuation
    ("Which parts of the standard library should a novice learn first, and why?", "open/1"),  # one word changed
    ("Answer briefly. Which parts of the standard library should a beginner learn first, and why? Thanks!", "open/1"),
    (f"Give me a one-line TL;DR of this:\n{SUMMARY}", "sum/1"),  # the passage under other words
    ('Convert the following Python 2 code into Python 3 code.\n\nprint "Hello, world"', "tr/1"),
    ("Please explain decorators.", "short/1"),  # a short prompt, found as a run of words
])
def test_copies_and_near_copies_of_an_evaluation_prompt_are_found(text, key):
    match = HeldOutPrompts(PROMPTS, THRESHOLD).match(text)
    assert match is not None and match.key == key, match
    assert HeldOutPrompts(PROMPTS, THRESHOLD).reason(text).startswith("evaluation prompt: holds ")


@pytest.mark.parametrize("text", [
    "Which parts of a web framework should a beginner learn first?",  # same opening, another question
    "Summarize the following passage in one or two sentences.\n\nThe GIL lets one thread run Python at a time.",
    'Convert the following Python 2 code into Python 3 code.\n\nprint "Goodbye"',  # the template, another input
    "How do I print hello world in Python?",
    "Explain how decorators wrap functions.",  # the short prompt's words, not as one run
])
def test_other_requests_on_the_same_template_or_topic_are_no_copies(text):
    assert HeldOutPrompts(PROMPTS, THRESHOLD).match(text) is None


def test_the_prompts_of_one_task_are_not_copies_of_each_other():
    """The translate prompts share their instruction and differ only by a short input: the rule must tell
    them apart, or it would call every request on that template a leak."""
    held = HeldOutPrompts(PROMPTS, THRESHOLD)
    assert held.match(PROMPTS[2].text).key == "tr/1" and held.match(PROMPTS[3].text).key == "tr/2"
    assert held.score("tr/2", words(PROMPTS[2].text), shingles(words(PROMPTS[2].text))) < THRESHOLD


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    cfg = load_config(TINY, [f"run.output={tmp_path_factory.mktemp('overlap')}"])
    return cfg, held_out_prompts(cfg)


def _bundled_eval_rows() -> list[dict]:
    rows = []
    for f in sorted((EXAMPLES / "data" / "eval").glob("*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def test_every_bundled_evaluation_prompt_is_held_out_and_found(bundled):
    cfg, held = bundled
    rows = _bundled_eval_rows()
    assert [t.kind for t in cfg.evaluate.tasks] == ["open_ended", "summarize", "translate"]
    assert len(held) == len(rows)  # all of them, not only the evaluate stage's first max_prompts
    for row in rows:
        text = (row["instruction"] + "\n\n" + (row.get("input") or "")).strip()
        match = held.match(text)
        assert match is not None and match.key.endswith("/" + row["id"]) and match.score == 1.0


def test_no_bundled_seed_copies_a_bundled_evaluation_prompt(bundled):
    _, held = bundled
    seeds, _ = prepare_seeds(read_seed_file(EXAMPLES / "data" / "seeds.jsonl"),
                             load_config(TINY).generate.fields, "seeds.jsonl")
    assert len(seeds) == 347
    kept, dropped = drop_held_out(seeds, held)
    assert dropped == [] and kept == seeds
    # The margin: no seed comes near the threshold (the closest holds about a quarter).
    texts = [(w, shingles(w)) for w in (words(seed_text(s)) for s in seeds)]
    closest = max(held.score(k, w, g) for w, g in texts for k in held.keys())
    assert closest < THRESHOLD / 1.5, closest


def test_a_seed_copying_an_evaluation_prompt_is_dropped_with_its_reason(bundled):
    _, held = bundled
    row = _bundled_eval_rows()[0]
    seeds = [{"id": "s1", "source": "x", "messages": [{"role": "user", "content": row["instruction"].upper()}]},
             {"id": "s2", "source": "x", "messages": [{"role": "user", "content": "Add 2 and 3."}]}]
    kept, errors = drop_held_out(seeds, held)
    assert [s["id"] for s in kept] == ["s2"]
    assert errors[0]["id"] == "s1" and errors[0]["reason"].startswith("evaluation prompt: holds 100% of the word "
                                                                      f"3-grams of open_ended/{row['id']}")


def test_exclude_eval_can_be_turned_off_and_an_unreadable_set_stops_the_run(tmp_path):
    assert held_out_prompts(load_config(TINY, ["generate.exclude_eval.enabled=false"])) is None
    cfg = load_config(TINY, [f"run.output={tmp_path}",
                             f"evaluate.tasks=[{{name: mine, kind: open_ended, data: {tmp_path}/none.jsonl}}]"])
    with pytest.raises(ConfigError, match="generate.exclude_eval: cannot read the prompts of evaluation task 'mine'"):
        held_out_prompts(cfg)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"instruction": f"Question number {i} about lists?"}) + "\n" for i in range(9)))
    cfg = load_config(TINY, [f"evaluate.tasks=[{{name: mine, kind: open_ended, data: {few}}}]",
                             "generate.exclude_eval.max_prompts=3", "evaluate.max_prompts=5"])
    assert len(held_out_prompts(cfg)) == 5  # at least the prompts the evaluate stage reads
