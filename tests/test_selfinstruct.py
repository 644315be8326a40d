"""Self-instructed seeds (Magpie): the user-turn prefix, the filters, dedupe, the config and the pipeline
around the engine pass (with the engine stubbed: tests/test_selfinstruct_ray.py runs the real one)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from draftalign.config import ConfigError, load_config
from draftalign.data.selfinstruct import (
    SENTINEL,
    Asking,
    Filters,
    as_seeds,
    clean_request,
    drop_reason,
    instruction_id,
    request_seed,
    requests,
    schedule,
    select,
    summary,
    user_turn,
)
from draftalign.data.tokenization import LLAMA2_CHAT_TEMPLATE

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NO_USER = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}"
           "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


class _Tok:
    """Just enough of a tokenizer: a chat template rendered by transformers' own Jinja helper."""

    def __init__(self, template):
        self.chat_template = template

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt, bos_token="<s>",
                                            eos_token="</s>")
        return rendered[0]


def test_chatml_prefix_is_the_default_system_turn_and_the_user_start():
    turn = user_turn(_Tok(CHATML), "smollm2")
    assert turn.prefix == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                           "Face<|im_end|>\n<|im_start|>user\n")
    assert turn.end == "<|im_end|>"
    assert user_turn(_Tok(CHATML), "smollm2", "Be brief.").prefix == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_llama2_prefix_is_bos_and_inst():
    turn = user_turn(_Tok(LLAMA2_CHAT_TEMPLATE), "llama2")
    assert turn == type(turn)(prefix="<s>[INST] ", end="[/INST]")


@pytest.mark.parametrize("template", [NO_USER, None])
def test_a_template_without_a_user_turn_is_a_config_error_naming_the_tokenizer(template):
    with pytest.raises(ConfigError, match="tokenizer 'my/tok' has .*(no user turn|no chat template)") as err:
        user_turn(_Tok(template), "my/tok")
    assert SENTINEL not in str(err.value) and "generate.seeds" in str(err.value)


def test_filters_give_one_reason_per_dropped_request():
    assert drop_reason("Write a poem about the sea.", True, 16, 1000) is None
    assert drop_reason("Write a poem about the sea.", False, 16, 1000).startswith("not ending the turn")
    assert drop_reason("", True, 16, 1000) == "empty"
    assert drop_reason("Hi there", True, 16, 1000) == "too short: 8 characters < min_chars 16"
    assert drop_reason("x" * 1001, True, 16, 1000) == "too long: 1001 characters > max_chars 1000"
    assert clean_request("  What is 2+2? <|im_end|> \n", "<|im_end|>") == "What is 2+2?"


def test_select_dedupes_by_normalised_text_and_against_the_seeds():
    raw = [{"index": 3, "text": "what is  the capital of FRANCE?", "ended": True},
           {"index": 0, "text": "What is the capital of France?", "ended": True},
           {"index": 1, "text": "Explain photosynthesis simply.", "ended": True},
           {"index": 2, "text": "Tell me a long story about", "ended": False},
           {"index": 4, "text": "  ", "ended": True},
           {"index": 5, "text": "Sort a list in Python please", "ended": True}]
    records = select(raw, "", Filters(16, 1000), "self-instruct", taken={"a seed": "Sort a list in Python please"})
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert [r["kept"] for r in records] == [True, True, False, False, False, False]
    assert records[3]["detail"] == "duplicate: same normalised text as request 0"
    assert records[5]["detail"] == "duplicate: same normalised text as a seed" and records[5]["reason"] == "duplicate"
    assert records[0]["id"] == instruction_id("what is the capital of france?") and records[0]["id"].startswith("si-")
    seeds = as_seeds(records)
    assert seeds == [{"id": records[0]["id"], "source": "self-instruct", "instruction": "What is the capital of France?",
                      "input": None, "messages": [{"role": "user", "content": "What is the capital of France?"}]},
                     {"id": records[1]["id"], "source": "self-instruct", "instruction": "Explain photosynthesis simply.",
                      "input": None, "messages": [{"role": "user", "content": "Explain photosynthesis simply."}]}]
    stats = summary(records, generated=6, seconds=30.0)
    assert stats["asked"] == 6 and stats["kept"] == 2 and stats["kept_share"] == round(2 / 6, 4)
    assert stats["dropped_by_reason"] == {"not ending the turn": 1, "empty": 1, "duplicate": 2}
    assert stats["instructions_per_min"] == 12.0
    assert summary(records, generated=0, seconds=None)["instructions_per_min"] is None


def _plain(text="P", ids=(1, 2)):
    return [Asking(None, "", 1.0, text, list(ids))]


def test_requests_get_distinct_seeds_and_the_turns_stops():
    sampling = {"name": "", "temperature": 1.0, "top_p": 1.0, "max_tokens": 32, "seed": 7}
    reqs = requests(3, _plain(), sampling, "<|im_end|>", [2])
    assert [r["row_key"] for r in reqs] == ["q0/self-instruct", "q1/self-instruct", "q2/self-instruct"]
    assert len({r["sampling"]["seed"] for r in reqs}) == 3 and reqs[0]["sampling"]["seed"] == request_seed(7, 0)
    assert reqs[0]["stop"] == ["<|im_end|>"] and reqs[0]["stop_token_ids"] == [2]
    assert reqs[0]["source"] == "self-instruct" and reqs[0]["instruction"] == "" and reqs[0]["prompt_text"] == "P"
    assert requests(1, _plain(ids=[1]), {**sampling, "seed": None}, "", [])[0]["sampling"]["seed"] is None


def test_preprocess_passes_the_stops_to_vllm():
    from draftalign.workers.generate_engine import _preprocess

    sampling = {"name": "", "temperature": 1.0, "top_p": 1.0, "max_tokens": 32, "seed": None}
    row = _preprocess(requests(1, _plain(ids=[1, 5]), sampling, "[/INST]", [])[0])
    assert row["sampling_params"]["stop"] == ["[/INST]"] and "stop_token_ids" not in row["sampling_params"]
    assert "stop" not in row


def test_config_neither_seeds_nor_self_instruct_is_refused_clearly(tmp_path):
    from draftalign.pipelines.generate import describe_generate

    cfg = load_config(TINY, [f"run.output={tmp_path}", "generate.seeds=null"])
    with pytest.raises(ConfigError, match="neither generate.seeds nor generate.self_instruct"):
        describe_generate(cfg)
    cfg = load_config(TINY, [f"run.output={tmp_path}", "generate.seeds=null", "generate.self_instruct.count=8"])
    assert cfg.generate.self_instruct.temperature == 1.0 and cfg.generate.self_instruct.source == "self-instruct"
    assert "up to 8 self-instructed" in describe_generate(cfg)["rows"]
    with pytest.raises(ConfigError, match="min_chars"):
        load_config(TINY, ["generate.self_instruct={count: 4, min_chars: 50, max_chars: 10}"])
    with pytest.raises(ConfigError, match="count"):
        load_config(TINY, ["generate.self_instruct.count=0"])


# The pipeline around the engine pass, with a stub engine that writes fixed answers.

ANSWERS = ["What is the capital of France?", "what is the  capital of france?", "Hi", "",
           "Explain how a hash map works."]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from tests.worlds import tiny_llama

    path = tmp_path_factory.mktemp("si-target") / "t"
    tiny_llama(path, seed=0, hidden=32)
    return path


def _fake_passes(calls):
    """run_passes that answers self-instruct requests from ANSWERS (the last one cut off) and no seed."""
    from draftalign.data.schemas import DISTILL_SCHEMA, to_table
    from draftalign.util.atomicio import write_parquet_atomic
    from draftalign.workers.generate_engine import chunk_file
    from draftalign.workers.generate_rows import distill_row

    def run(cfg, todo, data_dir, ident, eos, template_hash):
        calls.append([r["row_key"] for r in todo])
        rows = []
        for r in todo:
            if not r["row_key"].endswith("/self-instruct"):
                continue
            i = int(r["id"][1:])
            text = ANSWERS[i % len(ANSWERS)]
            ids = [5] * (r["sampling"]["max_tokens"] if i == 4 else 2)  # request 4 runs out of tokens
            rows.append(distill_row({**r, "messages": []}, ids, text, eos_token_id=eos, target_model="t",
                                    target_hash="h", template_hash=template_hash))
        if rows:
            write_parquet_atomic(to_table(rows, DISTILL_SCHEMA), chunk_file(data_dir, rows[0]["row_key"]))
        return {"failed": [], "rows_written": len(rows), "tokens": 0, "seconds": 2.0, "passes": 1}
    return run


def test_pipeline_filters_writes_instructions_and_resumes(monkeypatch, tmp_path, target):
    import draftalign.pipelines.generate as pg

    calls = []
    monkeypatch.setattr(pg, "run_passes", _fake_passes(calls))
    overrides = [f"run.output={tmp_path}", f"models.target={target}", "generate.seeds=null",
                 "generate.self_instruct={count: 5, min_chars: 4, max_tokens: 16}", "generate.engine.max_model_len=128",
                 "generate.sampling=[{name: greedy, temperature: 0, max_tokens: 8}]"]
    manifest = pg.run_generate(load_config(TINY, overrides))
    si = manifest["self_instruct"]
    assert si["asked"] == 5 and si["kept"] == 1 and si["instructions_per_min"] == 150.0
    assert si["dropped_by_reason"] == {"not ending the turn": 1, "empty": 1, "too short": 1, "duplicate": 1}
    assert manifest["source"] == "self-instruct"
    table = pq.read_table(tmp_path / "generate" / "instructions" / "instructions.parquet").to_pylist()
    assert [r["kept"] for r in table] == [True, False, False, False, False]
    assert calls[0] == [f"q{i}/self-instruct" for i in range(5)]
    kept_id = table[0]["id"]
    assert calls[1] == [f"{kept_id}/greedy"]  # the kept request is answered like a seed
    # Rerun: nothing is asked again; a larger count asks only for the new ones.
    calls.clear()
    assert pg.run_generate(load_config(TINY, overrides))["self_instruct"]["instructions_per_min"] is None
    assert calls[0] == [f"{kept_id}/greedy"]  # (the stub wrote no answer rows)
    calls.clear()
    more = [*overrides[:-3], "generate.self_instruct={count: 7, min_chars: 4, max_tokens: 16}", *overrides[-2:]]
    assert pg.run_generate(load_config(TINY, more))["self_instruct"]["asked"] == 7
    assert calls[0] == ["q5/self-instruct", "q6/self-instruct"]
    # Asked otherwise: refused, not mixed.
    hot = [*overrides[:-3], "generate.self_instruct={count: 5, min_chars: 4, max_tokens: 16, temperature: 0.7}", *overrides[-2:]]
    with pytest.raises(ConfigError, match="otherwise"):
        pg.run_generate(load_config(TINY, hot))
    fingerprint = json.loads((tmp_path / "generate" / "instructions" / "fingerprint.json").read_text())
    assert fingerprint["temperature"] == 1.0


def test_pipeline_refuses_a_template_without_a_user_turn_before_any_engine(monkeypatch, tmp_path, target):
    import shutil

    import draftalign.pipelines.generate as pg

    model = tmp_path / "no-user"
    shutil.copytree(target, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = NO_USER
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    calls = []
    monkeypatch.setattr(pg, "run_passes", _fake_passes(calls))
    with pytest.raises(ConfigError, match=f"tokenizer '{model}' has a chat template with no user turn"):
        pg.run_generate(load_config(TINY, [f"run.output={tmp_path}", f"models.target={model}",
                                           "generate.self_instruct.count=3"]))
    assert calls == []


# Kinds of request (Magpie with a seeded opener), near duplicates and evaluation prompts.

def test_schedule_deals_kinds_by_share_and_keeps_earlier_requests_kinds():
    order = schedule([2, 1, 1], 40)
    assert [order.count(k) for k in range(3)] == [20, 10, 10]
    assert order[:4] in ([0, 1, 2, 0], [0, 1, 0, 2])  # interleaved, not all of one kind first
    assert schedule([2, 1, 1], 7) == order[:7]  # asking for more later keeps the kinds already asked
    assert schedule([1.5, 0.5], 8).count(0) == 6


def test_requests_ask_each_kind_with_its_opener():
    sampling = {"name": "", "temperature": 1.0, "top_p": 1.0, "max_tokens": 32, "seed": None}
    askings = [Asking("question", "", 1.0, "P", [1]), Asking("code", "Write a Python function that", 1.0,
                                                          "PWrite a Python function that", [1, 9, 9])]
    reqs = requests(4, askings, sampling, "[/INST]", [])
    assert [r["source"] for r in reqs] == ["self-instruct/question", "self-instruct/code"] * 2
    assert reqs[1]["instruction"] == "Write a Python function that" and reqs[1]["prompt_token_ids"] == [1, 9, 9]
    assert reqs[0]["prompt_text"] == "P" and reqs[0]["instruction"] == ""


def test_select_with_openers_near_duplicates_and_evaluation_prompts():
    from draftalign.data.overlap import HeldOutPrompt, HeldOutPrompts

    code, q = {"kind": "code", "opener": "Write a Python function that"}, {"kind": "question", "opener": ""}
    raw = [{"index": 0, "text": " reverses a string.", "ended": True, **code},
           {"index": 1, "text": "Explain how a hash map works in simple terms.", "ended": True, **q},
           {"index": 2, "text": "", "ended": True, **code},  # the opener alone: the target wrote nothing
           {"index": 3, "text": " sorts.", "ended": True, **code},  # too short, counted after the opener
           {"index": 4, "text": "explain how a HASH map works in simple terms, please", "ended": True, **q},
           {"index": 5, "text": "Which parts of the standard library should a beginner learn first?", "ended": True,
            **q},
           {"index": 6, "text": " reverses a list.", "ended": True, **code}]
    held = HeldOutPrompts([HeldOutPrompt("open_ended/open-004", "Which parts of the standard library should a "
                                         "beginner learn first, and why?")], 0.5)
    records = select(raw, "", Filters(8, 1000, near_duplicate=0.6, held_out=held), "self-instruct")
    assert [r["reason"] for r in records] == [None, None, "empty", "too short", "near duplicate",
                                              "evaluation prompt", None]
    assert records[0]["instruction"] == "Write a Python function that reverses a string."
    assert records[0]["source"] == "self-instruct/code" and records[1]["source"] == "self-instruct/question"
    assert records[3]["detail"] == "too short: 6 characters after the opener < min_chars 8"
    assert records[4]["detail"].startswith("near duplicate: 0.88 of word 3-grams shared with request 1")
    assert "open_ended/open-004" in records[5]["detail"]
    stats = summary(records, 7, 1.0, ["question", "code", "translate"])
    assert stats["asked_by_kind"] == {"question": 3, "code": 4, "translate": 0}
    assert stats["kept_by_kind"] == {"question": 1, "code": 2, "translate": 0}
    assert stats["dropped_by_reason"] == {"empty": 1, "too short": 1, "evaluation prompt": 1, "near duplicate": 1}
    # Without kinds the mix is empty and near duplicates can be turned off.
    plain = select([{"index": i, "text": t, "ended": True} for i, t in enumerate(
        ["Explain how a hash map works in simple terms.", "explain how a HASH map works in simple terms, please"])],
        "", Filters(8, 1000), "self-instruct")
    assert [r["kept"] for r in plain] == [True, True] and summary(plain, 0, None)["kept_by_kind"] == {}


def test_config_kinds_and_filters():
    cfg = load_config(TINY, ["generate.self_instruct={count: 4, kinds: [{name: code, opener: 'Write a function that', "
                             "share: 2}, {name: question}]}"])
    si = cfg.generate.self_instruct
    assert [(k.name, k.opener, k.share) for k in si.kinds] == [("code", "Write a function that", 2.0), ("question", "", 1.0)]
    assert si.near_duplicate == 0.6 and cfg.generate.exclude_eval.enabled and cfg.generate.exclude_eval.threshold == 0.5
    assert load_config(TINY, ["generate.self_instruct={count: 4}"]).generate.self_instruct.kinds is None
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(TINY, ["generate.self_instruct={count: 4, kinds: [{name: a}, {name: a}]}"])
    with pytest.raises(ConfigError, match="share"):
        load_config(TINY, ["generate.self_instruct={count: 4, kinds: [{name: a, share: 0}]}"])
    for example in ("smollm2.yaml", "smollm2-full.yaml"):
        kinds = load_config(TINY.parent / example).generate.self_instruct.kinds
        assert {"question", "code", "summarize", "rewrite", "translate"} <= {k.name for k in kinds}, example


# The pipeline with kinds and the evaluation prompts kept out, the engine stubbed to answer everything.

EVAL = Path(__file__).resolve().parent.parent / "examples" / "data" / "eval"
KINDS = ("generate.self_instruct={count: 6, min_chars: 4, max_tokens: 16, kinds: [{name: question, share: 2}, "
         "{name: code, opener: 'Write a Python function that', share: 1}]}")
# By index; the schedule of shares 2:1 asks question, code, question, question, code, question.
KIND_ANSWERS = ["What are some good habits for naming variables, functions and classes in Python?",  # open-001
                " reverses a string.", "Explain how a hash map works in simple terms.",
                "explain how a HASH map works in simple terms, please", "", "How do I read a CSV file?"]


def _eval_texts() -> list[str]:
    rows = [json.loads(line) for f in sorted(EVAL.glob("*.jsonl")) for line in f.read_text().splitlines()]
    return [(r["instruction"] + "\n\n" + (r.get("input") or "")).strip() for r in rows]


def _answer_all(cfg, todo, data_dir, ident, eos, template_hash):
    """run_passes that answers every request: self-instruct ones from KIND_ANSWERS, the rest with "ok"."""
    from draftalign.data.schemas import DISTILL_SCHEMA, to_table
    from draftalign.util.atomicio import write_parquet_atomic
    from draftalign.workers.generate_engine import chunk_file
    from draftalign.workers.generate_rows import distill_row

    rows = []
    for r in todo:
        text = KIND_ANSWERS[int(r["id"][1:])] if r["row_key"].endswith("/self-instruct") else "ok"
        rows.append(distill_row(r, [5, 2], text, eos_token_id=eos, target_model="t", target_hash="h",
                                template_hash=template_hash))
    if rows:
        write_parquet_atomic(to_table(rows, DISTILL_SCHEMA), chunk_file(data_dir, rows[0]["row_key"]))
    return {"failed": [], "rows_written": len(rows), "tokens": 0, "seconds": 1.0, "passes": 1}


def test_pipeline_reports_the_mix_and_keeps_evaluation_prompts_out(monkeypatch, tmp_path, target):
    import draftalign.pipelines.generate as pg
    from draftalign.data.datasetinfo import format_summary
    from draftalign.data.datasetinfo import summarize as inspect_summary
    from draftalign.data.overlap import HeldOutPrompt, HeldOutPrompts
    from draftalign.data.seeds import normalize_text

    monkeypatch.setattr(pg, "run_passes", _answer_all)
    summarize = json.loads((EVAL / "summarize.jsonl").read_text().splitlines()[2])
    seeds = tmp_path / "seeds.jsonl"  # the second seed is an evaluation prompt, reworded at its edges
    seeds.write_text("".join(json.dumps(s) + "\n" for s in [
        {"id": "g0", "instruction": "Add the numbers 1 and 2."},
        {"id": "g1", "instruction": "Please summarize this passage in one or two sentences.", "input": summarize["input"]},
        {"id": "g2", "instruction": "Write a haiku about the sea."}]))
    overrides = [f"run.output={tmp_path}", f"models.target={target}", f"generate.seeds={seeds}", KINDS,
                 "generate.fields={instruction: instruction, input: input, id: id}", "generate.engine.max_model_len=1024",
                 "generate.sampling=[{name: greedy, temperature: 0, max_tokens: 8}]"]
    # First without the check: the copies are answered, as a set made before it would hold them.
    leaky = pg.run_generate(load_config(TINY, [*overrides, "generate.exclude_eval.enabled=false"]))
    assert leaky["exclude_eval"] is None and leaky["counts"]["rows_in_data"] == 3 + 4
    manifest = pg.run_generate(load_config(TINY, overrides))
    si, ex = manifest["self_instruct"], manifest["exclude_eval"]
    assert si["asked_by_kind"] == {"question": 4, "code": 2} and si["kept_by_kind"] == {"question": 2, "code": 1}
    assert si["dropped_by_reason"] == {"empty": 1, "evaluation prompt": 1, "near duplicate": 1}
    assert ex["tasks"] == ["open_ended", "summarize", "translate"] and ex["prompts"] == len(_eval_texts())
    assert ex["seeds_dropped"] == 1 and ex["self_instruct_dropped"] == 1 and ex["rows_removed"] == 2
    assert manifest["counts"]["errors_by_reason"] == {"evaluation prompt": 1}
    out = tmp_path / "generate"
    errors = pq.read_table(out / "errors" / "seeds.parquet").to_pylist()
    assert [e["id"] for e in errors] == ["g1"] and f"summarize/{summarize['id']}" in errors[0]["reason"]
    rows = pq.read_table(out / "data").to_pylist()
    assert sorted(r["source"] for r in rows) == ["seeds.jsonl", "seeds.jsonl", "self-instruct/code",
                                                 "self-instruct/question", "self-instruct/question"]
    # What the test holds the set to: no row's conversation equals or nearly copies an evaluation prompt.
    evals = _eval_texts()
    held = HeldOutPrompts([HeldOutPrompt(str(i), t) for i, t in enumerate(evals)], 0.5)
    exact = {normalize_text(t) for t in evals}
    for r in rows:
        text = "\n".join(m["content"] for m in r["messages"])
        assert normalize_text(text) not in exact and held.match(text) is None, text
    code = next(r for r in rows if r["source"] == "self-instruct/code")
    assert code["instruction"] == "Write a Python function that reverses a string."
    records = pq.read_table(out / "instructions" / "instructions.parquet").to_pylist()
    assert [r["kind"] for r in records] == ["question", "code", "question", "question", "code", "question"]
    text = format_summary(inspect_summary(out, rows=0))
    data_part, instructions = text.split("\n== data:")[1].split("\n== ")[0], text.split("== instructions:")[1]
    assert f"{2:>8}  self-instruct/question" in data_part and f"{1:>8}  self-instruct/code" in data_part
    assert "kind:" in instructions and f"{4:>8}  question" in instructions and "evaluation prompt" in instructions
    # Other kinds would ask otherwise: refused, not mixed with the requests already written.
    with pytest.raises(ConfigError, match="kinds"):
        pg.run_generate(load_config(TINY, [*overrides[:3], KINDS.replace("share: 1}", "share: 3}"), *overrides[4:]]))
