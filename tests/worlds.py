"""Small worlds the Ray tests build: tiny models and a hand-made distillation set."""

import random
from pathlib import Path


def tiny_llama(path: Path, seed: int, hidden: int, layers: int = 1) -> None:
    """A random Llama (1 layer unless told) with the embedded 32k tokenizer saved beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftalign.data.tokenization import materialize_tokenizer

    materialize_tokenizer("embedded", path)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=256, bos_token_id=1, eos_token_id=2)).save_pretrained(path)


def distill_set(folder: Path, n_seeds: int, target: Path | None = None, generator: Path | None = None,
                seed: int = 0) -> None:
    """A distillation set of random token rows, one greedy row per seed, in `folder/data`, as if
    `generator` (default: `target`, whose hash distill checks) had answered for `target`."""
    from draftalign.data.schemas import DISTILL_SCHEMA, DISTILL_SCHEMA_VERSION, to_table
    from draftalign.models.identity import target_identity
    from draftalign.util.atomicio import write_parquet_atomic

    target_hash = target_identity(str(target))["target_hash"] if target else "h"
    generator_hash = target_identity(str(generator))["target_hash"] if generator else target_hash

    rng = random.Random(seed)
    rows = []
    for i in range(n_seeds):
        prompt = [1] + [rng.randrange(3, 32000) for _ in range(rng.randrange(4, 12))]
        response = [rng.randrange(3, 32000) for _ in range(rng.randrange(3, 14))] + [2]
        rows.append({
            "id": f"s{i}", "row_key": f"s{i}/greedy", "source": "test", "instruction": f"seed {i}", "input": None,
            "messages": [{"role": "user", "content": f"seed {i}"}], "prompt_text": "", "prompt_token_ids": prompt,
            "response_text": "", "response_token_ids": response, "finish_reason": "stop",
            "sampling": {"name": "greedy", "temperature": 0.0, "top_p": 1.0, "max_tokens": 16, "seed": None},
            "num_input_tokens": len(prompt), "num_generated_tokens": len(response), "target_model": "t",
            "target_hash": target_hash, "chat_template_hash": "c", "generator_model": str(generator or "t"),
            "generator_hash": generator_hash, "schema_version": DISTILL_SCHEMA_VERSION})
    write_parquet_atomic(to_table(rows, DISTILL_SCHEMA), folder / "data" / "part-0.parquet")


def stub_engine_passes(monkeypatch) -> None:
    """run_generate without Ray or vLLM: the engine passes answer nothing, everything else is real."""
    import draftalign.pipelines.generate as pg

    monkeypatch.setattr(pg, "run_passes", lambda *a, **k: {"failed": [], "rows_written": 0, "tokens": 0,
                                                           "seconds": 0.0, "passes": 0})
