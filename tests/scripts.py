"""Small programs the tests run in a fresh Python process: `python tests/scripts.py NAME ARG...`.

A fresh process is what these checks are about: a lock held by another process, import-time
switches (offline mode), what a command imports, vLLM's own worker processes. Run by path, so
they need neither the working folder nor PYTHONPATH to find this file.
"""

import json
import sys
from pathlib import Path

PATH = Path(__file__).resolve()


def command(name: str, *args: str) -> list[str]:
    """The argv that runs `name(*args)` of this module in a fresh interpreter."""
    return [sys.executable, str(PATH), name, *map(str, args)]


def hold_lock(folder: str) -> None:
    """Hold the generate lock of `folder`, say "held", and wait to be killed."""
    import time

    from draftalign.pipelines.locks import output_lock

    with output_lock(folder, "generate"):
        print("held", flush=True)
        time.sleep(600)


def open_hub_set() -> None:
    """Open a hub data set that does not exist (the offline switches come from the environment)."""
    from draftalign.data.seeds import open_rows

    open_rows("nobody-here/no-such-set", None, "train", "generate.seeds")


def main_without_ray(*argv: str) -> None:
    """`draftalign ARGV...`, failing if that imported Ray."""
    from draftalign.cli import main

    rc = main(list(argv))
    assert "ray" not in sys.modules, "ray imported"
    sys.exit(rc)


def vllm_prompt_logprobs(model: str, ids: str) -> None:
    """Send [null, log p(ids[1] | ids[:1]), ...] as vLLM computes them (float32, CPU)."""
    sys.path.insert(0, str(PATH.parent.parent / "bench"))  # childproc: how a vLLM child reports
    import childproc
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.05,
              max_model_len=128, seed=0)
    out = llm.generate([{"prompt_token_ids": json.loads(ids)}], SamplingParams(max_tokens=1, prompt_logprobs=0))
    lps = [None] + [next(iter(d.values())).logprob for d in out[0].prompt_logprobs[1:]]
    childproc.send(lps, llm)


if __name__ == "__main__":  # vLLM's spawned workers import this file again: run nothing then
    globals()[sys.argv[1]](*sys.argv[2:])
