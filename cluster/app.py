"""Build the Ray Serve application of an endpoint profile."""

from __future__ import annotations

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from .ingress import Ingress
from .profiles import EndpointProfile, bundled
from .replica import EngineReplica


# The ingress parses, tokenizes and relays: it reserves no logical CPU, so it never waits behind the
# engine replicas for one (and a small host runs a whole disaggregated app).
INGRESS_OPTIONS = {"max_ongoing_requests": 10000, "ray_actor_options": {"num_cpus": 0}}


def build_app(profile: EndpointProfile) -> Application:
    """Aggregated (engine replicas prefill and decode) or, with prefill_replicas > 0, a prefill
    group routed by prefix and a decode group routed by load, the state moving between them."""
    def router(mode: str) -> RequestRouterConfig:
        return RequestRouterConfig(
            request_router_class="cluster.router:PrefixAwareRouter",
            request_router_kwargs={"mode": mode, "model_id": profile.model_name, "replay_tokens": _replay_tokens(profile)},
            request_routing_stats_period_s=0.5,
        )

    args = profile.model_dump()
    if profile.prefill_replicas == 0:
        engine = EngineReplica.options(**profile.replica_options("engine"), max_ongoing_requests=1000,
                                       request_router_config=router(profile.router),
                                       ray_actor_options=_resources(profile)).bind(args)
        return Ingress.options(**INGRESS_OPTIONS).bind(engine, args)
    decode = EngineReplica.options(name="DecodeReplica", **profile.replica_options("engine"), max_ongoing_requests=1000,
                                   request_router_config=router("decode_capacity"),
                                   ray_actor_options=_resources(profile, profile.decode_resources)).bind(args)
    prefill = EngineReplica.options(name="PrefillReplica", **profile.replica_options("prefill"),
                                    max_ongoing_requests=1000, request_router_config=router(profile.router),
                                    ray_actor_options=_resources(profile, profile.prefill_resources)).bind(args, decode)
    return Ingress.options(**INGRESS_OPTIONS).bind(decode, args, prefill)


def _replay_tokens(profile: EndpointProfile) -> int:
    """Tokens a hit replays under the profile's window policy (0 when a boundary is restored)."""
    if profile.window_policy != "recompute":
        return 0
    from workers.loader import load_tokenizer

    cfg, _ = load_tokenizer(profile.model)
    return (cfg.sliding_window - 1) * cfg.num_hidden_layers


def _resources(profile: EndpointProfile, extra: dict[str, float] | None = None) -> dict:
    opts = {"num_gpus": 1} if profile.device == "cuda" else {"num_cpus": 1}
    if extra:
        opts["resources"] = dict(extra)
    return opts


def app_builder(args: dict) -> Application:
    """For `serve run cluster.app:app_builder profile=chat` and Serve config files: `profile` names a
    bundled profile or a YAML file; other keys override profile fields."""
    args = dict(args)
    name = args.pop("profile", "chat")
    if name.endswith((".yaml", ".yml")):
        profile = EndpointProfile.from_yaml(name)
        profile = EndpointProfile.parse({**profile.model_dump(), **args})
    else:
        profile = bundled(name, **args)
    return build_app(profile)
