"""`draftalign pretrain`: Ray Data packs the corpus, Ray Train + DeepSpeed trains, HF export.

One job per model: the embedded world pretrains its `target` first, then the `draft`
(whose vocabulary and special tokens are derived from that target). A job whose export
already exists for the same inputs and config is reused, not retrained.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any, TypedDict

from draftalign.cluster.resources import TrainResources, train_resources
from draftalign.config import Config, ConfigError, CorpusConfig, PretrainJob
from draftalign.data.corpus import list_files, stdlib_files, stdlib_root
from draftalign.data.split import is_holdout
from draftalign.data.tokenization import load_tokenizer, materialize_tokenizer, vocab_fingerprint
from draftalign.models.arch import (
    build_config,
    check_compatible,
    count_parameters,
    draft_from_target,
    drafter_config,
    load_model_config,
    target_layers_config,
)
from draftalign.models.feature import feature_from_target, feature_parameters, feature_spec
from draftalign.models.identity import absolute_model_path
from draftalign.pipelines.locks import locked_output
from draftalign.pipelines.outputs import claim_output, publish_model, reusable
from draftalign.pipelines.training import fit, materialize_in_order
from draftalign.training.tracking import tracking_run
from draftalign.util.runinfo import fingerprint, write_run_info

_DOC_SUFFIXES = (".txt", ".py", ".md", ".rst")
_ROW_SUFFIXES = (".jsonl", ".json", ".parquet")


def selected_jobs(cfg: Config) -> list[tuple[str, PretrainJob]]:
    order = [n for n in ("target", "draft", "feature") if n in cfg.pretrain.jobs]
    if cfg.pretrain.only:
        if cfg.pretrain.only not in cfg.pretrain.jobs:
            raise ConfigError(f"pretrain.only={cfg.pretrain.only} names no job in pretrain.jobs")
        order = [cfg.pretrain.only]
    if "target" in order and cfg.models.target:
        raise ConfigError("models.target is set, so pretrain.jobs.target would be ignored: remove one of them")
    return [(n, cfg.pretrain.jobs[n]) for n in order]


def model_config_for(cfg: Config, name: str, job: PretrainJob, tok) -> Any:
    """The config a job trains: a Llama preset's (sized from the tokenizer for a target, from the
    target for a draft), or the target's own, of its family (a cut, a feature drafter, init_from)."""
    if job.arch.init_from:
        return load_model_config(job.arch.init_from, cfg.models.trust_remote_code)
    if name == "target":
        if job.arch.init_embeddings == "target":
            raise ConfigError("pretrain.jobs.target.arch.init_embeddings=target: the target cannot start from itself")
        return build_config(job.arch.preset, job.arch.overrides, vocab_size=len(tok),
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    target = _target_config(cfg, tok)
    if job.arch.feature is not None:  # the target's own config: the feature drafter's spec derives from it
        try:
            feature_spec(target, job.arch.feature.layers, job.arch.feature.decoder_layers)
        except ValueError as exc:
            raise ConfigError(f"pretrain.jobs.{name}.arch.{exc}") from None
        return target
    if job.arch.target_layers is not None:
        try:
            return target_layers_config(target, job.arch.target_layers)
        except ValueError as exc:
            raise ConfigError(f"pretrain.jobs.{name}.arch.{exc}") from None
    draft = drafter_config(target, job.arch.preset, job.arch.overrides)
    check_compatible(target, draft)
    return draft


def _target_config(cfg: Config, tok) -> Any:
    """The target's config: the named model, else the target job's export, else its arch."""
    if cfg.models.target:
        return load_model_config(cfg.models.target, cfg.models.trust_remote_code)
    if (Path(cfg.target_path()) / "config.json").is_file():
        return load_model_config(cfg.target_path())
    if "target" in cfg.pretrain.jobs:
        return model_config_for(cfg, "target", cfg.pretrain.jobs["target"], tok)
    raise ConfigError("the draft needs a target: set models.target or add pretrain.jobs.target")


class JobPlan(TypedDict, total=False):
    """One pretrain job in the --plan view; `note` only where its shape came from arch alone."""

    job: str
    output: str
    model: dict[str, int | bool]  # the config fields that size it
    parameters: int
    resources: TrainResources
    note: str


def describe_jobs(cfg: Config) -> list[JobPlan]:
    """The --plan view: model shapes, parameter counts and Ray resources, without training.

    Works offline: where the target or tokenizer sits on an unreachable hub, the drafter is
    described from its preset and arch.overrides, and the plan says so.
    """
    out: list[JobPlan] = []
    with tempfile.TemporaryDirectory() as d:
        try:
            tok = load_tokenizer(materialize_tokenizer(cfg.tokenizer.source, Path(d) / "tok"))
        except OSError:
            tok = None
        for name, job in selected_jobs(cfg):
            note = None
            try:
                if tok is None:
                    raise OSError(f"tokenizer {cfg.tokenizer.source!r} not reachable")
                mc = model_config_for(cfg, name, job, tok)
            except OSError as exc:
                if name == "target":
                    raise
                mc = build_config(job.arch.preset, job.arch.overrides)
                note = f"target not reachable from here ({str(exc).splitlines()[0]}); shape from arch only"
            out.append({
                "job": name, "output": str(Path(cfg.pretrain.output) / name),
                "model": _plan_shape(job, mc),
                "parameters": _parameters(job, mc) if note is None else count_parameters(mc),
                "resources": train_resources(job),
                **({"note": note} if note else {}),
            })
    return out


def _plan_shape(job: PretrainJob, mc: Any) -> dict[str, int | bool]:
    """The config fields that size the job's model (a feature drafter: its layers, on its target's sizes)."""
    shape = {k: getattr(mc, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                         "num_attention_heads", "vocab_size", "max_position_embeddings",
                                         "tie_word_embeddings")}
    if job.arch.feature is not None:
        shape.update(num_hidden_layers=job.arch.feature.decoder_layers, tie_word_embeddings=False)
    return shape


def _rows_text(ds, field: str, where: str):
    from draftalign.workers.corpus_tokens import column_as_text

    names = ds.schema().names
    if field not in names:
        raise ConfigError(f"corpus {where} has no column {field!r} (columns: {', '.join(names)}); "
                          "set pretrain.corpus.text_field")
    return ds.map_batches(column_as_text, fn_kwargs={"field": field}, batch_format="pyarrow")


def corpus_datasets(corpus: CorpusConfig, tokenizer_dir: str, seq_len: int, seed: int):
    """(train, holdout) Ray Datasets of packed rows {input_ids: int32[seq_len]}."""
    import ray.data

    from draftalign.workers.corpus_tokens import bytes_to_text, tokenize_and_pack

    frac = corpus.holdout_fraction
    if corpus.kind in ("stdlib", "files"):
        if corpus.kind == "stdlib":
            root, files = stdlib_root(), stdlib_files()
            key = lambda p: str(p.relative_to(root))  # noqa: E731
        else:
            files, key = list_files(corpus.paths, _DOC_SUFFIXES + _ROW_SUFFIXES), str
        files = files[: corpus.max_documents] if corpus.max_documents else files
        random.Random(seed).shuffle(files)  # mixes modules; the same seed gives the same order
        parts = {"train": [p for p in files if not is_holdout(key(p), frac)],
                 "holdout": [p for p in files if is_holdout(key(p), frac)]}
        splits = {s: _read_files(ps, corpus, bytes_to_text) for s, ps in parts.items()}
    else:
        import datasets

        hf = datasets.load_dataset(corpus.hf_name, corpus.hf_config, split=corpus.hf_split)
        ds = _rows_text(ray.data.from_huggingface(hf), corpus.text_field, corpus.hf_name or "")
        ds = ds.limit(corpus.max_documents) if corpus.max_documents else ds
        splits = {"train": ds.filter(lambda r: not is_holdout(r["text"], frac)),
                  "holdout": ds.filter(lambda r: is_holdout(r["text"], frac))}
    kwargs = {"tokenizer_path": tokenizer_dir, "seq_len": seq_len}
    train = splits["train"].map_batches(tokenize_and_pack, fn_kwargs=kwargs, batch_size=64)
    holdout = splits["holdout"].map_batches(tokenize_and_pack, fn_kwargs=kwargs, batch_size=64)
    # No all-to-all shuffle here: it would hold training back until the whole corpus is read,
    # which never happens for a 600B-token stream. File order is shuffled at the source instead.
    return train, materialize_in_order(holdout)


def _read_files(paths: list[Path], corpus: CorpusConfig, bytes_to_text):
    import ray.data

    if not paths:
        return ray.data.from_items([{"text": ""}]).filter(lambda r: False)
    docs = [str(p) for p in paths if p.suffix not in _ROW_SUFFIXES]
    parts = []
    if docs:
        parts.append(ray.data.read_binary_files(docs).map_batches(bytes_to_text, batch_format="pyarrow"))
    jsonl = [str(p) for p in paths if p.suffix in (".jsonl", ".json")]
    if jsonl:
        parts.append(_rows_text(ray.data.read_json(jsonl, lines=True), corpus.text_field, "JSONL"))
    parquet = [str(p) for p in paths if p.suffix == ".parquet"]
    if parquet:
        parts.append(_rows_text(ray.data.read_parquet(parquet), corpus.text_field, "Parquet"))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _parameters(job: PretrainJob, model_config: Any) -> int:
    """The job's model's parameters: a feature drafter's own (model_config is its target's)."""
    f = job.arch.feature
    if f is None:
        return count_parameters(model_config)
    return feature_parameters(feature_spec(model_config, f.layers, f.decoder_layers))["parameters"]


def _job_fingerprint(cfg: Config, job: PretrainJob, model_config: Any, tok) -> str:
    # Without the folder the config was read from (`_name_or_path`: a target imported into this
    # clone's .cache/): a run folder moved to another clone or machine is still reused.
    arch = {k: v for k, v in model_config.to_dict().items() if k != "_name_or_path"}
    # Nor where the workers run (train.resources): the same model comes out on any node.
    job_fields = job.model_dump(mode="json", exclude={"train": {"resources"}})
    return fingerprint(job_fields, cfg.pretrain.corpus.model_dump(mode="json"), arch,
                       vocab_fingerprint(tok))


@locked_output("pretrain", lambda cfg: cfg.pretrain.output)
def run_pretrain(cfg: Config) -> dict[str, Path]:
    """Train (or reuse) every selected job; returns {job name: exported model folder}."""
    out = Path(cfg.pretrain.output)
    tok_dir = materialize_tokenizer(cfg.tokenizer.source, out / "tokenizer", cfg.tokenizer.chat_template)
    tok = load_tokenizer(tok_dir)
    jobs = selected_jobs(cfg)
    if not jobs:
        raise ConfigError("pretrain.jobs is empty: nothing to pretrain")
    # Everything that can be refused (vocabulary mismatch, bad arch) is checked before Ray starts.
    plans = [(name, job, model_config_for(cfg, name, job, tok)) for name, job in jobs]
    return {name: _run_job(cfg, name, job, mc, tok_dir, tok) for name, job, mc in plans}


def _run_job(cfg: Config, name: str, job: PretrainJob, mc: Any, tok_dir: Path, tok) -> Path:
    job_dir = Path(cfg.pretrain.output).resolve() / name
    model_dir = job_dir / "model"
    fp = _job_fingerprint(cfg, job, mc, tok)
    if reusable(model_dir, fp):
        print(f"[pretrain {name}] reusing {model_dir} (same inputs and config)", flush=True)
        return model_dir
    claim_output(job_dir, fp, cfg.pretrain.overwrite, "pretrain.overwrite")
    write_run_info(job_dir, cfg, f"pretrain.{name}", {"fingerprint": fp, "parameters": _parameters(job, mc)})
    if job.arch.feature is not None:
        return _build_feature(cfg, job, model_dir, tok, fp)
    if job.train is None:
        return _build_from_target(cfg, job, mc, model_dir, tok, fp)
    result = _fit(cfg, name, job, mc, job_dir, str(tok_dir))
    publish_model(result.checkpoint, model_dir, tok,
                  {"fingerprint": fp, "role": name, "metrics": result.metrics,
                   "parameters": count_parameters(mc), "vocab": vocab_fingerprint(tok)})
    m = result.metrics
    ppl = m.get("holdout_perplexity")
    shown = f"{ppl:.1f}" if ppl is not None else "n/a (no held-out sequence)"
    print(f"[pretrain {name}] exported {model_dir}: held-out perplexity {shown} "
          f"(uniform: {mc.vocab_size}), {count_parameters(mc):,} parameters", flush=True)
    return model_dir


def _build_from_target(cfg: Config, job: PretrainJob, mc: Any, model_dir: Path, tok, fp: str) -> Path:
    """The drafter cut from the target's weights (arch.target_layers), exported without training."""
    from ray.train import Checkpoint

    layers = job.arch.target_layers
    target = _load_target(cfg)
    draft = draft_from_target(target, layers)
    with tempfile.TemporaryDirectory() as d:
        draft.save_pretrained(str(Path(d) / "hf"), safe_serialization=True)
        publish_model(Checkpoint.from_directory(d), model_dir, tok,
                      {"fingerprint": fp, "role": "draft", "drafter": cfg.start_name(), "metrics": {}, "target_layers": layers,
                       "parameters": count_parameters(mc), "vocab": vocab_fingerprint(tok)})
    print(f"[pretrain draft] built {model_dir} from the target's layers {layers} (of "
          f"{target.config.num_hidden_layers}), its embeddings, norm and head: "
          f"{count_parameters(mc):,} parameters, no corpus pretraining", flush=True)
    return model_dir


def _load_target(cfg: Config):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(absolute_model_path(cfg.target_path()), dtype=torch.float32,
                                                trust_remote_code=cfg.models.trust_remote_code, use_safetensors=True)


def _build_feature(cfg: Config, job: PretrainJob, model_dir: Path, tok, fp: str) -> Path:
    """The feature drafter (arch.feature) started from the target's weights, exported without training."""
    from ray.train import Checkpoint

    f = job.arch.feature
    target = _load_target(cfg)
    spec = feature_spec(target.config, f.layers, f.decoder_layers, f.norm_before_residual,
                        verifier=absolute_model_path(cfg.target_path()))
    draft = feature_from_target(target, spec)
    counts = feature_parameters(spec)
    with tempfile.TemporaryDirectory() as d:
        draft.save_pretrained(str(Path(d) / "hf"))
        publish_model(Checkpoint.from_directory(d), model_dir, tok,
                      {"fingerprint": fp, "role": "feature", "drafter": "feature-start", "metrics": {},
                       "feature_layers": spec.target_layers, "parameters": counts["parameters"],
                       "vocab": vocab_fingerprint(tok)})
    print(f"[pretrain feature] built {model_dir}: a feature drafter on the target's layers {spec.target_layers} "
          f"(of {target.config.get_text_config().num_hidden_layers}), {spec.decoder_layers} decoder layer(s), "
          f"{counts['trained']:,} trained parameters (+ the target's frozen embeddings)", flush=True)
    return model_dir


def _fit(cfg: Config, name: str, job: PretrainJob, mc: Any, job_dir: Path, tok_dir: str):
    from draftalign.cluster.session import init_ray
    from draftalign.workers.pretrain_loop import PretrainLoopConfig, pretrain_loop

    init_ray(cfg.ray)
    train = job.train
    train_ds, holdout_ds = corpus_datasets(cfg.pretrain.corpus, tok_dir, train.seq_len, train.seed)
    needs_target = job.arch.init_embeddings == "target" or job.arch.target_layers is not None
    target = absolute_model_path(cfg.target_path()) if needs_target else None
    loop_config = PretrainLoopConfig(name=f"pretrain {name}", job=job, model_config=mc.to_dict(), target=target,
                                     tracking=tracking_run(cfg.tracking, cfg.run, f"pretrain-{name}"))
    return fit(pretrain_loop, loop_config, train, f"{cfg.run.name}-pretrain-{name}", job_dir,
               {"train": train_ds, "holdout": holdout_ds})
