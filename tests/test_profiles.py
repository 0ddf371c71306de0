"""Endpoint profiles, and the Serve config files and KubeRay manifests in deploy/ built on them."""

import json
from pathlib import Path

import pytest
import yaml

from cluster.profiles import BUNDLED, EndpointProfile, ProfileError, bundled

DEPLOY = Path(__file__).parent.parent / "deploy"


def serve_apps(config: dict) -> list[dict]:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # what `serve deploy` / KubeRay accept
    return config["applications"]


def profile_of(args: dict) -> EndpointProfile:
    """The profile cluster.app:app_builder builds from a Serve config's args (bundled name + overrides)."""
    args = dict(args)
    return bundled(args.pop("profile"), **args)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_every_bundled_profile_validates_and_gives_serve_replica_options(name):
    p = bundled(name)
    opts = p.replica_options("engine")
    if p.autoscaling is None:
        assert opts == {"num_replicas": p.replicas}
    else:
        cfg = opts["autoscaling_config"]
        assert cfg["min_replicas"] <= cfg["initial_replicas"] <= cfg["max_replicas"]
        assert cfg["target_ongoing_requests"] == p.autoscaling.target_ongoing_requests


def test_autoscaling_per_group_maps_to_serve_autoscaling_configs():
    p = bundled("long-document", prefill_replicas=2, replicas=3,
                autoscaling={"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 16},
                prefill_autoscaling={"min_replicas": 4, "max_replicas": 8, "target_ongoing_requests": 2})
    decode, prefill = p.replica_options("engine")["autoscaling_config"], p.replica_options("prefill")["autoscaling_config"]
    assert (decode["min_replicas"], decode["initial_replicas"], decode["max_replicas"]) == (1, 3, 6)
    assert (prefill["min_replicas"], prefill["initial_replicas"], prefill["max_replicas"]) == (4, 4, 8)  # clamped up
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**decode), AutoscalingConfig(**prefill)  # Serve takes them as they are


@pytest.mark.parametrize("bad, fragment", [
    ({"prefill_autoscaling": {"max_replicas": 2}}, "needs a prefill group"),
    ({"autoscaling": {"min_replicas": 5, "max_replicas": 2}}, "below min_replicas"),
    ({"autoscaling": {"target_ongoing_requests": 0}}, "autoscaling.target_ongoing_requests"),
    ({"replicas": 0}, "replicas"),
    ({"window_policy": "keep_everything"}, "window_policy"),
])
def test_a_bad_profile_is_one_error_naming_the_key(bad, fragment):
    with pytest.raises(ProfileError, match=fragment):
        bundled("chat", **bad)


def test_a_profile_file_loads_and_a_bad_one_names_file_and_key(tmp_path):
    good = tmp_path / "agents.yaml"
    good.write_text("model: tiny\nprefill_replicas: 1\nprefill_autoscaling: {max_replicas: 3}\n")
    p = EndpointProfile.from_yaml(good)
    assert p.name == "agents" and p.replica_options("prefill")["autoscaling_config"]["max_replicas"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nmax_context: lots\n")
    with pytest.raises(ProfileError, match=r"bad.yaml: max_context"):
        EndpointProfile.from_yaml(bad)


@pytest.mark.parametrize("path", sorted((DEPLOY / "serve").glob("*.yaml")), ids=lambda p: p.name)
def test_serve_config_files_validate_and_build_the_application(path):
    from ray.serve import Application

    from cluster.app import app_builder

    for app in serve_apps(yaml.safe_load(path.read_text())):
        assert app["import_path"] == "cluster.app:app_builder"
        assert isinstance(app_builder(dict(app["args"])), Application)


@pytest.mark.parametrize("path", sorted((DEPLOY / "kuberay").glob("*.yaml")), ids=lambda p: p.name)
def test_kuberay_manifests_carry_a_valid_serve_config_whose_groups_fit_their_worker_groups(path):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["kind"] == "RayService"
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = {}
    for g in cluster["workerGroupSpecs"]:
        params = g["rayStartParams"]
        res = json.loads(json.loads(params["resources"])) if "resources" in params else {}
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(params["num-gpus"]) == int(limits["nvidia.com/gpu"]), g["groupName"]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        groups[g["groupName"]] = {**res, "GPU": int(params["num-gpus"])}
    for app in serve_apps(yaml.safe_load(manifest["spec"]["serveConfigV2"])):
        p = profile_of(app["args"])
        assert p.device == "cuda"
        # every replica's resources (one GPU + its group's custom resource) exist on some worker group
        for need in ([p.prefill_resources, p.decode_resources] if p.prefill_replicas else [{}]):
            fits = [n for n, have in groups.items() if have["GPU"] >= 1 and all(have.get(k, 0) >= v for k, v in need.items())]
            assert fits, (need, groups)
        for scaling, count in ((p.autoscaling, p.replicas), (p.prefill_autoscaling, p.prefill_replicas)):
            if scaling is not None and count:
                max_gpus = sum(have["GPU"] * g["maxReplicas"] for g, (n, have) in
                               zip(cluster["workerGroupSpecs"], groups.items()))
                assert scaling.max_replicas <= max_gpus


def exported_metric_names() -> set[str]:
    """The series names Prometheus sees for cluster/metrics.py's metrics (Ray prefixes `ray_`;
    counters gain `_total`, histograms `_bucket` / `_sum` / `_count`)."""
    import re

    source = (Path(__file__).parent.parent / "cluster" / "metrics.py").read_text()
    suffixes = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"]}
    return {f"ray_{name}{s}" for kind, name in re.findall(r'metrics\.(Counter|Gauge|Histogram)\(\s*"(\w+)"', source)
            for s in suffixes[kind]}


def test_the_grafana_dashboard_graphs_only_metrics_the_replicas_export():
    import re

    dash = json.loads((DEPLOY / "grafana" / "v4serve.json").read_text())
    used = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"\bray_v4serve_\w+", t["expr"])}
    exported = exported_metric_names()
    assert len(exported) >= 10 and used, (exported, used)  # the source was parsed at all
    assert used <= exported, used - exported
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_the_prometheus_config_keeps_ray_pods_only():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "scrape.yaml").read_text())
    [job] = cfg["scrape_configs"]
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keep and keep[0]["source_labels"] == ["__meta_kubernetes_pod_label_ray_io_is_ray_node"]
