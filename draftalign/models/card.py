"""Model cards (`README.md`) for exported drafters, written from what the run knows.

A drafter folder (`.../model/`) holds `draftalign_model.json` (written by
`pipelines.outputs.publish_model`); its parent holds the stage's resolved `config.yaml`, from
which the target, the distillation set (and its `manifest.json`) and the training settings are
found. The evaluation table comes from evaluate's `summary.json`. Whatever is not known is left
out rather than guessed. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import yaml

from draftalign.errors import ConfigError
from draftalign.util.atomicio import write_text_atomic

if TYPE_CHECKING:  # types only: the card is written without torch (draftvocab) or pyarrow (schemas)
    from draftalign.data.schemas import Sampling
    from draftalign.models.draftvocab import DraftVocabInfo

MODEL_INFO = "draftalign_model.json"  # the name pipelines.outputs writes
CARD = "README.md"
TABLE_HEADER = ["task", "engine", "γ", "T", "τ", "draft acceptance", "MBSU"]
PAPER = ("Goel et al. 2024, *Direct Alignment of Draft Model for Speculative Decoding with "
         "Chat-Fine-Tuned LLMs*")


class ModelInfo(TypedDict, total=False):
    """draftalign_model.json: what a stage knew about the drafter it exported. Which keys a folder
    has depends on the stage (and the version) that wrote it, so readers take them with .get."""

    fingerprint: str
    role: str  # "draft", "distilled", or the pretrain job's name ("target")
    drafter: str
    loss: Mapping[str, object]  # the distill loss's LossConfig, dumped
    metrics: Mapping[str, float]  # the final training report
    initialised_from: str
    parameters: int
    draft_vocab: DraftVocabInfo
    mixture: Mapping[str, float]  # the on-policy MixturePlan's summary
    on_policy_files: list[str]
    vocab: str  # the tokenizer's vocab_fingerprint
    target_layers: list[int]


class DistillationSet(TypedDict, total=False):
    """The set a distilled drafter learned from, as far as its manifest (or the config) tells."""

    path: str
    rows: int | None
    seeds: int | None
    tokens_generated: int | None
    seeds_file: str | None
    sampling: list[Sampling] | None
    system_prompt: str | None


class _SetSource(TypedDict, total=False):
    distillation_set: DistillationSet
    target: str | None
    target_hash: str | None


class Card(_SetSource, total=False):
    """Everything the card says (`render` prints it); the run's files decide which keys are known."""

    name: str
    role: str
    path: str
    info: ModelInfo
    # The stage's config.yaml (and its train section) as read back: whatever version wrote it.
    stage_config: dict[str, Any]
    train: dict[str, Any]
    data_files: list[str] | None
    token_slots: int
    steps: int | None
    summary_path: str | None
    evaluation: list[dict]  # evaluate's SummaryRecords of this drafter, as read from summary.json
    license: str | None


class FrontMatter(TypedDict, total=False):
    """The YAML front matter the Hugging Face Hub reads, in the order it is written."""

    library_name: str
    tags: list[str]
    license: str
    base_model: str


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _find(path: str | None, bases: list[Path]) -> Path | None:
    """`path` as written in a config (absolute, or relative to where the run started)."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    for base in [Path.cwd(), *bases]:
        if (base / p).exists():
            return base / p
    return None


def _same_path(a: str | None, b: Path) -> bool:
    if not a:
        return False
    try:
        return Path(a).expanduser().resolve() == b.resolve()
    except OSError:
        return False


def drafter_records(summary: list[dict], model_dir: Path, name: str | None) -> list[dict]:
    """The summary records of this drafter: matched by its folder, else by its name."""
    by_path = [r for r in summary if _same_path(r.get("drafter_path"), model_dir)]
    if by_path:
        return by_path
    return [r for r in summary if name is not None and r.get("drafter") == name]


def _num(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table_rows(records: list[dict]) -> list[list[str]]:
    """The card's evaluation table, one row per summary record, as the card prints it."""
    return [[str(r["task"]), str(r["engine"]), str(r["gamma"]), f"{r['temperature']:g}",
             _num(r.get("block_efficiency")), _num(r.get("draft_acceptance_rate")), _num(r.get("mbsu"))]
            for r in records]


def _table(records: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(records)]
    return lines


def parse_card_table(text: str) -> list[list[str]]:
    """The evaluation table's rows read back from a card (for tests and tools)."""
    lines = text.splitlines()
    header = "| " + " | ".join(TABLE_HEADER) + " |"
    if header not in lines:
        return []
    out = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def _target_license(target: str | None, bases: list[Path]) -> str | None:
    """The `license:` of a local target folder's own card, when it has one."""
    folder = _find(target, bases)
    if folder is None or not (folder / CARD).is_file():
        return None
    text = (folder / CARD).read_text(encoding="utf-8", errors="replace")
    if text.startswith("---"):
        front = _read_yaml_text(text.split("---")[1])
        lic = _get(front, "license")
        return str(lic) if lic else None
    return None


def _read_yaml_text(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def _distillation_set(cfg: dict, bases: list[Path], target: str | None) -> _SetSource:
    """The set a distilled drafter learned from; generate's manifest names the target and its hash."""
    data = _get(cfg, "distill", "data") or (
        str(Path(_get(cfg, "generate", "output")) / "data") if _get(cfg, "generate", "output") else None)
    set_dir = _find(data, bases)
    if set_dir is not None and set_dir.name == "data":
        set_dir = set_dir.parent
    manifest = _read_json(set_dir / "manifest.json") if set_dir else None
    if isinstance(manifest, dict):
        counts = manifest.get("counts", {})
        return {"distillation_set": {
                    "path": str(set_dir), "rows": counts.get("rows_in_data"), "seeds": counts.get("seeds_good"),
                    "tokens_generated": counts.get("tokens_generated"),
                    "seeds_file": _get(manifest, "config", "generate", "seeds"),
                    "sampling": _get(manifest, "config", "generate", "sampling"),
                    "system_prompt": _get(manifest, "config", "generate", "system_prompt")},
                "target": manifest.get("target_model") or target, "target_hash": manifest.get("target_hash")}
    if data:
        return {"distillation_set": {"path": data, "seeds_file": _get(cfg, "generate", "seeds"),
                                     "sampling": _get(cfg, "generate", "sampling")}}
    return {}


def _summary(summary, cfg: dict, bases: list[Path], run_root: Path) -> tuple[list[dict] | None, str | None]:
    """Evaluate's records (given, or read from a path, or found beside the run) and where they came from."""
    if isinstance(summary, list):
        return summary, None
    path = Path(summary) if summary else None
    if path is None:
        ev_out = _find(_get(cfg, "evaluate", "output"), bases) or run_root / "evaluate"
        path = Path(ev_out) / "summary.json"
    loaded = _read_json(path)
    if summary and loaded is None:
        raise ConfigError(f"cannot read the evaluation summary {str(path)!r}")
    records = loaded if isinstance(loaded, list) else None
    return records, (str(path) if records is not None else None)


def gather(model_dir: str | Path, summary: str | Path | list[dict] | None = None) -> Card:
    """Everything the card says, as a dict (the card is this rendered)."""
    model_dir = Path(model_dir)
    info = _read_json(model_dir / MODEL_INFO)
    if not isinstance(info, dict):
        raise ConfigError(f"{model_dir} has no readable {MODEL_INFO}: not a drafter draftalign exported")
    job_dir = model_dir.parent
    cfg = _read_yaml(job_dir / "config.yaml") or {}
    run_info = _read_json(job_dir / "run_info.json") or {}
    run_root = Path(_get(cfg, "run", "output") or job_dir.parent.parent)
    bases = [job_dir.parent.parent.parent, job_dir.parent.parent]  # where relative run paths may start
    role = info.get("role", "draft")
    name = info.get("drafter") or ("pretrained" if role == "draft" else model_dir.parent.name)
    target = _get(cfg, "models", "target") or (
        str(Path(_get(cfg, "pretrain", "output")) / "target" / "model") if _get(cfg, "pretrain", "output") else None)
    out: Card = {"name": name, "role": role, "path": str(model_dir), "info": info,
                 "target": target, "target_hash": None, "stage_config": cfg}
    if role == "distilled":
        out.update(_distillation_set(cfg, bases, out["target"]))
        out["data_files"] = run_info.get("data_files")
    train = _get(cfg, "distill" if role == "distilled" else "pretrain", "train") or {}
    if role != "distilled":
        train = _get(cfg, "pretrain", "jobs", model_dir.parent.name, "train") or train
    metrics = info.get("metrics") or {}
    steps = metrics.get("step")
    if steps and isinstance(train, dict) and train.get("seq_len"):
        per_step = (train.get("micro_batch_size", 1) * train.get("grad_accum", 1) * train.get("num_workers", 1)
                    * train["seq_len"])
        out["token_slots"] = steps * per_step
    out["steps"] = steps
    out["train"] = train
    records, out["summary_path"] = _summary(summary, cfg, bases, run_root)
    out["evaluation"] = drafter_records(records, model_dir, name) if records else []
    out["license"] = _target_license(out["target"], bases)
    return out


def _sampling_line(s: dict) -> str:
    parts = [f"T = {s.get('temperature', 0):g}" if s.get("temperature") else "greedy"]
    if s.get("top_p") not in (None, 1.0) and s.get("temperature"):
        parts.append(f"top-p {s['top_p']:g}")
    if s.get("max_tokens"):
        parts.append(f"at most {s['max_tokens']} tokens")
    return f"`{s.get('name', '?')}` ({', '.join(parts)})"


def _training_lines(card: Card, target: str | None, role: str, m: Mapping[str, float]) -> list[str]:
    """The card's Training bullets: target, size, loss, start, set, steps, final held-out metrics."""
    info = card["info"]
    lines: list[str] = []
    if target:
        lines.append(f"- Target model: `{target}`" + (f" (hash `{card['target_hash']}`)" if card.get("target_hash")
                                                     else ""))
    if info.get("parameters"):
        lines.append(f"- Parameters: {info['parameters'] / 1e6:.1f}M")
    loss = info.get("loss")
    if isinstance(loss, dict):
        variant = f", variant `{loss['variant']}`" if loss.get("variant") else ""
        lines.append(f"- Loss: `{loss.get('name')}`{variant}")
    if info.get("initialised_from"):
        lines.append(f"- Initialised from: `{info['initialised_from']}`")
    ds = card.get("distillation_set")
    if ds:
        bits = [f"`{ds['path']}`"]
        if ds.get("rows") is not None:
            bits.append(f"{ds['rows']} rows")
        if ds.get("seeds") is not None:
            bits.append(f"from {ds['seeds']} seed instructions")
        if ds.get("seeds_file"):
            bits.append(f"(seeds: `{ds['seeds_file']}`)")
        lines.append(f"- Distillation set: {' '.join(bits)}")
        if ds.get("sampling"):
            lines.append("- Target sampling settings: " + "; ".join(_sampling_line(s) for s in ds["sampling"]
                                                                    if isinstance(s, dict)))
        if ds.get("tokens_generated") is not None:
            lines.append(f"- Tokens the target generated: {ds['tokens_generated']:,}")
    lines += _on_policy_lines(card)
    if card.get("steps") is not None:
        line = f"- Training steps: {card['steps']}"
        if card.get("token_slots"):
            what = ("the loss covers response positions only" if role == "distilled"
                    else "packed corpus rows, no padding")
            line += (f"; {card['token_slots']:,} token slots (steps × sequences per step × "
                     f"seq_len {card['train'].get('seq_len')}; {what})")
        lines.append(line)
    for key, label in (("holdout_expected_acceptance", "held-out expected acceptance Σ min(p, q)"),
                       ("holdout_perplexity", "held-out perplexity"), ("holdout_loss", "held-out loss")):
        if m.get(key) is not None:
            lines.append(f"- Final {label}: {m[key]:.4f}")
    if info.get("fingerprint"):
        lines.append(f"- draftalign config fingerprint: `{info['fingerprint']}`")
    return lines


def _on_policy_lines(card: Card) -> list[str]:
    """The on-policy mixture the drafter trained on (DistillSpec; GKD's λ), when it did."""
    mix = card["info"].get("mixture")
    if not isinstance(mix, dict):
        return []
    on_policy = _get(card["stage_config"], "distill", "on_policy") or {}
    generator = _get(card["stage_config"], "generate", "generator")
    where = f"round {on_policy['round']}, " if on_policy.get("round") else ""
    where += f"answers of `{generator}`" if generator not in (None, "target") else "a drafter-generated set"
    return [f"- On-policy data: λ = {mix.get('on_policy_fraction', 0):g}; {mix.get('on_policy_rows')} training "
            f"rows of the drafter's own answers ({where}, scored by the target) and {mix.get('target_rows')} "
            "of the target's"]


def render(card: Card) -> str:
    """The model card as Markdown with a YAML front matter the Hugging Face Hub reads."""
    role, m = card["role"], card["info"].get("metrics") or {}
    front: FrontMatter = {"library_name": "transformers", "tags": ["draftalign", "speculative-decoding", "draft-model"]}
    if card.get("license"):
        front["license"] = card["license"]
    target = card.get("target")
    if target and not Path(target).is_absolute() and target.count("/") == 1 and not target.startswith("."):
        front["base_model"] = target  # a hub name; a local path means nothing on the Hub
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# draftalign drafter `{card['name']}`", ""]
    what = ("distilled against the target's next-token distributions" if role == "distilled"
            else "pretrained on a text corpus")
    lines.append(f"A small draft model for speculative decoding, {what} with "
                 f"draftalign (after {PAPER}).")
    lines.append("")
    lines += ["## Training", "", *_training_lines(card, target, role, m)]
    lines += ["", "## Evaluation", ""]
    if card["evaluation"]:
        lines.append("Speculative decoding with this drafter (from evaluate's `summary.json`): τ = tokens per "
                     "target call, draft acceptance = accepted / drafted tokens, MBSU = τ / (1 + γc); "
                     "γ draft tokens per block, T the sampling temperature (0 = greedy), on the named engine.")
        lines.append("")
        lines += _table(card["evaluation"])
    else:
        lines.append("Not evaluated yet (run `draftalign evaluate`, then `draftalign card` again).")
    from draftalign.models.identity import is_feature_drafter

    method = "eagle3" if is_feature_drafter(card["path"]) else "draft_model"  # a feature drafter: vLLM's eagle3
    lines += ["", "## Use with vLLM", "", "```python", "from vllm import LLM, SamplingParams", "",
              f"llm = LLM(model={json.dumps(target or 'TARGET')},",
              f"          speculative_config={{\"method\": \"{method}\", \"model\": {json.dumps(card['path'])}, "
              "\"num_speculative_tokens\": 3})",
              "print(llm.generate([\"Hello!\"], SamplingParams(max_tokens=64))[0].outputs[0].text)", "```", "",
              "Replace the model path with this repository's id once it is on the Hub. The drafter shares the "
              "target's tokenizer and must be served with that target.", "", "## License", ""]
    lic = f" (`{card['license']}`)" if card.get("license") else ""
    lines.append(f"This drafter was trained on the outputs and next-token distributions of `{target or 'its target'}`"
                 f"{lic}: it inherits that model's license and terms of use, including any restriction on "
                 "using its outputs to train other models. Check them before publishing or using it.")
    return "\n".join(lines) + "\n"


def write_card(model_dir: str | Path, summary: str | Path | list[dict] | None = None) -> Path:
    """Write `model_dir/README.md` from the run's files; returns its path."""
    model_dir = Path(model_dir)
    path = model_dir / CARD
    write_text_atomic(path, render(gather(model_dir, summary)))
    return path
