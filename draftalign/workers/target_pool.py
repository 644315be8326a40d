"""The target-logit worker pool: Ray actors holding the frozen target, streaming next-token
log-probs to a train worker.

Wire format, per request: only the positions the loss uses travel. For a batch with loss
mask [B, T] and N = mask.sum(), the reply holds ``logprobs`` [N, V] (full vocabulary, in
``wire_dtype``); for a drafter with a reduced vocabulary S, ``support_logprobs`` [N, V'] (p on S
only, V/V' times smaller: all its losses read; losses.SupportTargetLogprobs); or with ``top_k``:
``values`` [N, K] and ``indices`` [N, K] (int32), which the loss densifies with the tail mass
spread uniformly (see losses.densify_topk). For a feature drafter it also holds ``features``
[M, k·H] (``wire_dtype``): the target's hidden states at the drafter's k layers, at the M
attended positions (k·H·2 bytes a position in float16: 3,456 for SmolLM2 at three layers).

Guarantees: the client keeps every batch it sent until its reply arrives, in order, so a
batch is used once and never skipped. Ray restarts a dead actor (``max_restarts``) and
retries its pending calls (``max_task_retries``) on the new incarnation.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from draftalign.cluster.resources import target_actor
from draftalign.config import TargetPoolConfig
from draftalign.errors import DraftalignError
from draftalign.training.distillation import masked_logits, trim_padding
from draftalign.training.losses import on_support

_WIRE = {"float16": torch.float16, "float32": torch.float32}
# A micro-batch's input_ids, attention_mask and loss_mask (numpy from Ray Data, or torch tensors).
TokenBatch = dict[str, "np.ndarray | torch.Tensor"]
# Log-probs ("logprobs"; "support_logprobs" on a reduced draft vocabulary; or top-k "values" and
# "indices"), plus cached_rows, pid and compute_s on the way back.
Reply = dict[str, "np.ndarray | int | float"]


def load_target(path: str, precision: str, use_gpu: bool, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and use_gpu) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    if use_gpu and torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()


def _logits_and_features(model, ids: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor,
                         feature_layers: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [N, V] at the masked positions; with `feature_layers`, also the hidden states entering
    those decoder layers, concatenated, at every attended position [M, k·H] (a feature drafter's input)."""
    if not feature_layers:
        return masked_logits(model, ids, attn, mask), None
    out = model.get_decoder()(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    features = torch.cat([out.hidden_states[i] for i in feature_layers], dim=-1)[attn.bool()]
    return model.get_output_embeddings()(out.last_hidden_state[mask]), features


@torch.inference_mode()
def target_logprobs(model, batch: TokenBatch, top_k: int | None, wire_dtype: str,
                    support: Sequence[int] | None = None,
                    feature_layers: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Next-token log-probs of the target at the masked positions of a batch (see module doc).

    With `support` (a reduced draft vocabulary's ids [V']) only those columns go back, still
    normalised over the full vocabulary: every loss on such a drafter reads nothing else. With
    `feature_layers`, ``features`` [M, k·H] (wire_dtype) holds the target's hidden states entering
    those layers at the M attended positions (row-major), what a feature drafter reads.
    """
    device = next(model.parameters()).device
    # Arrays from Ray's object store are read-only; torch warns on wrapping them, so copy (ints, small).
    batch = trim_padding({k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask")})
    ids, attn, mask = (torch.tensor(batch[k], device=device) for k in ("input_ids", "attention_mask", "loss_mask"))
    mask = mask.bool()
    logits, features = _logits_and_features(model, ids, attn, mask, feature_layers)
    extra = {} if features is None else {"features": features.to(_WIRE[wire_dtype]).cpu().numpy()}
    return {**_logprob_reply(logits, top_k, wire_dtype, support), **extra}


def _logprob_reply(logits: torch.Tensor, top_k: int | None, wire_dtype: str,
                   support: Sequence[int] | None) -> dict[str, np.ndarray]:
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V], normalised in float32
    if support is not None:
        return {"support_logprobs": on_support(logp, support).to(_WIRE[wire_dtype]).cpu().numpy()}
    if top_k is None:
        # float16 keeps log-probs down to -65504; -inf (impossible tokens) stays -inf.
        return {"logprobs": logp.to(_WIRE[wire_dtype]).cpu().numpy()}
    values, indices = logp.topk(top_k, dim=-1)
    return {"values": values.to(_WIRE[wire_dtype]).cpu().numpy(),
            "indices": indices.to(torch.int32).cpu().numpy()}


class LogprobCache:
    """The target's reply for each sequence, memoised on local disk (target_pool.cache).

    A sequence is keyed by its tokens and loss mask, so another pass, or another loss trained on
    the same set, reads what the target computed once. A row's log-probs (keyed also by the wire
    format and draft vocabulary) and its features (keyed by the wire format and layers) are two
    `.npz` entries: a standalone drafter distilled after a feature drafter on the same set reads
    the log-probs that pass left. Each entry is written under a temporary name and renamed, so a
    killed actor never leaves a half entry.
    """

    def __init__(self, folder: str, cfg: TargetPoolConfig, support: Sequence[int] | None = None,
                 feature_layers: Sequence[int] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        salt = f"{cfg.top_k}-{cfg.wire_dtype}".encode()
        if support is not None:
            salt += b"-support-" + np.asarray(support, np.int64).tobytes()
        self.salts = {"logprobs": salt}
        if feature_layers:
            self.salts["features"] = f"features-{cfg.wire_dtype}-".encode() + np.asarray(feature_layers,
                                                                                       np.int64).tobytes()
        self.hits = 0

    def _path(self, group: str, ids: np.ndarray, mask: np.ndarray) -> Path:
        h = hashlib.sha256(self.salts[group] + np.ascontiguousarray(ids, np.int64).tobytes()
                           + np.ascontiguousarray(mask, np.int8).tobytes()).hexdigest()
        return self.folder / h[:2] / f"{h[2:]}.npz"

    def _load(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray] | None:
        """A row's entries of every group, or None unless all are cached."""
        row: dict[str, np.ndarray] = {}
        for group in self.salts:
            path = self._path(group, ids, mask)
            if not path.is_file():
                return None
            with np.load(path) as f:
                row.update({k: f[k] for k in f.files})
        return row

    def logprobs(self, compute, batch: TokenBatch) -> dict[str, np.ndarray]:
        """`compute(batch)`'s reply, computing only the rows that are not cached."""
        ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"]).astype(bool)
        rows = [self._load(ids[b], mask[b]) for b in range(len(ids))]
        missing = [b for b, r in enumerate(rows) if r is None]
        self.hits += len(ids) - len(missing)
        if missing:
            sub = {k: np.asarray(batch[k])[missing] for k in ("input_ids", "attention_mask", "loss_mask")}
            reply = compute(sub)
            # Log-probs come per masked position, features per attended one.
            ends = {"logprobs": np.cumsum(mask[missing].sum(axis=1)),
                    "features": np.cumsum(np.asarray(batch["attention_mask"])[missing].astype(bool).sum(axis=1))}
            for j, b in enumerate(missing):
                rows[b] = {}
                for group in self.salts:
                    e = ends[group]
                    part = {k: v[(e[j - 1] if j else 0):e[j]] for k, v in reply.items()
                            if (k == "features") == (group == "features")}
                    self._store(self._path(group, ids[b], mask[b]), part)
                    rows[b].update(part)
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    @staticmethod
    def _store(path: Path, row: dict[str, np.ndarray]) -> None:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **row)
        os.replace(tmp, path)


class TargetComputer:
    """batch -> reply: the target's log-probs, through the disk cache when there is one."""

    def __init__(self, model, cfg: TargetPoolConfig, cache_dir: str | None,
                 support: Sequence[int] | None = None, feature_layers: Sequence[int] | None = None) -> None:
        self.model, self.cfg, self.support, self.feature_layers = model, cfg, support, feature_layers
        self.cache = LogprobCache(cache_dir, cfg, support, feature_layers) if cache_dir else None

    def _compute(self, batch: TokenBatch) -> dict[str, np.ndarray]:
        return target_logprobs(self.model, batch, self.cfg.top_k, self.cfg.wire_dtype, self.support,
                               self.feature_layers)

    def __call__(self, batch: TokenBatch) -> Reply:
        """The reply, plus `cached_rows`: how many of the batch's rows came from the cache."""
        if self.cache is None:
            return {**self._compute(batch), "cached_rows": 0}
        before = self.cache.hits
        reply = self.cache.logprobs(self._compute, batch)
        return {**reply, "cached_rows": self.cache.hits - before}


class TargetActor:
    """One replica of the target; Ray restarts it when it dies (see TargetPool)."""

    def __init__(self, path: str, cfg: TargetPoolConfig, death_marker: str | None = None,
                 cache_dir: str | None = None, support: Sequence[int] | None = None,
                 feature_layers: Sequence[int] | None = None) -> None:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model = load_target(path, cfg.precision, cfg.use_gpu)
        self.cfg = cfg
        self.requests = 0
        self.death_marker = death_marker
        self.compute = TargetComputer(self.model, cfg, cache_dir, support, feature_layers)

    def logprobs(self, batch: TokenBatch) -> Reply:
        self.requests += 1
        if (self.death_marker and self.requests == self.cfg.inject_actor_death_at_request
                and not Path(self.death_marker).exists()):
            Path(self.death_marker).write_text(str(os.getpid()))  # once per run, not per incarnation
            os._exit(1)
        start = time.perf_counter()
        out = self.compute(batch)
        return {**out, "pid": os.getpid(), "compute_s": time.perf_counter() - start}


class PoolStats:
    """What the trainer reports: queue depth, wait, target throughput, restarts seen."""

    def __init__(self) -> None:
        self.requests = 0
        self.positions = 0
        self.cached_rows = 0  # rows served from target_pool.cache instead of the target
        self.compute_s = 0.0
        self.wait_s = 0.0
        self.queue_depth = 0
        self.restarts = 0

    def snapshot(self) -> dict[str, float]:
        return {"pool_requests": self.requests, "pool_queue_depth": self.queue_depth,
                "trainer_wait_s": round(self.wait_s, 3), "pool_restarts": self.restarts,
                "target_positions_per_s": self.positions / self.compute_s if self.compute_s else 0.0,
                "pool_cached_rows": self.cached_rows}

    def add(self, reply: Reply, compute_s: float) -> None:
        self.requests += 1
        self.compute_s += compute_s
        self.cached_rows += int(reply.get("cached_rows", 0))
        rows = next(reply[k] for k in ("logprobs", "support_logprobs", "values") if k in reply)
        self.positions += int(np.asarray(rows).shape[0])


class TargetPool:
    """Actors beside this train worker, fed round-robin, at most ``prefetch`` batches ahead."""

    def __init__(self, path: str, cfg: TargetPoolConfig, death_marker: str | None = None,
                 cache_dir: str | None = None, support: Sequence[int] | None = None,
                 feature_layers: Sequence[int] | None = None) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.cfg = cfg
        self.stats = PoolStats()
        node = ray.get_runtime_context().get_node_id()
        per = target_actor(cfg)
        actor_cls = ray.remote(TargetActor).options(
            num_cpus=per["CPU"], num_gpus=per.get("GPU", 0), resources=dict(cfg.resources),
            max_restarts=cfg.max_restarts, max_task_retries=cfg.max_restarts,
            # Beside the train worker: the log-probs are the largest thing on the wire.
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=True))
        self.actors = [actor_cls.remote(path, cfg, death_marker, cache_dir, support, feature_layers)
                       for _ in range(cfg.actors)]
        self._next = 0
        self._pids: dict[int, int] = {}

    def _submit(self, batch: TokenBatch):
        i = self._next
        self._next = (self._next + 1) % len(self.actors)
        payload = {k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask")}
        return i, self.actors[i].logprobs.remote(payload)

    def _resolve(self, i: int, ref) -> Reply:
        import ray
        from ray.exceptions import RayActorError

        start = time.perf_counter()
        try:
            out = ray.get(ref)
        except RayActorError as exc:
            raise DraftalignError(f"target-pool actor {i} died more than target_pool.max_restarts="
                                  f"{self.cfg.max_restarts} times; last error: {exc}") from exc
        self.stats.wait_s += time.perf_counter() - start
        if self._pids.get(i, out["pid"]) != out["pid"]:
            self.stats.restarts += 1
        self._pids[i] = out["pid"]
        self.stats.add(out, out["compute_s"])
        return out

    def stream(self, items: Iterable[tuple[Any, TokenBatch]]) -> Iterator[tuple[Any, dict, dict]]:
        """(tag, batch) in -> (tag, batch, target reply) out, in order, up to `prefetch` ahead."""
        pending: deque = deque()
        for tag, batch in items:
            pending.append((tag, batch, *self._submit(batch)))
            if len(pending) > self.cfg.prefetch:
                yield self._next_reply(pending)
        while pending:
            yield self._next_reply(pending)

    def _next_reply(self, pending: deque) -> tuple[Any, dict, dict]:
        tag, batch, i, ref = pending.popleft()
        self.stats.queue_depth = len(pending)
        return tag, batch, self._resolve(i, ref)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)


class LocalTarget:
    """The baseline: the same target computed inside the train worker, no pipelining."""

    def __init__(self, path: str, cfg: TargetPoolConfig, cache_dir: str | None = None,
                 support: Sequence[int] | None = None, feature_layers: Sequence[int] | None = None) -> None:
        self.model = load_target(path, cfg.precision, cfg.use_gpu)
        self.cfg = cfg
        self.stats = PoolStats()
        self.compute = TargetComputer(self.model, cfg, cache_dir, support, feature_layers)

    def stream(self, items: Iterable[tuple[Any, TokenBatch]]) -> Iterator[tuple[Any, dict, dict]]:
        for tag, batch in items:
            start = time.perf_counter()
            out = self.compute(batch)
            took = time.perf_counter() - start
            self.stats.add(out, took)
            self.stats.wait_s += took  # the trainer waits for all of it
            yield tag, batch, out

    def shutdown(self) -> None:
        pass
