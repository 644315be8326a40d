"""Two on-policy rounds as one `draftalign run` on tiny models (slow: vLLM, Ray Data, Ray Train):
each round's drafter answers the seeds through vLLM, the target scores those answers in the
mixture, and a rerun reuses every finished round."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.worlds import tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.timeout(2400)]

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"
ENV = {**os.environ, "RAY_ADDRESS": "local"}  # a Ray of the test's own, never one running here
COLOURS = ["red", "big", "old", "new", "soft", "cold", "loud", "fast", "dark", "warm"]
HOLDOUT = 0.2


def _seed_ids() -> tuple[list[str], list[str]]:
    """(train ids, held-out ids): 8 seeds that train and 2 that distill holds out, so that four steps
    of four rows are exactly one pass over the mixture (8 target + 8 on-policy rows at λ = 0.5)."""
    from draftalign.training.distillation import holdout_row

    ids = [f"s{i}" for i in range(200)]
    return [i for i in ids if not holdout_row(i, HOLDOUT)][:8], [i for i in ids if holdout_row(i, HOLDOUT)][:2]


def _args(root: Path) -> list[str]:
    train = {"num_workers": 1, "cpus_per_worker": 1, "seq_len": 48, "micro_batch_size": 4, "max_steps": 4,
             "checkpoint_every": 4, "log_every": 1, "eval_batches": 1}
    return ["run", str(TINY), f"run.output={root / 'run'}", "pretrain.jobs={}", f"models.target={root / 'target'}",
            f"models.draft={root / 'draft'}", f"generate.seeds={root / 'seeds.jsonl'}",
            "generate.sampling=[{name: greedy, temperature: 0, max_tokens: 8}]",
            "generate.engine.max_model_len=128", "generate.engine.batch_size=4", "generate.rows_per_file=4",
            "ray.num_cpus=4", "ray.include_dashboard=false",
            "distill.on_policy.fraction=0.5", "distill.on_policy.rounds=2", f"distill.holdout_fraction={HOLDOUT}",
            "distill.target_pool.cpus_per_actor=0.5", "distill.target_pool.cache=true",
            "distill.optim.warmup_steps=1", "distill.optim.lr=0.01",
            *[f"distill.train.{k}={v}" for k, v in train.items()],
            f"evaluate.tasks=[{{name: tiny, kind: open_ended, data: {root / 'eval.jsonl'}}}]",
            "evaluate.gammas=[2]", "evaluate.temperatures=[0]", "evaluate.max_new_tokens=6",
            "evaluate.reference.measure_autoregressive=false", "evaluate.export_check=false"]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy")
    tiny_llama(root / "target", seed=0, hidden=64)
    tiny_llama(root / "draft", seed=1, hidden=64)  # head size 32: vLLM's CPU attention refuses 16
    train, held = _seed_ids()
    (root / "seeds.jsonl").write_text("".join(json.dumps({"id": i, "instruction": f"Name things that are {c}."}) + "\n"
                                              for i, c in zip(train + held, COLOURS, strict=True)))
    (root / "eval.jsonl").write_text("".join(json.dumps({"id": f"e{i}", "instruction": t}) + "\n"
                                             for i, t in enumerate(["Say hi.", "Count to three."])))
    proc = subprocess.run([sys.executable, "-m", "draftalign", *_args(root)], capture_output=True, text=True,
                          timeout=2000, env=ENV)  # a hang guard: 1000 s ran out on a loaded 2-core machine
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return root, proc


def _rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return sorted(pq.read_table(folder / "data").to_pylist(), key=lambda r: r["row_key"])


def _round(root: Path, r: int) -> Path:
    return root / "run" / "distill" / "rounds" / f"round-{r}" / "tvdpp-onpolicy0.5"


def test_each_round_distils_from_its_drafters_own_answers(two_rounds):
    import torch
    from transformers import AutoModelForCausalLM

    from draftalign.models.identity import target_identity

    root, _ = two_rounds
    target_rows = _rows(root / "run" / "generate")
    target_hash = target_identity(str(root / "target"))["target_hash"]
    generators = [str(root / "draft"), str(_round(root, 1) / "model")]
    for r, generator in enumerate(generators, start=1):
        rows = _rows(_round(root, r) / "set")
        assert [x["row_key"] for x in rows] == [x["row_key"] for x in target_rows]  # the same seeds
        assert {x["target_hash"] for x in rows} == {target_hash}  # scored by the target
        assert {x["generator_hash"] for x in rows} == {target_identity(generator)["target_hash"]} != {target_hash}
        model = AutoModelForCausalLM.from_pretrained(generator).eval()
        for x in rows:  # the generator's own greedy answers, token for token
            ids = torch.tensor([x["prompt_token_ids"]])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                     eos_token_id=2, pad_token_id=2)
            assert out[0, ids.shape[1]:].tolist()[: len(x["response_token_ids"])] == x["response_token_ids"]
    infos = [json.loads((_round(root, r) / "model" / "draftalign_model.json").read_text()) for r in (1, 2)]
    assert [i["drafter"] for i in infos] == ["tvd++-onpolicy0.5-round1", "tvd++-onpolicy0.5-round2"]
    assert [i["initialised_from"] for i in infos] == generators  # each round starts from the last drafter
    for info in infos:
        mix = info["mixture"]
        assert (mix["on_policy_rows"], mix["target_rows"], mix["on_policy_share"]) == (8, 8, 0.5)
        m = info["metrics"]
        assert m["step"] == 4 and m["pool_requests"] == 6  # 4 steps, a held-out batch before and after
        assert 0 < m["holdout_expected_acceptance"] < 1  # held out: the target's answers to 2 seeds
    weights = [AutoModelForCausalLM.from_pretrained(_round(root, r) / "model").lm_head.weight for r in (1, 2)]
    assert not weights[0].equal(weights[1])


def test_the_target_scored_the_drafters_sequences_of_training_seeds_only(two_rounds):
    # The target cache holds one entry per sequence the target scored: every training seed's answer
    # by the drafter is among them (the rows reached training, not just the plan), and none of a
    # held-out seed's (those stay unseen; held-out figures are on the target's answers).
    import numpy as np

    from draftalign.config import TargetPoolConfig
    from draftalign.data.tokenization import load_tokenizer
    from draftalign.models.identity import target_identity
    from draftalign.training.distillation import build_sequences
    from draftalign.workers.target_pool import LogprobCache

    root, _ = two_rounds
    folder = root / "run" / "distill" / "target_cache" / target_identity(str(root / "target"))["target_hash"][:16]
    cache = LogprobCache(str(folder), TargetPoolConfig(cache=True))
    pad = load_tokenizer(str(root / "draft")).pad_token_id or 0
    train, held = _seed_ids()
    for r in (1, 2):
        rows = _rows(_round(root, r) / "set")
        seqs = build_sequences([x["prompt_token_ids"] for x in rows], [x["response_token_ids"] for x in rows],
                               48, False, pad)
        scored = {x["id"] for b, x in enumerate(rows)
                  if cache._path(seqs["input_ids"][b], seqs["loss_mask"][b].astype(np.int8)).is_file()}
        assert scored == set(train), (r, scored, held)


def test_evaluate_lists_every_round_and_a_rerun_reuses_them(two_rounds):
    root, first = two_rounds
    summary = json.loads((root / "run" / "evaluate" / "summary.json").read_text())
    assert {s["drafter"] for s in summary} == {"pretrained", "tvd++-onpolicy0.5-round1", "tvd++-onpolicy0.5-round2",
                                              "ngram"}
    chain = json.loads((root / "run" / "distill" / "rounds" / "tvdpp-onpolicy0.5.json").read_text())
    assert chain["drafter"] == "tvd++-onpolicy0.5" and [e["status"] for e in chain["rounds"]] == ["done", "done"]
    before = {r: (_round(root, r) / "model" / "draftalign_model.json").read_text() for r in (1, 2)}
    again = subprocess.run([sys.executable, "-m", "draftalign", *_args(root)], capture_output=True, text=True,
                           timeout=600, env=ENV)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-6000:]
    out = again.stdout
    assert out.count("0 to generate") == 3  # the target's set and both rounds' sets: nothing new
    assert "[distill tvd++-onpolicy0.5-round1] reusing" in out and "[distill tvd++-onpolicy0.5-round2] reusing" in out
    assert {r: (_round(root, r) / "model" / "draftalign_model.json").read_text() for r in (1, 2)} == before
