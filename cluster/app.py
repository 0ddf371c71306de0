"""Build the Ray Serve application of an endpoint profile."""

from __future__ import annotations

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from .ingress import Ingress
from .profiles import EndpointProfile, bundled
from .replica import EngineReplica


def build_app(profile: EndpointProfile) -> Application:
    router = RequestRouterConfig(
        request_router_class="cluster.router:PrefixAwareRouter",
        request_router_kwargs={"mode": profile.router, "model_id": profile.model_name,
                               "replay_tokens": _replay_tokens(profile)},
        request_routing_stats_period_s=0.5,
    )
    engine = EngineReplica.options(num_replicas=profile.replicas, max_ongoing_requests=1000,
                                   request_router_config=router,
                                   ray_actor_options=_resources(profile)).bind(profile.model_dump())
    return Ingress.options(max_ongoing_requests=10000).bind(engine, profile.model_dump())


def _replay_tokens(profile: EndpointProfile) -> int:
    """Tokens a hit replays under the profile's window policy (0 when a boundary is restored)."""
    if profile.window_policy != "recompute":
        return 0
    from workers.loader import load_tokenizer

    cfg, _ = load_tokenizer(profile.model)
    return (cfg.sliding_window - 1) * cfg.num_hidden_layers


def _resources(profile: EndpointProfile) -> dict:
    return {"num_gpus": 1} if profile.device == "cuda" else {"num_cpus": 1}


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
