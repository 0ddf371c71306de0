"""Endpoint profiles: a workload-specific serving configuration, validated at load, YAML-loadable.

A profile says which model to serve and how: context limit, chunked-prefill size, the prefix
cache's window policy, replica counts, admission limits. Bundled profiles cover the workloads our
users run; a YAML file can define others (same keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from workers.engine import EngineConfig


class ProfileError(ValueError):
    """A profile that cannot be served; the message names the key."""


class Autoscaling(BaseModel):
    """Ray Serve autoscaling of one replica group, on ongoing requests per replica: for a decode
    replica those are the requests in its batch, for a prefill replica the prompts it holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(300, ge=0)  # a replica's prefix cache is lost with it: scale down slowly

    @model_validator(mode="after")
    def _check(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self

    def serve_config(self, initial: int) -> dict:
        """Ray Serve's autoscaling_config, starting from `initial` replicas (clamped to the range)."""
        return {**self.model_dump(), "initial_replicas": min(max(initial, self.min_replicas), self.max_replicas)}


class EndpointProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    model: str = "tiny"  # preset name or checkpoint directory
    served_model_name: str | None = None  # the `model` clients send; defaults to `model`
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    reference_rounding: bool = True  # FP8/FP4 numerics of DeepSeek's reference; needed by the compact layout
    cache_layout: Literal["compact", "float"] = "compact"
    kv_budget_gib: float = Field(0.5, gt=0)
    max_context: int = Field(32768, ge=256)
    prefill_chunk: int = Field(512, ge=256)
    max_batch_tokens: int = Field(2048, ge=256)
    window_policy: Literal["full_store", "checkpoint", "recompute"] = "checkpoint"
    checkpoint_interval: int = Field(16, ge=1)
    replicas: int = Field(1, ge=1)  # engine replicas (decode replicas when prefill_replicas > 0)
    prefill_replicas: int = Field(0, ge=0)  # > 0: disaggregated prefill -> decode with state transfer
    local_prefill_max_tokens: int = Field(0, ge=0)  # shorter prompts are prefilled on the decode replica
    transfer_timeout_s: float = Field(30.0, gt=0)
    # extra Ray resources per group, to pin groups to node pools (e.g. {"prefill_node": 1})
    prefill_resources: dict[str, float] = {}
    decode_resources: dict[str, float] = {}
    router: Literal["prefix_aware", "round_robin", "least_loaded"] = "prefix_aware"
    # None: a fixed replica count (`replicas`, `prefill_replicas`); else Serve scales the group
    autoscaling: Autoscaling | None = None  # the engine group (decode group when disaggregated)
    prefill_autoscaling: Autoscaling | None = None
    max_running_per_replica: int = Field(16, ge=1)
    max_queued_per_replica: int = Field(64, ge=0)  # beyond this, new requests get 429
    default_max_tokens: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.cache_layout == "compact" and not self.reference_rounding:
            raise ValueError("cache_layout 'compact' needs reference_rounding: true")
        if self.prefill_chunk % 256:
            raise ValueError("prefill_chunk must be a multiple of 256")
        if self.prefill_autoscaling is not None and self.prefill_replicas == 0:
            raise ValueError("prefill_autoscaling needs a prefill group (prefill_replicas > 0)")
        return self

    def replica_options(self, group: str) -> dict:
        """Serve deployment options for the replica count of `group` ("engine" or "prefill")."""
        scaling, count = ((self.autoscaling, self.replicas) if group == "engine"
                          else (self.prefill_autoscaling, self.prefill_replicas))
        return {"num_replicas": count} if scaling is None else {"autoscaling_config": scaling.serve_config(count)}

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            budget_bytes=int(self.kv_budget_gib * 2**30), policy=self.window_policy,
            checkpoint_interval=self.checkpoint_interval, layout=self.cache_layout,
            max_requests=self.max_running_per_replica, max_batch_tokens=self.max_batch_tokens,
            prefill_chunk=self.prefill_chunk, max_model_len=self.max_context,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EndpointProfile":
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ProfileError(f"cannot read profile {path}: {e}") from None
        if not isinstance(raw, dict):
            raise ProfileError(f"profile {path} must be a mapping of keys to values")
        raw.setdefault("name", Path(path).stem)
        return cls.parse(raw, where=str(path))

    @classmethod
    def parse(cls, raw: dict, where: str = "profile") -> "EndpointProfile":
        try:
            return cls(**raw)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(map(str, err["loc"])) or "profile"
            raise ProfileError(f"{where}: {key}: {err['msg']}") from None


BUNDLED: dict[str, dict] = {
    # Long shared prefixes (repository context, tool schemas), many turns: keep checkpoints often.
    "coding-agent": dict(window_policy="checkpoint", checkpoint_interval=4, max_context=65536, prefill_chunk=1024),
    # Short prompts, decode-heavy: many concurrent requests, small chunks; traffic follows the day.
    "chat": dict(window_policy="full_store", max_context=8192, prefill_chunk=256, max_running_per_replica=32,
                 autoscaling=dict(min_replicas=1, max_replicas=8, target_ongoing_requests=24)),
    # One-shot very long prompts, little reuse: keep only compressed state.
    "long-document": dict(window_policy="recompute", max_context=262144, prefill_chunk=2048, max_batch_tokens=4096),
    # Throughput: large batches; scales to zero between jobs.
    "batch": dict(window_policy="recompute", max_running_per_replica=64, max_batch_tokens=8192, prefill_chunk=2048,
                  autoscaling=dict(min_replicas=0, max_replicas=8, target_ongoing_requests=48)),
}


def bundled(name: str, **overrides) -> EndpointProfile:
    if name not in BUNDLED:
        raise ProfileError(f"unknown profile {name!r}; bundled: {sorted(BUNDLED)}")
    return EndpointProfile.parse({"name": name, **BUNDLED[name], **overrides}, where=f"profile {name}")
