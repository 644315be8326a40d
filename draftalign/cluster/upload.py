"""What `draftalign submit` uploads: an allow-list of the repository, never "everything but".

A deny-list leaks whatever nobody thought of: `.env.local`, `.netrc`, `id_rsa`, `*.pem`, a
`.huggingface/token`, weights or a stray `outputs/` folder all sit in working copies. The job
needs only the package, the example configs and their data, the project file and the files
the submitted config itself reads; those are copied into a staging folder, which becomes the
job's `working_dir`. Inside the allowed folders, hidden files and key or weight files are
still left out (`DENY`, the same patterns as `rsync_exclude` in cluster/ray-cluster.yaml).
"""

from __future__ import annotations

import fnmatch
import shutil
from collections.abc import Iterator
from pathlib import Path

from draftalign.config import Config

__all__ = ["ALLOW", "DENY", "upload_files", "stage_upload"]

ALLOW = ("draftalign", "examples", "pyproject.toml", "README.md")
# Name patterns left out even inside allowed folders: hidden files and folders (.env*, .netrc,
# .aws/, .huggingface/, .ray/, .git/), keys, credentials, weights, caches and run outputs.
# ".?*", not ".*": Ray matches its excludes against the folder itself too, as ".", and ".*" would
# leave out everything.
DENY = (".?*", "__pycache__", "*.pyc", "id_rsa*", "id_ed25519*", "id_ecdsa*", "*.pem", "*.key", "*.p12",
        "*.pfx", "*credentials*", "*.pt", "*.pth", "*.bin", "*.ckpt", "*.safetensors", "runs", "outputs")


def _denied(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in DENY)


def _walk(path: Path) -> Iterator[Path]:
    """Files under `path` (or `path` itself), skipping denied names and symlinks at any depth."""
    if _denied(path.name) or path.is_symlink():
        return
    if path.is_file():
        yield path
    elif path.is_dir():
        for child in sorted(path.iterdir()):
            yield from _walk(child)


def _config_data_paths(cfg: Config) -> list[str]:
    """The local files and folders the config reads as data (hub names simply do not exist here)."""
    paths = [cfg.generate.seeds, cfg.distill.data, *cfg.pretrain.corpus.paths, *(t.data for t in cfg.evaluate.tasks)]
    return [p for p in paths if p]


def upload_files(root: Path, config: Path, cfg: Config) -> list[Path]:
    """Paths relative to `root` that the job gets: the allow-list, the config, the config's data."""
    root = root.resolve()
    wanted = [root / name for name in ALLOW] + [config.resolve()]
    for p in _config_data_paths(cfg):
        full = (root / Path(p).expanduser()).resolve()
        if full.exists() and full.is_relative_to(root):  # data outside the repository is not uploaded
            wanted.append(full)
    files: set[Path] = set()
    for path in wanted:
        # Denied names in the path above an allowed file count too (a config under .secrets/).
        if path.exists() and not any(_denied(part) for part in path.relative_to(root).parts[:-1]):
            files.update(f.relative_to(root) for f in _walk(path))
    return sorted(files)


def stage_upload(root: Path, config: Path, cfg: Config, dest: Path) -> list[Path]:
    """Copy `upload_files` into `dest` (the job's working_dir); returns what was copied."""
    files = upload_files(root, config, cfg)
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    return files
