"""`draftalign push`: upload an exported drafter folder to the Hugging Face Hub.

Only the model files go up (weights, config, tokenizer, generation config,
`draftalign_model.json`, the model card), never checkpoints, Ray state, caches or anything
else that happens to sit in the folder. The token comes from huggingface_hub's usual places
(`HF_TOKEN`, `huggingface-cli login`) and is never printed.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from draftalign.errors import ConfigError
from draftalign.models.card import CARD, MODEL_INFO, write_card

# top-level files of a Hugging Face model folder that a drafter needs; nothing else is uploaded
MODEL_FILES = (
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    MODEL_INFO, CARD,
)


def model_files(model_dir: str | Path) -> list[Path]:
    """The files `push` uploads, sorted: plain top-level files matching MODEL_FILES only."""
    folder = Path(model_dir)
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or not p.is_file() or p.name.startswith("."):
            continue
        if any(fnmatch.fnmatchcase(p.name, pat) for pat in MODEL_FILES):
            out.append(p)
    return out


def check_folder(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir} is not a folder")
    names = {p.name for p in model_files(model_dir)}
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise ConfigError(f"{model_dir} is not an exported model folder (config.json and *.safetensors needed)")


def push(model_dir: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
         api: Any = None, log=print) -> list[str]:
    """Upload the model files of `model_dir` to `repo_id`; returns their names.

    Writes the model card first when the folder has none (and has draftalign_model.json).
    dry_run: only list what would be uploaded. api: an `huggingface_hub.HfApi` (tests pass a fake).
    """
    folder = Path(model_dir)
    check_folder(folder)
    if not (folder / CARD).is_file() and (folder / MODEL_INFO).is_file():
        if dry_run:
            log(f"(a model card {CARD} would be written first)")
        else:
            log(f"writing the model card {write_card(folder)}")
    files = model_files(folder)
    names = [p.name for p in files]
    if dry_run and CARD not in names and (folder / MODEL_INFO).is_file():
        names = sorted([*names, CARD])
    total = sum(p.stat().st_size for p in files)
    if dry_run:
        log(f"dry run: would upload {len(names)} files ({total / 1e6:.1f} MB) to {repo_id}"
            f"{' (private)' if private else ''}:")
        for n in names:
            log(f"  {n}")
        return names
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()  # the token: HF_TOKEN or the cached login, read by huggingface_hub itself
    from huggingface_hub import CommitOperationAdd

    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
    api.create_commit(repo_id=repo_id, repo_type="model", operations=ops,
                      commit_message=f"Upload draftalign drafter ({len(ops)} files)")
    log(f"uploaded {len(ops)} files ({total / 1e6:.1f} MB) to https://huggingface.co/{repo_id}")
    return names
