"""`generate.self_instruct` end to end: Ray Data + vLLM (CPU) on a tiny target that ends its turns.

The tiny random Llama of the other Ray tests almost never emits EOS, so every request it writes
would be cut off by max_tokens. This one is wired so that EOS has about a one-in-five chance at
every step, whatever came before: the requests come out of every length, and the filters see
empty, short, long, cut-off and kept ones.
"""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_generate_ray import ENV, TINY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

COUNT = 32
EOS_WEIGHT = 1.1  # EOS logit ~ 8 * this: p(EOS) ~ e^8.8 / (e^8.8 + 32000) ~ 0.17 per step


def _eos_prone_llama(path: Path) -> None:
    """A 1-layer Llama whose residual stream is its input embedding, with a constant component that
    only EOS's output row reads: the same EOS probability after every token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftalign.data.tokenization import materialize_tokenizer

    materialize_tokenizer("embedded", path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                         bos_token_id=1, eos_token_id=2))
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 10.0  # after the RMSNorm: about 8 in dimension 0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[2, 0] = EOS_WEIGHT
    model.save_pretrained(path)


def _args(out: Path, model: Path, seeds: Path) -> list[str]:
    return ["generate", str(TINY), f"run.output={out}", f"models.target={model}", f"generate.seeds={seeds}",
            "generate.fields={instruction: instruction, input: null, id: id}",
            f"generate.self_instruct={{count: {COUNT}, max_tokens: 8, min_chars: 12, max_chars: 40, seed: 3}}",
            "generate.sampling=[{name: greedy, temperature: 0, max_tokens: 8}, "
            "{name: t1.0, temperature: 1.0, top_p: 0.95, max_tokens: 8, seed: 0}]",
            "generate.engine.max_model_len=128", "generate.engine.batch_size=8", "generate.rows_per_file=8",
            "ray.num_cpus=4", "ray.include_dashboard=false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("selfinstruct")
    _eos_prone_llama(root / "target")
    seeds = root / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"g{i}", "instruction": f"Add the numbers {i} and {i + 1}."}) + "\n"
                             for i in range(2)))
    cmd = _args(root / "run", root / "target", seeds)
    proc = _draftalign(*cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"root": root, "out": root / "run" / "generate", "cmd": cmd, "proc": proc}


def _draftalign(*args: str) -> subprocess.CompletedProcess:
    # A hang guard, not a timing: this run starts the vLLM engine twice (requests, then answers),
    # which took minutes each on a loaded 2-core machine.
    return subprocess.run([sys.executable, "-m", "draftalign", *args], capture_output=True, text=True,
                          timeout=1500, env=ENV)


def _data(out: Path) -> list[dict]:
    return pq.read_table(out / "data").to_pylist()


def test_count_filters_and_the_manifest(world):
    records = pq.read_table(world["out"] / "instructions" / "instructions.parquet").to_pylist()
    assert [r["index"] for r in records] == list(range(COUNT))  # exactly `count` requests asked
    for r in records:
        if r["kept"]:
            assert r["ended"] and 12 <= len(r["instruction"]) <= 40 and r["reason"] is None
            assert r["instruction"] == r["instruction"].strip() and r["id"].startswith("si-")
        elif r["reason"] == "not ending the turn":
            assert not r["ended"]
        else:
            assert r["reason"] in ("empty", "too short", "too long", "duplicate", "near duplicate"), r["detail"]
            assert r["reason"] != "too short" or len(r["instruction"]) < 12
            assert r["reason"] != "too long" or len(r["instruction"]) > 40
    kinds = {r["reason"] for r in records if not r["kept"]}
    kept = [r for r in records if r["kept"]]
    assert kept and {"not ending the turn", "too short"} <= kinds, kinds
    si = json.loads((world["out"] / "manifest.json").read_text())["self_instruct"]
    assert si["asked"] == COUNT and si["kept"] == len(kept) and si["kept"] + si["dropped"] == COUNT
    assert si["kept_share"] == round(len(kept) / COUNT, 4) and si["instructions_per_min"] > 0
    assert "self-instruct: 32 asked" in world["proc"].stdout


def test_kept_requests_are_answered_like_seeds_with_their_source(world):
    kept = {r["id"]: r["instruction"] for r in pq.read_table(world["out"] / "instructions" / "instructions.parquet")
            .to_pylist() if r["kept"]}
    rows = _data(world["out"])
    mine = [r for r in rows if r["source"] == "self-instruct"]
    assert {r["row_key"] for r in mine} == {f"{i}/{s}" for i in kept for s in ("greedy", "t1.0")}
    for r in mine:
        assert r["messages"] == [{"role": "user", "content": kept[r["id"]]}]
        assert r["prompt_text"].startswith("<s>[INST] " + kept[r["id"]])
    assert sorted(r["row_key"] for r in rows if r["source"] == "seeds.jsonl") == [
        "g0/greedy", "g0/t1.0", "g1/greedy", "g1/t1.0"]


def test_inspect_shows_the_rows_per_source(world):
    from draftalign.data.datasetinfo import format_summary, summarize

    text = format_summary(summarize(world["out"], rows=0))
    n_mine = sum(r["source"] == "self-instruct" for r in _data(world["out"]))
    lines = text.split("\n== data:")[1].split("\n== ")[0]
    assert "source:" in lines and f"{n_mine:>8}  self-instruct" in lines and f"{4:>8}  seeds.jsonl" in lines
    assert "== instructions:" in text and "kept:" in text and "too short" in text


def test_a_rerun_resumes_without_asking_or_answering_again(world):
    before = sorted(r["row_key"] for r in _data(world["out"]))
    instructions = (world["out"] / "instructions" / "instructions.parquet").read_bytes()
    proc = _draftalign(*world["cmd"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"self-instruct: {COUNT} requests, {COUNT} already written, 0 to generate" in proc.stdout
    assert "0 to generate" in proc.stdout.split("self-instructed")[1].splitlines()[0]
    assert sorted(r["row_key"] for r in _data(world["out"])) == before
    assert pq.read_table(world["out"] / "instructions" / "instructions.parquet").to_pylist() == \
        pq.read_table(pa.BufferReader(instructions)).to_pylist()
