"""deploy/: every manifest parses, the Serve config is the app's own (serve build), and
the RayJob / RayService / cluster-launcher entrypoints name commands that exist."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zhchat.cli import build_parser
from zhchat.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_parses(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


@pytest.mark.parametrize("path", sorted((DEPLOY / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_zhchat_configs_validate(path):
    load_config(path)


def test_serve_config_is_generated_from_the_app():
    r = subprocess.run([sys.executable, str(DEPLOY / "make_serve_config.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_serve_config_schema_and_import_path():
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(cfg)
    app = cfg["applications"][0]
    module, attr = app["import_path"].split(":")
    import importlib

    assert getattr(importlib.import_module(module), attr) is not None
    names = {d["name"] for d in app["deployments"]}
    assert names == {"ChatIngress", "ChatModel"}
    # the app config it names exists and validates, and its options are what serve.yaml says
    app_cfg = load_config(ROOT / app["runtime_env"]["env_vars"]["ZHCHAT_CONFIG"]).serve
    model = next(d for d in app["deployments"] if d["name"] == "ChatModel")
    assert model["autoscaling_config"]["max_replicas"] == app_cfg.max_replicas
    assert model["ray_actor_options"]["num_gpus"] == 1


def test_rayservice_embeds_serve_config():
    svc = yaml.safe_load((DEPLOY / "kuberay" / "rayservice-chat.yaml").read_text())
    assert svc["kind"] == "RayService"
    assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["readinessProbe"]["httpGet"]["path"] == "/-/healthz"
    workers = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert workers["maxReplicas"] > workers["minReplicas"] >= 1


def _zhchat_command(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    assert argv[0] == "zhchat", cmd
    return argv[1:]


def test_rayjob_entrypoint_is_a_zhchat_command():
    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob-train.yaml").read_text())
    assert job["kind"] == "RayJob"
    argv = _zhchat_command(job["spec"]["entrypoint"])
    args = build_parser().parse_args(argv)
    assert args.command == "run"
    # the mounted config is the one in deploy/configs
    assert (DEPLOY / "configs" / Path(args.config_file).name).exists()
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups)


def test_cluster_launcher_config_and_commands():
    cl = yaml.safe_load((DEPLOY / "cluster" / "gpu-cluster.yaml").read_text())
    types = cl["available_node_types"]
    assert cl["head_node_type"] in types
    assert any(t.get("max_workers", 0) > t.get("min_workers", 0) for t in types.values())
    text = (DEPLOY / "cluster" / "gpu-cluster.yaml").read_text()
    for line in text.splitlines():
        if "zhchat submit" in line:
            build_parser().parse_args(_zhchat_command(line.split("#", 1)[1].strip()))


def test_gpu_configs_state_gpu_use_and_bound_retries():
    """What a fresh autoscaling cluster needs stated: GPU use explicit ("auto" looks only at
    nodes already up), a finite max_failures (-1 retries a broken run forever), and a model
    replica whose batch can fill (Serve sends it max_ongoing_requests at most)."""
    run = load_config(DEPLOY / "configs" / "cluster-gpu.yaml")
    assert run.train.use_gpu == "yes" and run.eval.use_gpu == "yes" and run.serve.replica_gpus == 1
    assert 0 <= run.train.max_failures < 100
    for path in ("cluster-gpu.yaml", "serve-gpu.yaml"):
        serve = load_config(DEPLOY / "configs" / path).serve
        assert serve.replica_gpus != "auto", path
        assert serve.max_ongoing_requests == serve.max_batch_size, path
