"""Prometheus metrics of an endpoint, through Ray's metrics API.

Ray exports them on every node's metrics port with a `ray_` prefix (scraped by the Prometheus of
a KubeRay cluster like Ray's own metrics). Tagged by deployment and replica, so one dashboard
shows the prefill and decode groups of every endpoint side by side.
"""

from __future__ import annotations

from ray.util import metrics

TTFT_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
TRANSFER_BOUNDARIES_S = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30]
REPLICA_TAGS = ("deployment", "replica")


class ReplicaMetrics:
    """One engine replica: requests and tokens, its batch and free pages, the state it ships."""

    def __init__(self, deployment: str, replica: str):
        self.tags = {"deployment": deployment, "replica": replica}
        self.requests = metrics.Counter("v4serve_requests_finished", "Requests finished, by finish reason",
                                        tag_keys=REPLICA_TAGS + ("reason",))
        self.prompt_tokens = metrics.Counter("v4serve_prompt_tokens", "Prompt tokens of finished requests",
                                             tag_keys=REPLICA_TAGS)
        self.cached_tokens = metrics.Counter("v4serve_cached_prompt_tokens",
                                             "Prompt tokens of finished requests served from the prefix cache",
                                             tag_keys=REPLICA_TAGS)
        self.output_tokens = metrics.Counter("v4serve_output_tokens", "Tokens generated", tag_keys=REPLICA_TAGS)
        self.running = metrics.Gauge("v4serve_running_requests", "Requests in the running batch", tag_keys=REPLICA_TAGS)
        self.waiting = metrics.Gauge("v4serve_waiting_requests", "Requests queued for admission", tag_keys=REPLICA_TAGS)
        self.free_blocks = metrics.Gauge("v4serve_kv_free_blocks", "Free 256-token blocks of compressed state",
                                         tag_keys=REPLICA_TAGS)
        self.blocks = metrics.Gauge("v4serve_kv_blocks", "256-token blocks of compressed state", tag_keys=REPLICA_TAGS)
        self.transfer_bytes = metrics.Counter("v4serve_kv_transfer_bytes", "State bytes sent to decode replicas",
                                              tag_keys=REPLICA_TAGS)
        self.transfer_tail_s = metrics.Histogram(
            "v4serve_kv_transfer_tail_seconds", "From a prefill's first token to its state complete on the decode side",
            boundaries=TRANSFER_BOUNDARIES_S, tag_keys=REPLICA_TAGS)
        self.transfer_failures = metrics.Counter("v4serve_kv_transfer_failures", "State transfers that failed",
                                                 tag_keys=REPLICA_TAGS)

    def finished(self, out: dict) -> None:
        """A request's last output (a RequestOutput as a dict)."""
        self.requests.inc(1, tags={**self.tags, "reason": out["finish_reason"] or "none"})
        _add(self.prompt_tokens, out["prompt_tokens"], self.tags)
        _add(self.cached_tokens, out["cached_tokens"], self.tags)
        _add(self.output_tokens, out["output_tokens"], self.tags)

    def load(self, load: dict) -> None:
        """The engine's load (AsyncEngine.load), sampled periodically."""
        self.running.set(load["running"], tags=self.tags)
        self.waiting.set(load["waiting"], tags=self.tags)
        self.free_blocks.set(load["free_blocks"], tags=self.tags)
        self.blocks.set(load["blocks"], tags=self.tags)

    def transferred(self, nbytes: int, tail_s: float) -> None:
        _add(self.transfer_bytes, nbytes, self.tags)
        self.transfer_tail_s.observe(tail_s, tags=self.tags)

    def transfer_failed(self) -> None:
        self.transfer_failures.inc(1, tags=self.tags)


class IngressMetrics:
    """The HTTP front: time to first token as clients see it, and refusals by status."""

    def __init__(self, model: str):
        self.tags = {"model": model}
        self.ttft_s = metrics.Histogram("v4serve_time_to_first_token_seconds",
                                        "From a request's arrival to its first token leaving the ingress",
                                        boundaries=TTFT_BOUNDARIES_S, tag_keys=("model",))
        self.errors = metrics.Counter("v4serve_request_errors", "Requests refused or failed, by HTTP status",
                                      tag_keys=("model", "status"))

    def first_token(self, seconds: float) -> None:
        self.ttft_s.observe(seconds, tags=self.tags)

    def error(self, status: int) -> None:
        self.errors.inc(1, tags={**self.tags, "status": str(status)})


def _add(counter: metrics.Counter, value: float, tags: dict) -> None:
    if value > 0:  # Ray's counters refuse a zero increment
        counter.inc(value, tags=tags)
