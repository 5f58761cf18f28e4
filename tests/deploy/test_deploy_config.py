"""The deploy files checked against the code: docker-compose.yml, deploy/k8s, Prometheus, Grafana,
the Dockerfile and the job scripts.

No Docker engine or cluster here, so nothing is started: every command is parsed with the real
argparse parser of its `iat` subcommand, every env var must be a `Settings` field (or listed
below with its reason), ports are derived from `Settings` with that environment, probes must hit
routes of `services.health.health_router`, and dashboard queries must name exported metrics.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from pydantic import AliasChoices

from services import metrics
from services.cli import COMMANDS
from services.cli.serve import SERVICES
from services.config import Settings
from services.health import health_router

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "deploy" / "k8s"
DOCKERFILE = "deploy/Dockerfile"

# Variables the deploy files set that are not Settings fields, and why they exist.
DOCUMENTED_ENV = {
    "REDIS_PASSWORD": "k8s: from the Secret, interpolated into REDIS_URL as $(REDIS_PASSWORD)",
    "SOURCE_URL": "compose seed job: where deploy/jobs/seed.sh posts the instances",
    "IAT_SOURCE_URL": "loadtests/locustfile.py: where the ingest user posts (not a service setting)",
}
HEALTH_PATHS = {route.path for route in health_router({}).routes}


def load_yaml(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


COMPOSE = load_yaml(REPO / "docker-compose.yml")[0]
K8S = [doc for path in sorted(K8S_DIR.glob("*.yaml")) for doc in load_yaml(path)]


def k8s(kind: str) -> list[dict]:
    return [doc for doc in K8S if doc["kind"] == kind]


# --- what the code accepts --------------------------------------------------------------

def settings_env_names() -> set[str]:
    """Every env var Settings reads: IAT_<FIELD>, or the field's aliases (REDIS_URL)."""
    prefix = Settings.model_config["env_prefix"]
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {choice.upper() for choice in alias.choices if isinstance(choice, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add((prefix + name).upper())
    return names


def settings_with(env: dict[str, str]) -> Settings:
    """The Settings a process gets with exactly this environment (validates the values too)."""
    with mock.patch.dict(os.environ, {k: str(v) for k, v in env.items()}, clear=True):
        return Settings()


def parse_iat(argv: list[str]) -> argparse.Namespace:
    """Parse `iat <command> ...` with that command's own parser; a bad flag fails the test."""
    assert argv[0] == "iat" and len(argv) > 1, argv
    assert argv[1] in COMMANDS, f"`iat {argv[1]}` is not a command (have {sorted(COMMANDS)})"
    module = importlib.import_module(COMMANDS[argv[1]][0])
    # allow_abbrev=False: a flag that only works as a prefix of another breaks when flags are added.
    parser = argparse.ArgumentParser(prog=f"iat {argv[1]}", exit_on_error=False, allow_abbrev=False)
    module.add_arguments(parser)
    try:
        return parser.parse_args(argv[2:])
    except (argparse.ArgumentError, SystemExit) as exc:
        pytest.fail(f"{shlex.join(argv)}: rejected by the parser: {exc}")


def parse_seed(argv: list[str]) -> argparse.Namespace:
    spec = importlib.util.spec_from_file_location("deploy_seed", REPO / "deploy" / "seed.py")
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    parser = argparse.ArgumentParser(prog="seed", exit_on_error=False, allow_abbrev=False)
    seed.add_arguments(parser)
    try:
        return parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        pytest.fail(f"deploy/seed.py {shlex.join(argv)}: rejected by the parser: {exc}")


def exported_metric_names() -> set[str]:
    """Series names Prometheus sees: a Counter `x` exports `x_total`, a Histogram `x_bucket` etc."""
    suffixes = {"counter": ["_total", "_created"], "gauge": [""],
                "histogram": ["_bucket", "_count", "_sum", "_created"], "summary": ["", "_count", "_sum"]}
    names = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names |= {family.name + s for s in suffixes[family.type]}
    return names


def shell_invocations(script: Path) -> list[list[str]]:
    """The simple commands of a (line-oriented) sh script, with `if ...; then` syntax split off."""
    commands = []
    for line in script.read_text().splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        segment: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|", "&"):
                while segment and segment[0] in ("if", "then", "else", "elif", "do", "!"):
                    segment.pop(0)
                if segment:
                    commands.append(segment)
                segment = []
            else:
                segment.append(token)
    return commands


# --- docker compose ---------------------------------------------------------------------

def image_services() -> dict[str, dict]:
    """Compose services built from our Dockerfile (the only ones running our code)."""
    return {name: svc for name, svc in COMPOSE["services"].items()
            if svc.get("build", {}).get("dockerfile") == DOCKERFILE}


def served(svc: dict) -> tuple[str, argparse.Namespace] | None:
    command = svc.get("command", [])
    if command[:2] == ["iat", "serve"]:
        return command[2], parse_iat(command)
    return None


def service_ports(args: argparse.Namespace, settings: Settings) -> dict[str, int]:
    """The ports `iat serve` will bind with these flags and settings."""
    http = args.port if args.port is not None else getattr(settings, SERVICES[args.service][1])
    ports = {"http": http}
    if args.service == "ranking":
        ports["grpc"] = args.grpc_port if args.grpc_port is not None else settings.ranking_grpc_port
    return ports


def compose_ports(name: str) -> dict[str, int]:
    svc = COMPOSE["services"][name]
    return service_ports(served(svc)[1], settings_with(svc.get("environment", {})))


def split_volume(volume: str) -> list[str]:
    """Compose short syntax SOURCE:TARGET[:MODE]; a `${VAR:-default}` source keeps its colon."""
    protected = re.sub(r"\$\{[^}]*\}", lambda m: m.group(0).replace(":", "\0"), str(volume))
    return [part.replace("\0", ":") for part in protected.split(":")]


SERVED = {name: served(svc)[0] for name, svc in image_services().items() if served(svc)}


def test_compose_runs_every_service_and_the_jobs():
    assert sorted(SERVED.values()) == sorted(SERVICES), SERVED
    assert {"redis", "train", "seed", "prometheus", "grafana", "locust"} <= set(COMPOSE["services"])


def test_compose_env_vars_are_settings_or_documented():
    allowed = settings_env_names() | set(DOCUMENTED_ENV)
    for name, svc in image_services().items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{name}: environment must be a mapping"
        unknown = set(env) - allowed
        assert not unknown, f"compose {name}: {sorted(unknown)} are not Settings fields nor documented"
        settings = settings_with(env)  # values must validate
        if name in SERVED:
            assert settings.host == "0.0.0.0", f"{name}: must bind every interface in a container"


@pytest.mark.parametrize("name", sorted(SERVED))
def test_compose_ports_and_healthchecks_match_settings(name):
    svc = COMPOSE["services"][name]
    ports = compose_ports(name)
    published = {int(str(p).split(":")[-1]) for p in svc.get("ports", [])}
    assert published == set(ports.values()), f"{name}: publishes {published}, serves {ports}"
    urls = re.findall(r"http://[^'\"\s]+", " ".join(svc["healthcheck"]["test"]))
    assert len(urls) == 1, f"{name}: healthcheck should probe one URL, got {urls}"
    url = urlparse(urls[0])
    assert url.hostname in ("127.0.0.1", "localhost") and url.port == ports["http"], urls[0]
    assert url.path in HEALTH_PATHS, f"{name}: healthcheck probes {url.path}, routes are {HEALTH_PATHS}"


def test_health_router_has_the_probed_endpoints():
    assert {"/healthz", "/readyz", "/metrics"} <= HEALTH_PATHS


def test_compose_start_up_order_follows_health():
    services = COMPOSE["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} health, {dep} has no healthcheck"
            if cond["condition"] == "service_completed_successfully":
                assert "healthcheck" not in services[dep] and dep in ("train", "seed"), dep
    for name in SERVED:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("ranking", "source"):  # they load models at start-up
        assert services[name]["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert services["seed"]["depends_on"]["source"]["condition"] == "service_healthy"
    assert services["seed"]["depends_on"]["sequencer"]["condition"] == "service_healthy"


def test_compose_models_volume_and_read_only_data():
    services = COMPOSE["services"]
    assert "models" in COMPOSE["volumes"]

    def mounts(name):
        return [split_volume(v) for v in services[name].get("volumes", [])]

    for name in ("ranking", "source", "train"):
        model_dir = str(settings_with(services[name]["environment"]).model_dir)
        assert ["models", model_dir] == mounts(name)[[m[0] for m in mounts(name)].index("models")][:2], name
    for name in ("train", "seed"):
        data = [m for m in mounts(name) if "shared/data" in m[0]]
        assert len(data) == 1, f"{name}: mounts the data directory once"
        assert data[0][-2:] == [str(settings_with(services[name]["environment"]).data_dir), "ro"], data


@pytest.mark.parametrize("name", ["train", "seed"])
def test_compose_job_scripts_parse_and_see_their_env(name):
    svc = COMPOSE["services"][name]
    assert svc["command"][0] == "sh"
    script = REPO / svc["command"][1]
    assert script.is_file(), script
    commands = shell_invocations(script)
    checked = 0
    for argv in commands:
        if argv[0] == "iat":
            parse_iat(argv)
            checked += 1
        elif argv[:2] == ["python", "deploy/seed.py"]:
            parse_seed(argv[2:])
            checked += 1
    assert checked >= 2, f"{script}: expected iat/seed invocations, found {commands}"
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", script.read_text()))
    missing = used - set(svc["environment"])
    assert not missing, f"{script} reads {sorted(missing)}, not set for compose service {name}"
    assert used <= settings_env_names() | set(DOCUMENTED_ENV), used


def test_seed_targets_the_source_service():
    url = urlparse(COMPOSE["services"]["seed"]["environment"]["SOURCE_URL"])
    assert SERVED.get(url.hostname) == "source" and url.port == compose_ports(url.hostname)["http"]


def test_locust_command_and_target():
    svc = COMPOSE["services"]["locust"]
    argv = svc["command"]
    assert argv[0] == "locust"
    # locust's own parser, in a subprocess: importing locust monkey-patches sockets (gevent).
    check = ("import sys; from locust.argument_parser import get_parser; "
             "a = get_parser().parse_args(sys.argv[1:]); print(a.locustfile, a.host, a.web_port)")
    done = subprocess.run([sys.executable, "-c", check, *argv[1:]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    locustfile, host, web_port = done.stdout.split()
    url = urlparse(host)
    assert SERVED.get(url.hostname) == "ranking" and url.port == compose_ports("ranking")["http"], host
    assert any(str(p).endswith(f":{web_port}") for p in svc["ports"])
    if not (REPO / locustfile).is_file():
        pytest.skip(f"{locustfile} not written yet (everything else checked)")


def test_prometheus_scrapes_every_service_metrics_endpoint():
    config = load_yaml(REPO / "deploy" / "prometheus" / "prometheus.yml")[0]
    scraped = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") in HEALTH_PATHS
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in SERVED, f"{target}: not a compose service running `iat serve`"
                assert int(port) == compose_ports(host)["http"], f"{target}: {host} serves HTTP on {compose_ports(host)}"
                scraped.add(host)
    assert scraped == set(SERVED)
    mount = "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert mount in COMPOSE["services"]["prometheus"]["volumes"]


def test_compose_bind_mounts_exist():
    for name, svc in COMPOSE["services"].items():
        for volume in svc.get("volumes", []):
            source = split_volume(volume)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"


def test_gpu_override_reserves_a_gpu_for_ranking():
    override = load_yaml(REPO / "deploy" / "compose.gpu.yml")[0]
    ranking = override["services"]["ranking"]
    devices = ranking["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert ranking["build"]["dockerfile"] == DOCKERFILE and "cu" in ranking["build"]["args"]["TORCH_INDEX_URL"]
    assert set(ranking["environment"]) <= settings_env_names()
    assert settings_with(ranking["environment"]).device == "cuda"


# --- Grafana ----------------------------------------------------------------------------

def test_exported_metric_names_follow_prometheus_suffixes():
    names = exported_metric_names()
    assert "iat_ranking_degraded_total" in names and "iat_ranking_degraded" not in names
    assert {"iat_ranking_stage_seconds_bucket", "iat_ranking_stage_seconds_count", "iat_stream_lag"} <= names
    assert "iat_ranking_stage_seconds" not in names


def test_dashboard_queries_name_real_metrics():
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "iat.json").read_text())
    exported = exported_metric_names()
    datasource = load_yaml(REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0]
    uids = {d["uid"] for d in datasource["datasources"]}
    used = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b(iat_[a-z0-9_]+)\b", target["expr"]))
            assert names, f"{panel['title']}: query reads no iat metric"
            unknown = names - exported
            assert not unknown, f"{panel['title']}: {sorted(unknown)} not exported by services.metrics"
            for name in names:  # quantiles over buckets, rates over counters
                if name.endswith("_bucket"):
                    assert "histogram_quantile" in target["expr"], target["expr"]
                if name.endswith("_total"):
                    assert re.search(r"\b(rate|increase)\(" + name, target["expr"]), target["expr"]
            used |= names
    # What the issue asks the dashboard to show.
    for required in ("iat_ranking_stage_seconds_bucket", "iat_ranking_request_seconds_count",
                     "iat_ranking_history_length_bucket", "iat_stream_lag", "iat_ranking_degraded_total"):
        assert required in used, required


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    provider = load_yaml(REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "iat.yml")[0]
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in COMPOSE["services"]["grafana"]["volumes"]


# --- Dockerfile -------------------------------------------------------------------------

def test_dockerfile_copies_existing_files_not_ignored():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = []
    for line in (REPO / DOCKERFILE).read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("COPY", "ADD") and not any(p.startswith("--from") for p in parts):
            copies.append(parts)
            for source in parts[1:-1]:
                if source.startswith("--"):
                    continue
                assert list(REPO.glob(source.rstrip("/"))), f"{DOCKERFILE}: COPY {source}: no such file"
                assert not any(fnmatch.fnmatch(source.rstrip("/"), pat) for pat in ignored), source
    copied = " ".join(" ".join(parts[1:-1]) for parts in copies)
    for svc in image_services().values():  # scripts the compose jobs run are in the image
        if svc["command"][0] == "sh":
            assert str(Path(svc["command"][1]).parent) in copied, svc["command"]
    assert "deploy/seed.py" in copied
    text = (REPO / DOCKERFILE).read_text()
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text and "-c constraints.txt" in text


# --- Kubernetes -------------------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")[0]
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def container_env(container: dict) -> dict[str, str]:
    """The container's environment as the process sees it (ConfigMaps expanded)."""
    configmaps = {c["metadata"]["name"]: c["data"] for c in k8s("ConfigMap")}
    secrets = {s["metadata"]["name"]: s.get("stringData", s.get("data", {})) for s in k8s("Secret")}
    env = {}
    for source in container.get("envFrom", []):
        env |= configmaps[source["configMapRef"]["name"]]
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in secrets[ref["name"]], f"secret {ref['name']} has no key {ref['key']}"
        env[var["name"]] = var.get("value", "from-k8s")
    return env


DEPLOYMENTS = {d["metadata"]["name"]: d for d in k8s("Deployment")}


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_k8s_deployment_matches_the_code(name):
    deployment = DEPLOYMENTS[name]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = parse_iat(container["command"])
    env = container_env(container)
    unknown = set(env) - settings_env_names() - set(DOCUMENTED_ENV)
    assert not unknown, f"{name}: {sorted(unknown)} are not Settings fields nor documented"
    settings = settings_with(env)
    assert settings.host == "0.0.0.0" and settings.redis_url.endswith("@iat-redis-cluster:6379/0")
    assert "$(REDIS_PASSWORD)" in settings.redis_url and "REDIS_PASSWORD" in env  # defined, so k8s expands it
    ports = service_ports(args, settings)
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == ports, f"{name}: container ports {named}, `iat serve {args.service}` binds {ports}"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["path"] in HEALTH_PATHS
        assert named.get(get["port"], get["port"]) == ports["http"], f"{name}: {probe} port"
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] in HEALTH_PATHS
    assert int(notes["prometheus.io/port"]) == ports["http"]
    claims = {c["metadata"]["name"] for c in k8s("PersistentVolumeClaim")}
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    if args.service in ("ranking", "source"):
        (mount,) = container["volumeMounts"]
        assert mount["mountPath"] == str(settings.model_dir) and mount["readOnly"]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] in claims
    # Services route to named ports of this pod.
    selector = deployment["spec"]["selector"]["matchLabels"]
    services = [s for s in k8s("Service") if s["spec"]["selector"] == selector]
    assert services, f"{name}: no Service selects it"
    for port in services[0]["spec"]["ports"]:
        assert named.get(port["targetPort"], port["targetPort"]) in ports.values(), port


def model_workers(service: str, settings: Settings) -> int:
    """Threads of a service that run model forwards side by side."""
    from services.source.main import MODEL_WORKERS
    return {"ranking": settings.model_threads, "source": MODEL_WORKERS}[service]


def cpu_quantity(value) -> float:
    value = str(value)
    return int(value[:-1]) / 1000 if value.endswith("m") else float(value)


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_k8s_torch_threads_fill_the_cpu_limit_without_oversubscribing(name):
    """Every model worker's intra-op team, all together, is exactly the pod's CPU limit: fewer
    leaves paid CPUs idle, more gets the pod throttled by its quota."""
    import math

    from services.cpus import intra_op_threads
    (container,) = DEPLOYMENTS[name]["spec"]["template"]["spec"]["containers"]
    service = parse_iat(container["command"]).service
    if service not in ("ranking", "source"):
        return  # runs no model
    settings = settings_with(container_env(container))
    limit = container["resources"].get("limits", {}).get("cpu")
    assert limit is not None, f"{name}: a model service needs a CPU limit (its threads are sized from it)"
    cpus = math.floor(cpu_quantity(limit))
    workers = model_workers(service, settings)
    threads = intra_op_threads(settings.torch_threads, workers, cpus)
    assert threads * workers == cpus, f"{name}: {workers} workers x {threads} threads, CPU limit {limit}"
    assert cpu_quantity(container["resources"]["requests"]["cpu"]) == cpu_quantity(limit)


def test_compose_model_services_set_their_torch_threads():
    """No compose service has a CPU limit, so auto (0) would size every team from the host's
    CPUs: the model services get an explicit count instead."""
    for name, service in SERVED.items():
        if service in ("ranking", "source"):
            svc = COMPOSE["services"][name]
            settings = settings_with(svc["environment"])
            assert settings.torch_threads > 0, f"compose {name}: IAT_TORCH_THREADS unset (auto = the host's CPUs)"


def test_k8s_every_service_deployed_and_ranking_autoscaled():
    served_k8s = sorted(parse_iat(d["spec"]["template"]["spec"]["containers"][0]["command"]).service
                        for d in DEPLOYMENTS.values())
    assert served_k8s == sorted(SERVICES)
    (hpa,) = k8s("HorizontalPodAutoscaler")
    target = DEPLOYMENTS[hpa["spec"]["scaleTargetRef"]["name"]]
    assert parse_iat(target["spec"]["template"]["spec"]["containers"][0]["command"]).service == "ranking"
    kinds = {m["type"] for m in hpa["spec"]["metrics"]}
    assert {"Resource", "Pods"} <= kinds  # CPU and latency
    assert "redis-cluster" in (K8S_DIR / "README.md").read_text()


# --- the seed job's data ----------------------------------------------------------------

def test_seed_instances_are_valid_requests_with_the_loaders_ins_ids(tmp_path):
    from models.data import load_dataset
    from models.featurizer import FeatureSpec, Featurizer
    from models.hashing import ins_id
    from models.schema import DatasetSchema
    from models.synthetic import write_synthetic
    from services.source.protocol import IngestRequest

    spec = importlib.util.spec_from_file_location("deploy_seed", REPO / "deploy" / "seed.py")
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    schema_path = write_synthetic(tmp_path, n_users=20, events_per_user=10)
    schema = DatasetSchema.from_toml(schema_path)
    instances = seed.raw_instances(schema, tmp_path)
    data = load_dataset(schema, tmp_path)
    assert len(instances) == data.n
    assert [i["timestamp_ms"] for i in instances] == sorted(i["timestamp_ms"] for i in instances)
    # Same InsIDs as training: the store then holds the embeddings training saw.
    assert {ins_id(i["request_id"], i["item_id"], i["timestamp_ms"]) for i in instances} == set(map(int, data.ins_id))
    request = IngestRequest.model_validate({"instances": instances})
    featurizer = Featurizer(FeatureSpec.from_prepared(data))
    for k, inst in enumerate(request.instances):
        featurizer.check_names(inst.features.categorical, inst.features.numeric, f"instances[{k}]")
        assert set(inst.labels) == set(data.tasks)


def test_a_bad_flag_fails_the_check():
    # The checker itself must be able to fail.
    with pytest.raises(pytest.fail.Exception):
        parse_iat(["iat", "serve", "ranking", "--no-such-flag"])
    with pytest.raises(pytest.fail.Exception):
        parse_iat(["iat", "serve", "gateway"])


# --- access: the bearer token is on wherever the services run -----------------------------

def test_bearer_token_is_on_in_compose_and_k8s_and_the_clients_send_it():
    for name, service in SERVED.items():
        env = image_services()[name].get("environment", {})
        assert settings_with(env).token, f"compose {name}: IAT_API_TOKEN not set"
    assert COMPOSE["services"]["seed"]["environment"]["IAT_API_TOKEN"]  # the seed job posts with it
    assert COMPOSE["services"]["locust"]["environment"]["IAT_API_TOKEN"]
    seed = (REPO / "deploy" / "seed.py").read_text()
    assert 'os.environ.get("IAT_API_TOKEN")' in seed and '"Authorization"' in seed
    secrets = {s["metadata"]["name"]: s["stringData"] for s in k8s("Secret")}
    for name, deployment in DEPLOYMENTS.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        (var,) = [v for v in container.get("env", []) if v["name"] == "IAT_API_TOKEN"]
        ref = var["valueFrom"]["secretKeyRef"]
        assert ref["key"] == "bearer-token" and ref["key"] in secrets[ref["name"]], name
