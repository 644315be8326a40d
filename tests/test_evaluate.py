"""`draftalign evaluate` without Ray or vLLM: tasks and templates, the export check, the report files.

The report test runs the whole stage in-process with the reference engine on tiny random-weight
Llamas (embedded 32k tokenizer, hidden 64), a few prompts and a few tokens: seconds, not minutes.
"""

import json
from pathlib import Path

import pytest

from draftalign.config import EvalTaskConfig, load_config
from draftalign.errors import ConfigError, VocabMismatchError
from draftalign.evaluation.tasks import EvalDataError, build_prompts, load_task_prompts

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"


def _llama(folder: Path, seed: int, vocab_size: int = 32000, layers: int = 1, tokenizer: bool = True) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftalign.data.tokenization import materialize_tokenizer

    if tokenizer:
        materialize_tokenizer("embedded", folder)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                 tie_word_embeddings=False)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmodels")
    return {"target": _llama(root / "target", 0, layers=2), "draft": _llama(root / "draft", 1),
            "small_vocab": _llama(root / "small_vocab", 2, vocab_size=1000, tokenizer=False), "root": root}


# ---- tasks and templates -------------------------------------------------------------------------

def test_bundled_tasks_load_with_their_templates():
    cfg = load_config(TINY)
    by_kind = {t.kind: load_task_prompts(t, 3) for t in cfg.evaluate.tasks}
    assert set(by_kind) == {"open_ended", "summarize", "translate"}
    for kind, prompts in by_kind.items():
        assert len(prompts) == 3 and len({p["id"] for p in prompts}) == 3
        assert all(p["kind"] == kind and p["user"].strip() == p["user"] for p in prompts)
    assert by_kind["open_ended"][0]["input"] is None
    assert by_kind["open_ended"][0]["user"] == by_kind["open_ended"][0]["instruction"]
    s = by_kind["summarize"][0]
    assert s["user"] == f"{s['instruction']}\n\n{s['input']}" and s["user"].startswith("Summarize")


def test_hf_style_mapping_with_nested_field_and_fixed_instruction(tmp_path):
    data = tmp_path / "wmt.jsonl"
    rows = [{"translation": {"de": f"Hallo Welt {i}", "en": f"Hello world {i}"}} for i in range(4)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = EvalTaskConfig(name="wmt", kind="translate", data=str(data),
                          fields={"instruction": None, "input": "translation.de", "id": None},
                          instruction="Translate the following German text into English.",
                          template="{instruction}\n\nGerman: {input}\nEnglish:")
    prompts = load_task_prompts(task, 2)
    assert len(prompts) == 2
    assert prompts[1]["user"] == "Translate the following German text into English.\n\nGerman: Hallo Welt 1\nEnglish:"
    assert prompts[0]["id"].startswith("p-") and prompts[0]["id"] != prompts[1]["id"]


def test_bad_input_is_a_clear_error(tmp_path):
    rows = [{"id": "a", "instruction": "Summarize.", "input": "text"}, {"id": "b", "instruction": "Summarize."}]
    task = EvalTaskConfig(name="sums", kind="summarize", data=str(tmp_path / "x.jsonl"))
    with pytest.raises(EvalDataError, match=r"task 'sums'.*row 2: missing field 'input'"):
        build_prompts(task, rows, 10)
    with pytest.raises(EvalDataError, match=r"row 1: missing field 'question'"):
        build_prompts(task.model_copy(update={"fields": task.fields.model_copy(update={"instruction": "question"})}),
                      rows, 10)
    with pytest.raises(EvalDataError, match="set the task's `instruction`"):
        build_prompts(EvalTaskConfig(name="x", kind="summarize", fields={"instruction": None}), rows, 10)
    with pytest.raises(EvalDataError, match="bad template"):
        build_prompts(EvalTaskConfig(name="x", kind="open_ended", template="{question}"), rows, 10)
    with pytest.raises(EvalDataError, match="field 'instruction' holds int"):
        build_prompts(EvalTaskConfig(name="x", kind="open_ended"), [{"instruction": 3}], 10)
    with pytest.raises(ConfigError, match="unknown config key 'evaluate.tasks.0.fieldz'"):
        load_config(TINY, ["evaluate.tasks=[{name: a, kind: open_ended, fieldz: {}}]"])


# ---- export check ---------------------------------------------------------------------------------

def test_export_check_refuses_a_mismatched_vocabulary_naming_both(models):
    from transformers import AutoModelForCausalLM

    from draftalign.models.exportcheck import check_transformers, check_vocab

    check_vocab(str(models["target"]), str(models["draft"]))  # same tokenizer and size: fine
    with pytest.raises(VocabMismatchError) as err:
        check_vocab(str(models["target"]), str(models["small_vocab"]))
    msg = str(err.value)
    assert str(models["target"]) in msg and str(models["small_vocab"]) in msg and "vocab_size: target 32000 != draft 1000" in msg
    target = AutoModelForCausalLM.from_pretrained(models["target"]).eval()
    ok = check_transformers(target, AutoModelForCausalLM.from_pretrained(models["draft"]).eval(), "T", "D",
                            [1, 100, 200], max_new_tokens=3)
    assert ok["transformers"] == "ok" and len(ok["tokens"]) == 3
    with pytest.raises(VocabMismatchError, match="drafter 'S' cannot draft for target 'T'"):
        check_transformers(target, AutoModelForCausalLM.from_pretrained(models["small_vocab"]).eval(), "T", "S")


def test_a_listed_drafter_that_does_not_exist_is_an_error(models, tmp_path):
    from draftalign.pipelines.evaluate import describe_evaluate, resolve_drafters

    cfg = load_config(TINY, [f"run.output={tmp_path}", f"models.target={models['target']}",
                             f"evaluate.drafters=[{{name: gone, path: {tmp_path / 'nope'}}}]"])
    with pytest.raises(ConfigError, match="do not exist: gone"):
        resolve_drafters(cfg)
    plan = describe_evaluate(cfg)  # --plan still describes it, marked missing; then the n-gram baseline
    assert plan["drafters"] == [{"name": "gone", "path": str(tmp_path / "nope"), "exists": False},
                                {"name": "ngram", "path": None, "exists": True, "method": "ngram",
                                 "prompt_lookup_min": 2, "prompt_lookup_max": 4}]
    # default drafters: the pretrained one plus distilled exports that exist; a plan also lists
    # the one the configured distillation will make
    cfg = load_config(TINY, [f"run.output={tmp_path}", f"models.draft={models['draft']}"])
    assert [d["name"] for d in resolve_drafters(cfg)] == ["pretrained"]
    assert [(d["name"], d["exists"]) for d in describe_evaluate(cfg)["drafters"]] == [
        ("pretrained", True), ("tvd++", False), ("ngram", True)]
    off = load_config(TINY, [f"run.output={tmp_path}", f"models.draft={models['draft']}", "evaluate.ngram=null"])
    assert [d["name"] for d in describe_evaluate(off)["drafters"]] == ["pretrained", "tvd++"]
    (tmp_path / "distill" / "tvdpp" / "model").mkdir(parents=True)
    assert [d["name"] for d in resolve_drafters(cfg)] == ["pretrained", "tvd++"]


# ---- the report -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report(models, tmp_path_factory):
    from draftalign.pipelines.evaluate import run_evaluate

    out = tmp_path_factory.mktemp("evalrun") / "evaluate"
    cfg = load_config(TINY, [f"models.target={models['target']}", f"models.draft={models['draft']}",
                             f"evaluate.output={out}", "evaluate.max_prompts=2", "evaluate.max_new_tokens=6",
                             "evaluate.gammas=[1, 3]", "evaluate.temperatures=[0, 1]",
                             f"evaluate.drafters=[{{name: rand, path: {models['draft']}}}, "
                             f"{{name: self, path: {models['target']}}}]"])
    lines: list[str] = []
    records = run_evaluate(cfg, log=lines.append)
    return {"out": out, "records": records, "log": lines}


def test_report_files_are_written_and_readable(report):
    import csv

    out = report["out"]
    for name in ("summary.json", "summary.csv", "report.md", "rows.parquet", "tau_vs_gamma.png",
                 "acceptance_per_position.png", "config.yaml", "run_info.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    records = json.loads((out / "summary.json").read_text())
    assert records == json.loads(json.dumps(report["records"]))
    assert len(records) == 3 * 3 * 2 * 2  # drafters (rand, self, the n-gram baseline) x tasks x γ x T
    for r in records:
        for key in ("drafter", "task", "engine", "gamma", "temperature", "block_efficiency", "draft_acceptance_rate",
                    "mbsu", "num_prompts", "acceptance_per_position", "tokens_per_s_spec", "tokens_per_s_ar",
                    "speedup"):
            assert key in r, key
        assert 1.0 <= r["block_efficiency"] <= r["gamma"] + 1 and 0.0 <= r["draft_acceptance_rate"] <= 1.0
        assert r["num_prompts"] == 2 and r["engine"] == "reference" and len(r["acceptance_per_position"]) == r["gamma"]
        assert r["mbsu"] <= r["block_efficiency"] and r["speedup"] > 0
        if r["temperature"] == 0:
            assert r["greedy_match_rate"] == 1.0  # lossless: greedy speculative == target greedy
    # the target drafting for itself accepts everything greedily: τ = γ + 1 up to the token budget
    for r in records:
        if r["drafter"] == "self" and r["temperature"] == 0:
            assert r["draft_acceptance_rate"] == 1.0
    with (out / "summary.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(records)
    md = (out / "report.md").read_text()
    assert "| drafter | task | engine | γ | T | τ | draft acceptance (accepted/drafted) | MBSU | speed-up |" in md
    assert any(line.startswith("[evaluate] reference rand / summarize γ=3 T=1: τ=") for line in report["log"])


def test_rows_parquet_matches_its_schema(report):
    import pyarrow.parquet as pq

    from draftalign.data.schemas import EVAL_SCHEMA, check_table

    table = pq.read_table(report["out"] / "rows.parquet")
    check_table(table, EVAL_SCHEMA)
    assert table.num_rows == 3 * 3 * 2 * 2 * 2  # cells x prompts
    rows = table.to_pylist()
    for r in rows:
        assert len(r["accepted_per_pos"]) == r["gamma"] and sum(r["accepted_per_pos"]) == r["num_accepted"]
        assert 1 <= r["num_generated_tokens"] <= 6 and r["schema_version"] == 1
    with pytest.raises(ValueError, match="missing column 'gamma'"):
        check_table(table.drop_columns(["gamma"]), EVAL_SCHEMA)



def test_every_speedup_comes_with_the_machines_verify_cost(report):
    """r = t_verify(γ+1) / t_target, measured once on the reference engine's target, in every record,
    the log and the report; with one engine the headline speed-up is that engine's own."""
    records = report["records"]
    said = [line for line in report["log"] if line.startswith("[evaluate] verify cost r = t_verify(γ+1) / t_target: ")]
    assert len(said) == 1 and "γ=1: " in said[0] and "γ=3: " in said[0]
    assert "the reference engine's target (PyTorch, " in said[0]
    for r in records:
        assert r["verify_ratio"] > 0 and r["verify_ratio"] == pytest.approx(r["t_verify_ms"] / r["t_target_ms"])
        assert r["speedup"] == r["speedup_own_engine"] and r["baseline_engine"] == "reference"
        assert r["tokens_per_s_baseline"] == r["tokens_per_s_ar"]
    assert len({r["t_target_ms"] for r in records}) == 1  # one measurement for the whole evaluation
    assert len({(r["gamma"], r["verify_ratio"]) for r in records}) == 2  # an r per γ
    md = (report["out"] / "report.md").read_text()
    assert "\nVerify cost r = t_verify(γ+1) / t_target: γ=1: " in md and "| speed-up, own engine | r |" in md
    assert "over tokens/s of the target alone on the run's fastest engine for that task and T" in md


def test_without_the_target_loaded_r_is_reported_as_not_measured():
    from draftalign.evaluation.report import verify_cost_note
    from draftalign.pipelines.evaluate import _verify_cost

    said: list[str] = []
    assert _verify_cost(None, [1, 3], {"t": [{"token_ids": [1, 2, 3]}]}, said.append) is None
    assert said == ["[evaluate] verify cost r = t_verify(γ+1) / t_target: not measured (the target was not "
                    "loaded in PyTorch: only vLLM ran and evaluate.export_check was off)"]
    assert "Verify cost r = t_verify(γ+1) / t_target: not measured" in verify_cost_note(None)

def _copier(folder: Path) -> Path:
    """A target that answers by repeating its last token: its layers add nothing to the residual
    stream and its output layer is its embedding table, so the greedy next token is the input
    token (64 dimensions of random embeddings: its own inner product beats the 32k others')."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(_llama(folder, 3, layers=1))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.save_pretrained(folder)
    return folder


def test_the_ngram_baseline_is_a_row_of_every_table_with_tau_from_decoding(models, tmp_path):
    """The n-gram baseline drafts for a target whose answers repeat: real lookups, accepted, lossless."""
    import pyarrow.parquet as pq

    from draftalign.evaluation.report import pooled_block_efficiency
    from draftalign.evaluation.rows import read_eval_rows
    from draftalign.pipelines.evaluate import run_evaluate

    target, out = _copier(tmp_path / "copier"), tmp_path / "evaluate"
    cfg = load_config(TINY, [f"models.target={target}", f"evaluate.output={out}", "evaluate.max_prompts=1",
                             "evaluate.max_new_tokens=24", "evaluate.gammas=[3]", "evaluate.temperatures=[0]",
                             f"evaluate.drafters=[{{name: rand, path: {models['draft']}}}]"])
    records = run_evaluate(cfg, log=lambda _: None)
    ngram = [r for r in records if r["drafter"] == "ngram"]
    assert sorted(r["task"] for r in ngram) == ["open_ended", "summarize", "translate"]
    rows = [r for r in read_eval_rows(out / "rows.parquet") if r.drafter == "ngram"]
    for r in ngram:
        mine = [row for row in rows if row.task == r["task"]]
        assert r["block_efficiency"] == pooled_block_efficiency(mine) > 1.5  # the lookup drafts the repeats
        assert r["num_accepted"] > 0 and r["greedy_match_rate"] == 1.0  # lossless: the target's own answer
        assert r["param_ratio"] == 0 and r["mbsu"] == r["block_efficiency"] and r["drafter_path"] == ""
    assert pq.read_table(out / "rows.parquet").num_rows == 2 * 3  # (rand, ngram) x tasks, one prompt each
    md = (out / "report.md").read_text()
    assert "- drafter `ngram`: n-gram prompt lookup (vLLM's method `ngram`, n from 2 to 4)" in md
    assert "| task | engine | γ | T | rand | ngram | verdict |" in md


def test_weights_that_would_need_unpickling_are_refused(models, tmp_path):
    """Only safetensors load: a folder holding the same model as pytorch_model.bin is refused."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from draftalign.workers.evaluate_reference import ReferenceEngine
    from draftalign.workers.target_pool import load_target

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(models["draft"] / "config.json", pickled)
    torch.save(AutoModelForCausalLM.from_pretrained(models["draft"]).state_dict(), pickled / "pytorch_model.bin")
    assert AutoModelForCausalLM.from_pretrained(pickled) is not None  # transformers alone would load it
    with pytest.raises(OSError, match="safetensors"):
        load_target(str(pickled), "fp32", use_gpu=False)
    with pytest.raises(OSError, match="safetensors"):
        ReferenceEngine(str(models["target"]), "cpu").load_draft(str(pickled))


@pytest.mark.parametrize(("engines", "temperatures", "method", "noted"), [
    ("[reference, vllm]", "[0, 1]", "greedy", True), ("[reference, vllm]", "[0]", "greedy", False),
    ("[reference]", "[0, 1]", "greedy", False), ("[reference, vllm]", "[0, 1]", None, False),
    ("[reference, vllm]", "[0, 1]", "probabilistic", False)])
def test_the_report_says_when_vllm_rows_are_not_standard_speculative_sampling(engines, temperatures, method, noted):
    from draftalign.pipelines.evaluate import VLLM_SAMPLED_NOTE, _header

    spec = [f"evaluate.vllm.speculative_config={{draft_sample_method: {method}}}"] if method else []
    cfg = load_config(TINY, [f"evaluate.engines={engines}", f"evaluate.temperatures={temperatures}", *spec])
    header = _header(cfg, "t", [{"name": "d", "path": "p"}], {"d": 10}, 1000)
    assert (VLLM_SAMPLED_NOTE in header) is noted


def test_both_engines_seed_a_prompt_the_same_way():
    """One per-prompt seed (the reference engine's 15 hex digits, so its sampled answers stay as they were)."""
    import hashlib

    import torch

    from draftalign.evaluation.tasks import prompt_seed
    from draftalign.workers.evaluate_reference import prompt_generator

    assert prompt_seed(3, "p-1", 1.0) == int(hashlib.sha256(b"3/p-1/1.0").hexdigest()[:15], 16)
    assert prompt_generator(3, "p-1", 1.0, torch.device("cpu")).initial_seed() == prompt_seed(3, "p-1", 1.0)
    assert prompt_seed(3, "p-1", 1.0) != prompt_seed(3, "p-1", 0.7)


def test_vllm_per_request_metrics_become_the_reference_engines_counts():
    from types import SimpleNamespace

    from draftalign.evaluation.metrics import block_efficiency
    from draftalign.workers.evaluate_vllm import request_counts

    # 5 verify steps at γ = 3: two accepted nothing, one accepted 1 draft, two accepted all 3.
    metrics = SimpleNamespace(histogram=[2, 1, 0, 2], num_draft_tokens=15)
    counts = request_counts(metrics, 3)
    assert counts == {"num_drafts": 5, "num_draft_tokens": 15, "num_accepted": 7, "accepted_per_pos": [3, 2, 2]}
    assert block_efficiency(counts["num_accepted"], counts["num_drafts"], 3) == pytest.approx(12 / 5)
    # A request that never speculated (finished at once) counts nothing.
    assert request_counts(None, 2) == {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted": 0,
                                       "accepted_per_pos": [0, 0]}
    # A model drafts at every decode step: 1 (prefill) + 5 steps + 7 accepted = 13 tokens, none added;
    # fewer tokens (the budget cut the last block) add none either.
    assert request_counts(metrics, 3, generated=13) == counts == request_counts(metrics, 3, generated=11)
    # An n-gram lookup that found nothing in 3 more steps: vLLM did not count them, the reference
    # engine does (each a target call that emitted one token), so τ stays tokens per target call.
    plain = request_counts(metrics, 3, generated=16)
    assert plain == {**counts, "num_drafts": 8}
    assert block_efficiency(plain["num_accepted"], plain["num_drafts"], 3) == pytest.approx(15 / 8)
    assert request_counts(None, 2, generated=4)["num_drafts"] == 3


def test_a_batch_time_is_shared_by_generated_tokens():
    from draftalign.workers.evaluate_vllm import share_seconds

    assert share_seconds(3.0, [10, 20]) == pytest.approx([1.0, 2.0])
    assert share_seconds(2.0, [0, 0]) == [1.0, 1.0]
    assert share_seconds(0.5, [7]) == [0.5]


def test_an_engine_runs_only_the_drafters_it_names_and_refuses_unknown_names(models, tmp_path):
    # vLLM (batched) may carry every drafter's τ while the slow batch-1 reference engine times a few.
    from draftalign.pipelines.evaluate import describe_evaluate, run_evaluate

    both = (f"evaluate.drafters=[{{name: rand, path: {models['draft']}}}, "
            f"{{name: self, path: {models['target']}}}]")
    base = [f"models.target={models['target']}", f"evaluate.output={tmp_path / 'ev'}", "evaluate.max_prompts=1",
            "evaluate.max_new_tokens=4", "evaluate.gammas=[2]", "evaluate.temperatures=[0]",
            "evaluate.tasks=[{name: open_ended, kind: open_ended}]", both]
    cfg = load_config(TINY, [*base, "evaluate.reference.drafters=[self]"])
    assert describe_evaluate(cfg)["cells"].startswith("reference: 1 ")
    records = run_evaluate(cfg, log=lambda _: None)
    assert [(r["drafter"], r["engine"]) for r in records] == [("self", "reference")]
    with pytest.raises(ConfigError, match=r"evaluate.reference.drafters names \['gone'\]"):
        describe_evaluate(load_config(TINY, [*base, "evaluate.reference.drafters=[gone]"]))


def test_a_feature_drafter_is_evaluated_losslessly_with_its_own_weights_and_card(models, tmp_path):
    """A feature drafter folder (vLLM's eagle3 format) in the sweep: read as one, decoded through
    its proposer, counted by its own weights, described as itself in the report and its card."""
    import shutil

    from transformers import AutoModelForCausalLM

    from draftalign.models.feature import feature_from_target, feature_spec, restrict_head
    from draftalign.pipelines.evaluate import resolve_drafters, run_evaluate

    target = AutoModelForCausalLM.from_pretrained(models["target"])
    draft = feature_from_target(target, feature_spec(target.config))
    restrict_head(draft, list(range(0, 32000, 4)))
    folder = tmp_path / "feature"
    draft.save_pretrained(str(folder))
    (folder / "draftalign_model.json").write_text(json.dumps({"role": "distilled", "drafter": "feat"}))
    for f in Path(models["target"]).iterdir():  # the tokenizer files, as publish_model saves them beside it
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    out = tmp_path / "evaluate"
    cfg = load_config(TINY, [f"models.target={models['target']}", f"evaluate.output={out}", "evaluate.max_prompts=2",
                             "evaluate.max_new_tokens=8", "evaluate.gammas=[2]", "evaluate.temperatures=[0]",
                             "evaluate.ngram=null", f"evaluate.drafters=[{{name: feat, path: {folder}}}]"])
    assert resolve_drafters(cfg)[0]["method"] == "eagle3"
    records = run_evaluate(cfg, log=lambda _: None)
    assert {r["drafter"] for r in records} == {"feat"} and len(records) == 3
    from draftalign.models.arch import step_weights

    # a step reads the feature drafter's trained weights and one row of its (frozen) embedding table
    trained = sum(p.numel() for p in draft.parameters()) - draft.embed_tokens.weight.numel()
    for r in records:
        assert r["greedy_match_rate"] == 1.0  # lossless: the target's own greedy answer
        assert r["param_ratio"] == pytest.approx(trained / step_weights(target))
    md = (out / "report.md").read_text()
    assert "a feature drafter (EAGLE-3 style, vLLM's `eagle3`)" in md
    assert '"method": "eagle3"' in (folder / "README.md").read_text()
