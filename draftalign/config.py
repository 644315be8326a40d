"""The one typed config tree, loaded from YAML plus `a.b=value` overrides.

Every model is frozen and rejects unknown keys, so a typo fails at the CLI with
its dotted path instead of being silently ignored deep inside a Ray worker.
Stage code receives these objects; nothing reads YAML or globals after the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from draftalign.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "parse_overrides"]


class Strict(BaseModel):
    # allow_inf_nan=False: a NaN or infinite learning rate or temperature passes every `gt`/`ge`
    # bound and would only show as a NaN loss or a crashed sampler deep inside a Ray worker.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Per-element bounds, so that an error names the exact entry (`evaluate.gammas.1`).
Gamma = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


def _custom_only(resources: dict[str, float]) -> dict[str, float]:
    builtin = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(resources))
    if builtin:
        raise ValueError(f"{', '.join(builtin)}: set with the stage's own keys (cpus_*, use_gpu, gpus_*); "
                         "resources holds a node's custom resources only")
    return resources


# Custom Ray resources an actor asks for besides its CPUs and GPUs, e.g. {draftalign_slot: 1}:
# a node started with `ray start --resources '{"draftalign_slot": 2}'` then takes at most two such
# actors, which is how a config spreads engine replicas or train workers over chosen nodes
# (docs/cluster.md). Not part of any fingerprint: where an actor runs changes no output.
CustomResources = Annotated[dict[str, Annotated[float, Field(gt=0)]], AfterValidator(_custom_only)]


class RunConfig(Strict):
    name: str = "draftalign"
    output: str = "runs/default"  # every stage's default output lives under this folder
    seed: int = 0


class RayConfig(Strict):
    # None: a fresh local Ray (or, inside a Ray job, the job's cluster); "auto" or
    # "ray://host:10001" joins a running cluster.
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)  # local Ray only: caps what a laptop hands to Ray
    dashboard_host: str = "127.0.0.1"  # loopback unless the operator opts in
    include_dashboard: bool = True


class TokenizerConfig(Strict):
    # "embedded": the SentencePiece model shipped inside mistral_common (Llama 2 family,
    # 32k tokens, byte fallback); otherwise a Hugging Face folder or hub name, or a GGUF
    # source as in models.target.
    source: str = "embedded"
    chat_template: Literal["auto", "llama2"] = "auto"  # auto: the tokenizer's own, else Llama 2


class ModelsConfig(Strict):
    # A Hugging Face folder or hub name, a .gguf file, or `pkg:DIST/PATH` (a GGUF file inside an
    # installed package); GGUF models are imported once into import_dir (draftalign/models/gguf.py).
    # None means "the model the pretrain stage exports".
    target: str | None = None
    draft: str | None = None
    trust_remote_code: bool = False
    import_dir: str = ".cache/draftalign/models"  # on a cluster: storage every node sees


class FeatureArchConfig(Strict):
    """A feature drafter (EAGLE-3; draftalign/models/feature.py): one decoder layer on the target's
    hidden states at `layers` and the next token's embedding, served by vLLM as method eagle3."""

    # The target's hidden states it reads: the residual stream entering these decoder layers.
    # None: a low, a middle and a high one, as EAGLE-3 and vLLM choose them (2, N // 2, N - 3).
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    decoder_layers: int = Field(1, ge=1)
    # vLLM's option: the residual stream starts at the normed fused state (true) or the raw one.
    norm_before_residual: bool = False


class ArchConfig(Strict):
    """What to build: a named preset plus LlamaConfig field overrides, or a model to continue."""

    preset: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None  # continue pretraining an existing HF model instead
    # "target": start the (drafter's) input embeddings from the target's, projected to the
    # drafter's width (models.project_embeddings); "random": the usual random initialisation.
    init_embeddings: Literal["random", "target"] = "random"
    # A drafter cut from the target (models.draft_from_target): its embeddings, these decoder
    # layers in this order, its final norm and its head. Replaces preset/overrides/init_from.
    target_layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    # A feature drafter built from the target (pretrain.jobs.feature); replaces everything else here.
    feature: FeatureArchConfig | None = None

    @property
    def from_target(self) -> bool:
        """Built from the target's own weights, with no corpus: a cut (target_layers) or a feature drafter."""
        return self.target_layers is not None or self.feature is not None

    @model_validator(mode="after")
    def _target_layers_alone(self) -> ArchConfig:
        if self.feature is not None and self.target_layers is not None:
            raise ValueError("arch.feature and arch.target_layers build two kinds of drafter; keep one")
        if self.target_layers is not None or self.feature is not None:
            clash = [k for k in ("preset", "init_from") if getattr(self, k) is not None]
            clash += ["overrides"] * bool(self.overrides) + ["init_embeddings"] * (self.init_embeddings != "random")
            if clash:
                key = "target_layers" if self.target_layers is not None else "feature"
                raise ValueError(f"arch.{key} builds the drafter from the target's own weights; "
                                 f"remove {', '.join(clash)}")
        return self


class CorpusConfig(Strict):
    kind: Literal["stdlib", "files", "huggingface"] = "stdlib"
    paths: list[str] = Field(default_factory=list)  # .txt/.py (one document per file), .jsonl, .parquet
    text_field: str = "text"
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    max_documents: int | None = Field(None, ge=1)
    holdout_fraction: float = Field(0.02, ge=0.0, lt=0.5)


class OptimConfig(Strict):
    lr: float = Field(3e-4, gt=0)
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    grad_clip: float = Field(1.0, gt=0)


class TrainConfig(Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    resources: CustomResources = Field(default_factory=dict)  # custom Ray resources per worker
    seq_len: int = Field(256, ge=8)
    micro_batch_size: int = Field(8, ge=1)  # sequences per worker per forward pass
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1)  # optimizer steps
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: evaluate only at the end
    eval_batches: int = Field(8, ge=1)
    log_every: int = Field(10, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_failures: int = Field(2, ge=0)  # worker crashes Ray Train absorbs by restoring a checkpoint
    seed: int = 0
    # Chaos testing: raise once at this step so Ray Train's restore-from-checkpoint is exercised.
    inject_failure_at_step: int | None = None

    @property
    def dtype_name(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision


class PretrainJob(Strict):
    arch: ArchConfig
    # None: no corpus pretraining, the drafter is only built (arch.target_layers).
    train: TrainConfig | None = TrainConfig()
    optim: OptimConfig = OptimConfig()

    @model_validator(mode="after")
    def _something_to_do(self) -> PretrainJob:
        if self.train is None and not self.arch.from_target:
            raise ValueError("train: null skips corpus pretraining, which only a drafter built from the "
                             "target can do: set arch.target_layers or give train settings")
        if self.arch.feature is not None and self.train is not None:
            raise ValueError("arch.feature builds a feature drafter from the target, with no corpus "
                             "pretraining: set train: null (distillation trains it)")
        return self


class PretrainConfig(Strict):
    output: str  # filled from run.output when absent
    corpus: CorpusConfig = CorpusConfig()
    # Jobs run in order; "target" builds the embedded world's target, "draft" the drafter (the
    # paper's standalone kind), "feature" a feature drafter (arch.feature) beside or instead of it.
    jobs: dict[Literal["target", "draft", "feature"], PretrainJob] = Field(default_factory=dict)
    only: Literal["target", "draft", "feature"] | None = None  # run one job of the list

    @model_validator(mode="after")
    def _feature_job(self) -> PretrainConfig:
        for name, job in self.jobs.items():
            if (name == "feature") != (job.arch.feature is not None):
                raise ValueError("pretrain.jobs.feature, and only it, builds a feature drafter: set its "
                                 f"arch.feature (pretrain.jobs.{name} is the wrong place for it)"
                                 if name != "feature" else "pretrain.jobs.feature needs arch.feature")
        return self
    overwrite: bool = False  # replace an output made from a different config


class EngineConfig(Strict):
    """vLLM engine replicas behind Ray Data; the same keys size a laptop and a GPU cluster."""

    replicas: int = Field(1, ge=1)  # engine actors, each serving the whole target
    batch_size: int = Field(16, ge=1)  # rows Ray Data hands an engine at a time
    max_concurrent_batches: int = Field(4, ge=1)  # batches in flight per engine, to hide tail latency
    tensor_parallel_size: int = Field(1, ge=1)
    use_gpu: bool = False
    # Per tensor-parallel worker. Fractional CPUs keep a 2-core machine from deadlocking:
    # Ray Data's own tasks need a CPU slot beside the engine actors.
    cpus_per_replica: float = Field(0.5, gt=0)
    gpus_per_replica: float = Field(1.0, ge=0)  # per tensor-parallel worker, when use_gpu
    resources: CustomResources = Field(default_factory=dict)  # custom Ray resources per tensor-parallel worker
    max_model_len: int = Field(2048, ge=16)  # prompt tokens + max_tokens must fit, else the seed is rejected
    # Passed to vllm.LLM as they are. On CPU, kv_cache_memory_bytes defaults to 256 MiB,
    # enforce_eager to true and dtype to float32 unless set here.
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    # vLLM's own engine metrics (ray.data.llm's log_engine_metrics: vllm:* series in Ray's
    # Prometheus and Grafana). None: on with GPUs; the CPU engine actor has no metrics setup.
    engine_metrics: bool | None = None
    # Environment of the engine actors, e.g. vLLM's CPU knobs VLLM_CPU_NUM_OF_RESERVED_CPU or
    # VLLM_CPU_OMP_THREADS_BIND (how many cores the engine binds its threads to).
    env: dict[str, str] = Field(default_factory=dict)


class SeedFields(BaseModel):
    """Which column holds what. `messages`, when set, replaces `instruction`/`input`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instruction: str = "instruction"
    input: str | None = "input"  # optional context appended to the instruction
    messages: str | None = None  # a list of {role, content} turns ending with a user turn
    id: str | None = None  # a stable id column; else the id is derived from the text
    source: str | None = None  # a per-row source column; else prepare_seeds' `source`


class SamplingSetting(BaseModel):
    """One way of sampling the target; every seed is answered once per setting.

    `name` goes into each row's `row_key` ("{id}/{name}"), so it is restricted to
    letters, digits, ".", "_" and "-". temperature 0 means greedy decoding.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # NaN passes ge=0

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", max_length=64)
    temperature: float = Field(ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(1024, ge=1)  # paper-spec section 4 recommends <= 1024 new tokens
    seed: int | None = None  # per-request seed, for reproducible sampling

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def default_sampling_settings(max_tokens: int = 1024, seed: int | None = None) -> list[SamplingSetting]:
    """Greedy plus T=0.7 and T=1.0 with top-p 0.95: several temperatures per prompt (section 4)."""
    return [
        SamplingSetting(name="greedy", temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=None),
        SamplingSetting(name="t0.7", temperature=0.7, top_p=0.95, max_tokens=max_tokens, seed=seed),
        SamplingSetting(name="t1.0", temperature=1.0, top_p=0.95, max_tokens=max_tokens, seed=seed),
    ]


class SelfInstructKind(Strict):
    """One kind of request self-instruct asks for: the target continues `opener` in the user turn
    (Magpie with a seeded prefix), so the requests cover the kinds users ask, not only the target's favourite."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", max_length=64)  # the rows' `source` is SOURCE/NAME
    # The start of the request, written for the target: "Write a Python function that",
    # "Summarize the following text:\n\n". End it without a space: the target's next word brings its
    # own. "" leaves the whole request to the target.
    opener: str = ""
    share: float = Field(1.0, gt=0.0)  # relative; requests are dealt out round-robin in proportion
    max_tokens: int | None = Field(None, ge=1)  # None: self_instruct.max_tokens (a text to summarise runs longer)


class SelfInstructConfig(Strict):
    """Instructions the target writes itself (Magpie): it gets only its chat template's user-turn
    prefix, writes a user request, and the kept requests are answered like seeds."""

    count: int = Field(ge=1)  # requests asked for; the filters keep fewer
    temperature: float = Field(1.0, ge=0.0)  # Magpie samples at T = 1: greedy would repeat one request
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)  # a request still open after this is dropped (not ending the turn)
    min_chars: int = Field(16, ge=1)  # shorter requests are mostly fragments ("Hi", "?")
    max_chars: int = Field(1000, ge=1)
    seed: int | None = None  # None: each request's seed comes from its index, still reproducible
    source: str = Field("self-instruct", min_length=1)  # the rows' `source`
    # Kinds of request and their shares (questions, code, summaries, rewriting, translation, ...);
    # None: one kind, wholly the target's choice (plain Magpie). min_chars counts what the target
    # wrote after a kind's opener.
    kinds: list[SelfInstructKind] | None = Field(None, min_length=1)
    # A request sharing this share of its word 3-grams (Jaccard) with a seed or an earlier kept
    # request is a near duplicate and dropped; null: exact duplicates (normalised text) only.
    near_duplicate: float | None = Field(0.6, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _bounds(self) -> SelfInstructConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} > max_chars {self.max_chars}: nothing could be kept")
        names = [k.name for k in self.kinds or []]
        if len(set(names)) != len(names):
            raise ValueError(f"kinds: names must be unique: {names}")
        return self


class ExcludeEvalConfig(Strict):
    """Evaluation prompts kept out of the distillation set: a seed or self-instructed request that
    copies a prompt of evaluate.tasks, or nearly does, is dropped before the target answers it."""

    enabled: bool = True  # false: no check, and the evaluation sets are not read
    # A request copies an evaluation prompt when it holds this share of the prompt's word 3-grams
    # (and of its input's, for a prompt with one: the instruction of a task is shared by all its prompts).
    threshold: float = Field(0.5, gt=0.0, le=1.0)
    # Rows read per evaluation task (at least those the evaluate stage reads): a later evaluation
    # with more prompts than this run's stays clean too.
    max_prompts: int = Field(1000, ge=1)


class GenerateConfig(Strict):
    output: str  # filled from run.output when absent
    # A .jsonl/.parquet file, or a Hugging Face data set: a local folder (a cloned hub repo or
    # `save_to_disk` output) or a hub name (hf_config, hf_split apply).
    seeds: str | None = None  # may be None when self_instruct makes the instructions
    # Instructions the target writes itself, added to the seeds (or instead of them).
    self_instruct: SelfInstructConfig | None = None
    # Seeds and self-instructed requests that copy an evaluation prompt never reach the set.
    exclude_eval: ExcludeEvalConfig = ExcludeEvalConfig()
    hf_config: str | None = None
    hf_split: str = "train"
    fields: SeedFields = SeedFields()
    source: str | None = None  # the rows' `source`; default: the seeds file name or data set name
    max_seeds: int | None = Field(None, ge=1)
    system_prompt: str | None = None  # none by default (paper-spec section 4)
    sampling: list[SamplingSetting] = Field(default_factory=default_sampling_settings, min_length=1)
    engine: EngineConfig = EngineConfig()
    rows_per_file: int = Field(256, ge=1)  # one data/ file per chunk: the unit a kill can lose
    max_retries: int = Field(2, ge=0)  # extra passes over rows whose engine request failed
    # A folder whose rows were made otherwise (target, template, sampling, system prompt, seeds;
    # its fingerprint.json) is refused; true discards those rows and generates anew.
    overwrite: bool = False
    # Chaos testing: these row keys fail in the engine on the first pass (exercises the retries).
    inject_failure_row_keys: list[str] = Field(default_factory=list)
    # What vLLM serves: "target" (the distillation set of the paper), "draft" (the pretrained
    # drafter, models.draft: its own answers, the on-policy data of DistillSpec and GKD), or a model
    # folder, hub name or GGUF source. The rows' target_* columns still name the target, which scores them.
    generator: str = Field("target", min_length=1)

    @model_validator(mode="after")
    def _unique_sampling_names(self) -> GenerateConfig:
        names = [s.name for s in self.sampling]
        if len(set(names)) != len(names):
            raise ValueError(f"sampling names must be unique (row keys use them): {names}")
        return self


# The losses a config may name: the keys of losses.LOSSES (tests/test_losses.py holds them equal).
# Listed here rather than read from that module, which imports torch: validating a config
# (--plan, submit, the Python API) should not pay for it.
LOSS_NAMES = ("forward_kl", "reverse_kl", "tvd", "tvd++", "lk", "lk_hybrid")
LK_ETA = 3.0  # lk_hybrid's default η (losses.LK_ETA; tests hold them equal)


class LossConfig(Strict):
    name: str = "tvd++"  # one of LOSS_NAMES
    variant: Literal["vocab", "exact", "sampled"] = "vocab"  # tvd++ only (paper-spec 5.3)
    eta: float = Field(LK_ETA, gt=0)  # lk_hybrid only: λ = exp(−η α) weighs KL against TVD
    # This loss's training seed (the shuffle and any sampling), over distill.train.seed; named in
    # the drafter's label (`forward_kl-seed1`), so one run can train a loss under several seeds.
    seed: int | None = None
    # Which drafter this loss trains: "draft" (pretrain.jobs.draft or models.draft, the paper's
    # standalone drafter) or "feature" (pretrain.jobs.feature, with the training-time test of
    # distill.ttt_steps); a feature drafter's label starts with "feature-".
    drafter_kind: Literal["draft", "feature"] = "draft"

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSS_NAMES))}")
        return name

    @model_validator(mode="after")
    def _variant_only_for_tvdpp(self) -> LossConfig:
        if self.name != "tvd++" and self.variant != "vocab":
            raise ValueError(f"variant={self.variant} applies to tvd++ only, not to {self.name}")
        if self.name != "lk_hybrid" and self.eta != LK_ETA:
            raise ValueError(f"eta={self.eta} applies to lk_hybrid only, not to {self.name}")
        return self

    @property
    def label(self) -> str:
        """The drafter's name in reports: the loss, plus the variant or η when not the default and the seed when set."""
        if self.variant != "vocab":
            base = f"{self.name}-{self.variant}"
        else:
            base = self.name if self.eta == LK_ETA else f"{self.name}-eta{self.eta:g}"
        base = base if self.drafter_kind == "draft" else f"{self.drafter_kind}-{base}"
        return base if self.seed is None else f"{base}-seed{self.seed}"

    @property
    def folder(self) -> str:
        """The drafter's folder under distill.output ("+" is awkward in paths: tvd++ -> tvdpp)."""
        return self.label.replace("+", "p")


class TargetPoolConfig(Strict):
    """Ray actors holding the frozen target; they return next-token log-probs for batches."""

    actors: int = Field(1, ge=1)  # per train worker, placed on that worker's node
    cpus_per_actor: float = Field(1.0, gt=0)
    resources: CustomResources = Field(default_factory=dict)  # custom Ray resources per actor
    # torch threads in each actor (None: Ray's default, one per CPU asked). More than the CPUs
    # asked helps on a small machine where the trainer mostly waits for the target.
    threads: int | None = Field(None, ge=1)
    use_gpu: bool = False
    gpus_per_actor: float = Field(1.0, ge=0)  # when use_gpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # None: the full vocabulary (the losses need p(x) for every x); k: top-k plus tail mass.
    top_k: int | None = Field(None, ge=1)
    wire_dtype: Literal["float16", "float32"] = "float16"  # log-probs on the wire
    prefetch: int = Field(2, ge=1)  # batches in flight ahead of the trainer (bounded: backpressure)
    max_restarts: int = Field(3, ge=0)  # a dead actor is restarted and its request retried
    # Benchmark/baseline: compute the target inside the train worker instead of the pool.
    in_process: bool = False
    # Where the cache lives (None: distill.output/target_cache); on-policy rounds point theirs at
    # the run's, so the target's own set is scored once for every round.
    cache_dir: str | None = None
    # Memoise each sequence's log-probs on local disk (wire_dtype, V values per trained position:
    # 98 KB for a 49k vocabulary; V' for a reduced draft vocabulary, 16 KB at 8,192), so later
    # passes and the other losses cost only the drafter.
    # Off by default: for a large set and vocabulary it is terabytes.
    cache: bool = False
    # Chaos testing: the first actor exits (os._exit) on this request number, once.
    inject_actor_death_at_request: int | None = Field(None, ge=1)


class OnPolicyConfig(Strict):
    """On-policy data: the drafter's own answers, scored by the target (DistillSpec; GKD's lmbda).

    `fraction` λ of the training rows come from a drafter-generated set, the rest from the
    target's (distill.data); the held-out rows are always the target's. With `rounds` N ≥ 1,
    `draftalign run` generates that set with the current drafter, distils, and repeats N times,
    each round in distill.output/rounds/round-R/; without rounds, `data` names a set made by
    `draftalign generate` with generate.generator=draft.
    """

    fraction: float = Field(0.0, ge=0.0, le=1.0)  # λ: 0 is the paper's off-policy distillation
    rounds: int = Field(0, ge=0, le=100)  # 0: no rounds (one distillation, on `data` when fraction > 0)
    data: str | None = None  # a drafter-generated set (folder or file); the rounds make their own
    # The drafter's sampling settings in the rounds (None: generate.sampling); GKD samples at T = 1.
    sampling: list[SamplingSetting] | None = Field(None, min_length=1)
    # Set by `draftalign run` for each round's distillation: names the drafter `...-roundR`.
    round: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _combinations(self) -> OnPolicyConfig:
        # Each message names the keys, so a bad combination is fixed where it was written.
        if self.rounds and not self.fraction:
            raise ValueError(f"distill.on_policy.rounds={self.rounds} needs distill.on_policy.fraction > 0: "
                             "with 0 no round would train on the drafter's answers it generates")
        if self.rounds and self.data is not None:
            raise ValueError("distill.on_policy.data cannot be set with distill.on_policy.rounds: each round "
                             "generates its own set with the current drafter")
        if self.rounds and self.round is not None:
            raise ValueError("distill.on_policy.round is set by `draftalign run` for each round; leave it unset")
        if self.fraction and not self.rounds and self.data is None:
            raise ValueError(f"distill.on_policy.fraction={self.fraction:g} needs distill.on_policy.data (a set "
                             "made with generate.generator=draft) or distill.on_policy.rounds >= 1")
        if not self.fraction and self.data is not None:
            raise ValueError("distill.on_policy.data is set but distill.on_policy.fraction is 0: no row of it "
                             "would be used; set the fraction (λ) of on-policy rows")
        if self.sampling is not None and not self.rounds:
            raise ValueError("distill.on_policy.sampling applies to the rounds' generation only; set "
                             "distill.on_policy.rounds, or generate.sampling for a set you generate yourself")
        if self.sampling is not None and len({s.name for s in self.sampling}) != len(self.sampling):
            raise ValueError(f"distill.on_policy.sampling names must be unique: {[s.name for s in self.sampling]}")
        return self

    @property
    def active(self) -> bool:
        return self.fraction > 0


class DistillConfig(Strict):
    output: str  # filled from run.output when absent; each loss trains into output/<loss name>
    data: str | None = None  # a distillation set folder or file; default: generate.output
    init_from: str | None = None  # the drafter to start from; default: the pretrained drafter
    holdout_fraction: float = Field(0.05, ge=0.0, lt=0.5)  # seeds kept aside for evaluation
    include_prompt: bool = False  # also train on prompt positions (held-out numbers stay on responses)
    # One drafter per loss, each from the same starting drafter on the same set, one after the
    # other; with target_pool.cache they share the target's log-probs (computed once).
    losses: list[LossConfig] = Field(default_factory=lambda: [LossConfig()], min_length=1)
    target_pool: TargetPoolConfig = TargetPoolConfig()
    train: TrainConfig = TrainConfig(seq_len=192, micro_batch_size=8, max_steps=100, checkpoint_every=25)
    optim: OptimConfig = OptimConfig(lr=3e-4, warmup_steps=10, weight_decay=0.0, min_lr_ratio=0.0)
    eval_gamma: int = Field(3, ge=1)  # the γ at which the implied block efficiency is reported
    overwrite: bool = False  # replace an output made from a different config
    on_policy: OnPolicyConfig = OnPolicyConfig()  # the drafter's own answers in the mix (off by default)
    # A reduced draft vocabulary (draftalign/draftvocab.py): the drafter's head covers the V most
    # frequent tokens of the training rows and q = 0 elsewhere (sampling stays exact). On a small
    # drafter the output layer is most of the time per draft token. None: the full vocabulary.
    draft_vocab: int | None = Field(None, ge=2)
    # Weights kept as they start: "embeddings" (the input embeddings; with a tied, full head the
    # head too) and "head" (the output layer). A drafter cut from the target keeps the target's.
    freeze: list[Literal["embeddings", "head"]] = Field(default_factory=list)
    # Feature drafters (losses with drafter: feature) train with the training-time test: unrolled
    # ttt_steps drafts on their own outputs, step j's loss weighted ttt_decay^(j-1) (SpecForge's
    # 0.8): later drafts count only if the earlier ones were accepted. Their embeddings stay frozen.
    ttt_steps: int = Field(3, ge=1, le=16)
    ttt_decay: float = Field(0.8, gt=0.0, le=1.0)

    def drafter_label(self, loss: LossConfig) -> str:
        """The drafter's name in reports: the loss's label, plus λ and the round when on-policy
        (`tvd++-onpolicy0.5-round2`)."""
        op = self.on_policy
        if not op.active:
            return loss.label
        return f"{loss.label}-onpolicy{op.fraction:g}" + (f"-round{op.round}" if op.round else "")

    def drafter_folder(self, loss: LossConfig) -> str:
        """The drafter's folder under distill.output ("+" is awkward in paths: tvd++ -> tvdpp).
        Without the round: each round has a folder of its own (rounds/round-R/)."""
        op = self.on_policy
        return loss.folder + (f"-onpolicy{op.fraction:g}" if op.active else "")

    @model_validator(mode="after")
    def _unique_losses(self) -> DistillConfig:
        labels = [loss.label for loss in self.losses]
        if len(set(labels)) != len(labels):
            raise ValueError(f"distill.losses lists a loss twice: {labels}")
        return self

    @model_validator(mode="after")
    def _on_policy_needs_a_standalone_drafter(self) -> DistillConfig:
        feature = [loss.label for loss in self.losses if loss.drafter_kind == "feature"]
        if self.on_policy.active and feature:
            raise ValueError(f"distill.on_policy trains on the drafter's own answers, and a feature drafter "
                             f"cannot answer alone (it reads the target's hidden states): remove {feature} from "
                             "distill.losses or set distill.on_policy.fraction=0")
        return self

    @model_validator(mode="after")
    def _draft_vocab_needs_full_target(self) -> DistillConfig:
        if self.draft_vocab is not None and self.target_pool.top_k is not None:
            raise ValueError(f"distill.draft_vocab={self.draft_vocab} needs the target's full distribution: "
                             f"set distill.target_pool.top_k=null (it is {self.target_pool.top_k})")
        return self

    @model_validator(mode="after")
    def _no_topk_target_for_tvdpp(self) -> DistillConfig:
        # TVD++ reads r(x) = 1{p(x) > q(x)} at every token: with the top-k tail filled flat
        # (losses.densify_topk) its gradient had cosine 0.014 with the full-vocabulary one at k = 20
        # (bench/topk_tail_error.py), i.e. a different objective, not an approximation
        if self.target_pool.top_k is not None and any(loss.name == "tvd++" for loss in self.losses):
            raise ValueError(f"distill.target_pool.top_k={self.target_pool.top_k} cannot be used with "
                             "tvd++ in distill.losses: its gradient needs the full target distribution; "
                             "set distill.target_pool.top_k=null or use another loss")
        return self


class EvalFields(Strict):
    """Which column holds what in an evaluation set; a dotted name reaches into a nested
    column (WMT's `translation.de`). None: the set has no such column."""

    instruction: str | None = "instruction"  # None: the task's fixed `instruction` text is used
    input: str | None = "input"  # the context, article or source text
    id: str | None = "id"  # None: the id is a hash of the prompt text


class EvalTaskConfig(Strict):
    """One evaluation task: a data set, its field mapping and its prompt template."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", max_length=64)
    kind: Literal["open_ended", "summarize", "translate"]
    # A .jsonl/.parquet file or a Hugging Face data set (local folder or hub name, as for
    # generate.seeds); None: the bundled held-out set of this kind (examples/data/eval/KIND.jsonl).
    data: str | None = None
    hf_config: str | None = None
    hf_split: str = "test"
    fields: EvalFields = EvalFields()
    # For sets without an instruction column (CNN/DailyMail, XSum, WMT): the request text.
    instruction: str | None = None
    # The user turn, before the chat template; "{input}" is "" when a row has none.
    template: str = "{instruction}\n\n{input}"
    max_prompts: int | None = Field(None, ge=1)  # None: evaluate.max_prompts


class DrafterRef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._+-]+$", max_length=64)
    path: str  # a model folder or a hub name


class ReferenceEvalConfig(Strict):
    """The exact batch-1 PyTorch decoder of draftalign.evaluation.specdecode, run in the driver."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch CPU threads for the driver (None: torch's default). Batch-1 decoding of small models
    # gains little from threads and, on a busy machine, loses many times over to spin-waiting.
    threads: int | None = Field(None, ge=1)
    measure_autoregressive: bool = True  # also time plain target decoding (the speed-up baseline)
    warmup_tokens: int = Field(8, ge=0)  # an untimed run first, so one-off start-up costs stay out
    temperatures: list[float] | None = None  # this engine's subset; None: evaluate.temperatures
    # This engine's drafters, by name; None: all of evaluate's. Batch-1 reference decoding is slow:
    # let vLLM (batched) carry every drafter's τ and time here only the drafters that matter.
    drafters: list[str] | None = Field(None, min_length=1)


class VllmEvalConfig(Strict):
    """vLLM engines, one per (drafter, γ), in Ray actors: speculative_config method draft_model for a
    model folder, ngram for the n-gram baseline."""

    use_gpu: bool = False
    cpus_per_engine: float = Field(1.0, gt=0)
    gpus_per_engine: float = Field(1.0, ge=0)  # when use_gpu
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(2048, ge=16)
    # Passed to vllm.LLM as they are. On CPU the generate stage's defaults apply (256 MiB KV
    # cache, enforce_eager, float32) unless set here.
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    # Extra speculative_config keys, over every drafter's method/model/num_speculative_tokens and
    # draft_sample_method: probabilistic (standard speculative sampling; "greedy" is vLLM's own
    # default), the n-gram baseline's too (method/prompt_lookup_*; it has no draft_sample_method).
    speculative_config: dict[str, Any] = Field(default_factory=dict)
    measure_autoregressive: bool = True  # also run the target alone for the tokens/s baseline
    warmup_tokens: int = Field(8, ge=0)  # an untimed request first in each engine, as for the reference engine
    # Prompts per generate call. 1: batch 1, the paper's speed-up setting; more: the cell's
    # tokens/s (and speed-up) is a batch's, each prompt's counts still its own.
    batch_size: int = Field(1, ge=1)
    # This engine's subset; None: evaluate.temperatures. At T > 0 vLLM does standard speculative
    # sampling with draft_sample_method probabilistic (the default here); on CPU only with
    # draftalign's vLLM plugin installed (workers/vllm_plugin.py, vllm-project/vllm#55005).
    temperatures: list[float] | None = None
    drafters: list[str] | None = Field(None, min_length=1)  # this engine's subset by name; None: all
    # Environment variables of each engine's actor, as generate.engine.env: on a small CPU host
    # VLLM_CPU_NUM_OF_RESERVED_CPU=0 lets vLLM's worker use every core the actor has.
    env: dict[str, str] = Field(default_factory=dict)


def _default_eval_tasks() -> list[EvalTaskConfig]:
    return [EvalTaskConfig(name=k, kind=k) for k in ("open_ended", "summarize", "translate")]


class NgramEvalConfig(Strict):
    """The n-gram (prompt lookup) baseline drafter, the free drafter a user would try first: it
    proposes the tokens that followed an earlier occurrence of the sequence's last n tokens, in the
    prompt or the answer so far (vLLM's `method: ngram` rule; draftalign/evaluation/ngram.py). It has
    no weights: c = 0, so its MBSU is its τ."""

    # The shortest n-gram it looks up (vLLM's speculative_config key of the same name).
    prompt_lookup_min: int = Field(2, ge=1)
    # The longest; it tries the longest n first, and of its occurrences the earliest.
    prompt_lookup_max: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _check(self) -> NgramEvalConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} must be <= "
                             f"prompt_lookup_max={self.prompt_lookup_max}")
        return self


class EvaluateConfig(Strict):
    """Speculative-decoding evaluation of the pretrained and distilled drafters."""

    output: str  # filled from run.output when absent
    tasks: list[EvalTaskConfig] = Field(default_factory=_default_eval_tasks, min_length=1)
    # None: the pretrained drafter ("pretrained") plus every distilled drafter whose export
    # exists (named after its loss). A listed drafter that does not exist is an error.
    drafters: list[DrafterRef] | None = Field(None, min_length=1)
    engines: list[Literal["reference", "vllm"]] = Field(default_factory=lambda: ["reference"], min_length=1)
    gammas: list[Gamma] = Field(default_factory=lambda: [1, 3, 5], min_length=1)
    temperatures: list[Temperature] = Field(default_factory=lambda: [0.0, 1.0], min_length=1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_prompts: int = Field(50, ge=1)  # per task
    max_new_tokens: int = Field(128, ge=1)
    system_prompt: str | None = None
    seed: int = 0  # sampled runs seed each prompt from (seed, prompt id): reruns repeat them
    export_check: bool = True  # load every drafter as transformers' assistant_model first
    plots: bool = True
    reference: ReferenceEvalConfig = ReferenceEvalConfig()
    vllm: VllmEvalConfig = VllmEvalConfig()
    # The n-gram baseline, a row named `ngram` in every table, on every engine (an engine's own
    # `drafters` list keeps it only if it names `ngram`); null: no such row.
    ngram: NgramEvalConfig | None = NgramEvalConfig()

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if self.ngram is not None and any(d.name == "ngram" for d in self.drafters or []):
            raise ValueError("evaluate.drafters names a drafter `ngram`, the n-gram baseline's name: "
                             "rename it, or set evaluate.ngram=null")
        for engine in self.engines:
            if not self.engine_temperatures(engine):
                raise ValueError(f"evaluate.{engine}.temperatures {getattr(self, engine).temperatures} "
                                 f"has none of evaluate.temperatures {self.temperatures}")
        for what, names in (("task", [t.name for t in self.tasks]),
                            ("drafter", [d.name for d in self.drafters or []])):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names must be unique: {names}")
        return self


    def engine_drafters(self, engine: str, drafters: list[dict]) -> list[dict]:
        """The drafters (resolved, {"name", "path", ...}) `engine` runs: all, or those its own list names."""
        own = getattr(self, engine).drafters
        if own is None:
            return drafters
        names = [d["name"] for d in drafters]
        unknown = [n for n in own if n not in names]
        if unknown:
            raise ConfigError(f"evaluate.{engine}.drafters names {unknown}, which are not among this "
                              f"evaluation's drafters {names}")
        return [d for d in drafters if d["name"] in own]

    def engine_temperatures(self, engine: str) -> list[float]:
        """The temperatures `engine` runs: evaluate.temperatures, or those its own list keeps."""
        own = getattr(self, engine).temperatures
        return [t for t in self.temperatures if own is None or t in own]


class TrackingConfig(Strict):
    """Experiment tracking: the training stages' step and held-out metrics (rank 0, through Ray
    Train's integrations where Ray has one) and evaluate's summary (draftalign/training/tracking.py)."""

    backend: Literal["none", "tensorboard", "mlflow", "wandb"] = "none"
    # mlflow: the tracking URI (default: a local SQLite store, <run.output>/mlflow.db); tensorboard: the
    # event files' folder (default: <run.output>/tensorboard, a subfolder per job); wandb: unused
    # (W&B reads WANDB_API_KEY, WANDB_MODE=offline, ... from the environment).
    uri: str | None = None
    experiment: str | None = None  # the MLflow experiment or W&B project; default: run.name


class Config(Strict):
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    models: ModelsConfig = ModelsConfig()
    pretrain: PretrainConfig
    generate: GenerateConfig
    distill: DistillConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_outputs(cls, data: Any) -> Any:
        # Stage outputs default to folders under run.output so one run stays in one place.
        if not isinstance(data, dict):
            return data
        run = data.get("run") or {}
        root = run.get("output", RunConfig().output) if isinstance(run, dict) else RunConfig().output
        if not isinstance(root, str):
            # run.output itself fails validation with its key; the stages get a placeholder so
            # the error is that one line, not a TypeError here or four missing outputs.
            root = RunConfig().output
        data = dict(data)
        for stage in ("pretrain", "generate", "distill", "evaluate"):
            section = data.get(stage) or {}
            if isinstance(section, dict) and section.get("output") is None:
                data[stage] = {**section, "output": str(Path(root) / stage)}
        return data

    def target_path(self) -> str:
        return self.models.target or str(Path(self.pretrain.output) / "target" / "model")

    def draft_path(self) -> str:
        return self.models.draft or str(Path(self.pretrain.output) / "draft" / "model")

    def feature_path(self) -> str:
        """The feature drafter pretrain.jobs.feature builds."""
        return str(Path(self.pretrain.output) / "feature" / "model")

    def start_path(self, loss: LossConfig) -> str:
        """The drafter `loss` starts from: distill.init_from (the draft's), or its pretrain export."""
        if loss.drafter_kind == "feature":
            return self.feature_path()
        return self.distill.init_from or self.draft_path()

    def start_name(self) -> str:
        """The undistilled drafter's name in reports: "start" when it is cut from the target and
        not pretrained on a corpus (pretrain.jobs.draft with train: null), else "pretrained"."""
        job = None if self.models.draft else self.pretrain.jobs.get("draft")
        return "start" if job is not None and job.train is None else "pretrained"

    def distill_data_path(self) -> str:
        return self.distill.data or str(Path(self.generate.output) / "data")

    def generator_path(self) -> str:
        """The model the generate stage serves (generate.generator)."""
        g = self.generate.generator
        return self.target_path() if g == "target" else self.draft_path() if g == "draft" else g

    def distilled_path(self, loss: LossConfig) -> str:
        """The drafter distillation exports for `loss`: with on-policy rounds, the last round's."""
        if self.distill.on_policy.rounds:
            return self.round_paths(loss)[-1]
        return str(Path(self.distill.output) / self.distill.drafter_folder(loss) / "model")

    def round_dir(self, loss: LossConfig, r: int) -> Path:
        """Round r's folder for `loss`: its set in `set/`, its drafter in `model/`."""
        return Path(self.distill.output) / "rounds" / f"round-{r}" / self.distill.drafter_folder(loss)

    def round_paths(self, loss: LossConfig) -> list[str]:
        """Each on-policy round's drafter for `loss`, round 1 first ([] without rounds)."""
        return [str(self.round_dir(loss, r) / "model") for r in range(1, self.distill.on_policy.rounds + 1)]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ["a.b=3", "c=[x, y]"] into a nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form a.b=value")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key below the non-mapping {part!r}")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({detail}); "
                              "quote it for a plain string, e.g. a.b='[x'") from None
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, mapping by mapping; an empty mapping in `extra` replaces (so that
    `pretrain.jobs={}` can empty what the YAML lists)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and value and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{path}'")
        else:
            lines.append(f"config key '{path}': {e['msg']}")
    return "; ".join(lines)


def _read_yaml(p: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping; `extends: OTHER.yaml` (relative to the file) is read first and
    this file merged over it, so a variant states only what it changes."""
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if p.resolve() in chain:
        raise ConfigError(f"config file {str(p)!r} extends itself (through {', '.join(map(str, chain))})")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}: "
                          f"{exc.reason}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    data = dict(loaded or {})
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {str(p)!r}: extends must be a file name, not {base!r}")
    return deep_merge(_read_yaml(p.parent / base, (*chain, p.resolve())), data)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or nothing), apply overrides, validate once. Raises ConfigError."""
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    data.setdefault("pretrain", {})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
