"""Self-instructed seeds (Magpie): the user-turn prefix, the filters, dedupe, the config and the pipeline
around the engine pass (with the engine stubbed: tests/test_selfinstruct_ray.py runs the real one)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from draftalign.config import ConfigError, load_config
from draftalign.data.selfinstruct import (
    SENTINEL,
    as_seeds,
    clean_request,
    drop_reason,
    instruction_id,
    request_seed,
    requests,
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
    records = select(raw, "", 16, 1000, "self-instruct", taken=["sort a list in python please"])
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


def test_requests_get_distinct_seeds_and_the_turns_stops():
    sampling = {"name": "", "temperature": 1.0, "top_p": 1.0, "max_tokens": 32, "seed": 7}
    reqs = requests(3, "P", [1, 2], sampling, "<|im_end|>", [2])
    assert [r["row_key"] for r in reqs] == ["q0/self-instruct", "q1/self-instruct", "q2/self-instruct"]
    assert len({r["sampling"]["seed"] for r in reqs}) == 3 and reqs[0]["sampling"]["seed"] == request_seed(7, 0)
    assert reqs[0]["stop"] == ["<|im_end|>"] and reqs[0]["stop_token_ids"] == [2]
    assert requests(1, "P", [1], {**sampling, "seed": None}, "", [])[0]["sampling"]["seed"] is None


def test_preprocess_passes_the_stops_to_vllm():
    from draftalign.workers.generate_engine import _preprocess

    sampling = {"name": "", "temperature": 1.0, "top_p": 1.0, "max_tokens": 32, "seed": None}
    row = _preprocess(requests(1, "P", [1, 5], sampling, "[/INST]", [])[0])
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
