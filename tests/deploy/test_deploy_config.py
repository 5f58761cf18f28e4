"""The deploy files checked against the code: docker-compose.yml, deploy/k8s, Prometheus, Grafana,
the Dockerfile and the job scripts.

Nothing is started here (tests/deploy/test_compose_up.py brings compose up for real): every
command is parsed with the real argparse parser of its `iat` subcommand, every env var must be a
`Settings` field (or listed below with its reason), ports are derived from `Settings` with that
environment, probes must hit routes of `services.health.health_router`, dashboard queries must name
exported metrics, and the Kubernetes manifests are validated against the Kubernetes schemas of the
version the README names (kubernetes-validate ships them, so no cluster is needed).
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
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from pydantic import AliasChoices

from cli import COMMANDS
from cli.serve import SERVICES
from services import metrics
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
    "DEMO_MAX_USERS": "compose train and seed jobs: users to train on and replay (as `iat demo --max-users`)",
}
HEALTH_PATHS = {route.path for route in health_router({}).routes}


def load_yaml(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


class InterpolationError(ValueError):
    """What compose reports for a required variable that is unset or empty."""


# Compose's interpolation (compose-spec, "Interpolation"): $$ for a literal $, $VAR, ${VAR},
# ${VAR:-default} / ${VAR-default}, ${VAR:?error} / ${VAR?error}, ${VAR:+alternate} / ${VAR+alternate}.
_COMPOSE_VAR = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?+])([^{}]*))?\}|(\w+))")


def interpolate(value, env: dict[str, str]):
    """The compose file as compose sees it with exactly this environment."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        dollar, name, op, arg, bare = match.groups()
        if dollar:
            return "$"
        if bare:
            return env.get(bare, "")
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op is None:
            return current or ""
        if op.endswith("-"):
            return interpolate(arg, env) if missing else current
        if op.endswith("?"):
            if missing:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return current
        return "" if missing else interpolate(arg, env)  # ":+" / "+"

    return _COMPOSE_VAR.sub(substitute, value)


RAW_COMPOSE = load_yaml(REPO / "docker-compose.yml")[0]
# What the checks below read: the file as compose resolves it with only a token set (the one
# variable without a default), so that they see the values the containers get.
COMPOSE_ENV = {"IAT_API_TOKEN": "token-for-the-config-test"}
COMPOSE = interpolate(RAW_COMPOSE, COMPOSE_ENV)
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

    for name in ("ranking", "source", "train", "trainer"):
        model_dir = str(settings_with(services[name]["environment"]).model_dir)
        assert ["models", model_dir] == mounts(name)[[m[0] for m in mounts(name)].index("models")][:2], name
    # the trainer publishes into the models volume and keeps its checkpoint on a volume of its own
    trainer = {m[1]: m for m in mounts("trainer")}
    assert trainer[str(settings_with(services["trainer"]["environment"]).model_dir)][-1] != "ro"
    checkpoint = trainer[str(settings_with(services["trainer"]["environment"]).trainer_dir)]
    assert checkpoint[0] in COMPOSE["volumes"], checkpoint
    assert services["trainer"]["depends_on"]["train"]["condition"] == "service_completed_successfully"
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
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", script.read_text()))
    missing = used - set(svc["environment"])
    assert not missing, f"{script} reads {sorted(missing)}, not set for compose service {name}"
    assert used <= settings_env_names() | set(DOCUMENTED_ENV), used
    env = {key: str(value) for key, value in svc["environment"].items()}
    # Each command as the job runs it: its variables take the service's values.
    commands = [[re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda m: env[m.group(1)], arg) for arg in argv]
                for argv in shell_invocations(script)]
    checked = 0
    for argv in commands:
        if argv[0] == "iat":
            parse_iat(argv)
            checked += 1
        elif argv[:2] == ["python", "deploy/seed.py"]:
            parse_seed(argv[2:])
            checked += 1
    assert checked >= 2, f"{script}: expected iat/seed invocations, found {commands}"


def test_compose_jobs_train_and_replay_the_same_users():
    train = [a for a in shell_invocations(REPO / "deploy/jobs/train-export.sh") if a[:2] == ["iat", "train"]]
    seed = [a for a in shell_invocations(REPO / "deploy/jobs/seed.sh") if a[:2] == ["python", "deploy/seed.py"]]
    assert len(train) == len(seed) == 2  # MovieLens and synthetic branches
    for argv in train + seed:
        assert argv[argv.index("--max-users") + 1] == "$DEMO_MAX_USERS", argv
    services = COMPOSE["services"]
    assert services["train"]["environment"]["DEMO_MAX_USERS"] == services["seed"]["environment"]["DEMO_MAX_USERS"]


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
                     "iat_ranking_history_length_bucket", "iat_stream_lag", "iat_ranking_degraded_total",
                     # the online loop (issue 17): progressive validation and the trainer's pace
                     "iat_progressive_auc", "iat_progressive_logloss", "iat_trainer_instances_total",
                     "iat_trainer_waiting_instances", "iat_trainer_published_total"):
        assert required in used, required


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    provider = load_yaml(REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "iat.yml")[0]
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in COMPOSE["services"]["grafana"]["volumes"]


# --- Dockerfile ---------------------------------------------------------------------------

def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def docker_ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) out of the build context: a
    pattern matching the path or a folder above it drops it, `!pattern` brings it back, last wins."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(prefix, pat) for prefix in prefixes for pat in candidates):
            ignored = not negate
    return ignored


def installed_package_dirs() -> set[str]:
    """The folders of every package pyproject.toml installs (packages.find and package-dir)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    find = setuptools["packages"]["find"]
    dirs = {str(init.parent.relative_to(REPO)) for where in find["where"] for init in (REPO / where).glob("*/__init__.py")
            if any(fnmatch.fnmatchcase(init.parent.name, pattern) for pattern in find["include"])}
    return dirs | {d for d in setuptools.get("package-dir", {}).values() if d not in ("", ".")}


def test_dockerfile_copies_the_context_whole_less_what_dockerignore_drops():
    text = (REPO / DOCKERFILE).read_text()
    copies = [line.split() for line in text.splitlines()
              if line.split()[:1] == ["COPY"] and not any(p.startswith("--from") for p in line.split())]
    for parts in copies:
        for source in parts[1:-1]:
            if source.startswith("--") or source == ".":
                continue
            assert list(REPO.glob(source.rstrip("/"))), f"{DOCKERFILE}: COPY {source}: no such file"
            assert not docker_ignored(source), f"{DOCKERFILE}: COPY {source}: excluded by .dockerignore"
    # Every package is picked up without being named (new top-level packages included).
    assert any(parts[1:-1] == ["."] for parts in copies), f"{DOCKERFILE}: no stage copies the context whole"
    packages = installed_package_dirs()
    assert {"models", "storage", "services", "proto/iat"} <= packages, packages
    needed = packages | {"pyproject.toml", "constraints.txt", "README.md", "deploy/seed.py"}
    for svc in image_services().values():  # what the compose services run is in the image
        needed |= {arg for arg in svc["command"] if "/" in arg and (REPO / arg).is_file()}
    assert {"deploy/jobs/train-export.sh", "deploy/jobs/seed.sh"} <= needed
    for path in sorted(needed):
        assert (REPO / path).exists() and not docker_ignored(path), f"{path}: not in the build context"
    for path in ("tests", "data", ".venv", ".git", "runs", "services/__pycache__"):
        assert docker_ignored(path), f"{path}: should stay out of the build context"
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert re.search(r"pip install -c \S*constraints\.txt", text)


def test_docker_ignored_reads_the_patterns():
    # The checker itself must be able to say no.
    assert docker_ignored("tests/deploy/test_compose_up.py") and docker_ignored("storage/__pycache__/x.pyc")
    assert not docker_ignored("storage/codecs.py") and not docker_ignored("deploy/wheels/README.md")


# --- no image registry: the local images ------------------------------------------------------

LOCAL = interpolate(load_yaml(REPO / "deploy" / "compose.local.yml")[0], COMPOSE_ENV)


def test_local_override_maps_every_registry_image_to_a_local_build():
    stages = set(re.findall(r"^FROM \S+ AS (\w+)", (REPO / "deploy/local/Dockerfile").read_text(), re.M))
    built = re.search(r"for stage in ([\w ]+); do", (REPO / "deploy/local-images.sh").read_text()).group(1).split()
    assert set(built) == stages == {"python", "redis", "prometheus"}
    assert set(LOCAL["services"]) <= set(COMPOSE["services"])
    for name, svc in COMPOSE["services"].items():
        local = LOCAL["services"].get(name, {})
        if name in image_services():
            assert local["build"]["args"]["BASE_IMAGE"] == "iat-local/python", name
            assert "ARG BASE_IMAGE=" in (REPO / DOCKERFILE).read_text()
        elif name == "grafana":  # no Debian package: kept out of the default profile
            assert local.get("profiles"), "grafana needs a profile in compose.local.yml"
        else:
            image = local.get("image", "")
            assert image.startswith("iat-local/") and image.split("/", 1)[1] in stages, f"{name}: {image!r}"
            assert local.get("pull_policy") == "never", name


def test_local_images_script_commits_no_host_names():
    # The mirror, the certificate bundle and pip's index come from the machine at build time.
    for path in ("deploy/local-images.sh", "deploy/local/Dockerfile", "deploy/compose.local.yml"):
        text = (REPO / path).read_text()
        hosts = re.findall(r"https?://[\w.-]+", text)
        assert not hosts, f"{path} names {hosts}"
    ignored = (REPO / "deploy" / ".gitignore").read_text()
    assert "/wheels/*" in ignored


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
    if args.service == "trainer":  # publishes into the models volume; its checkpoint survives the pod
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert not mounts[str(settings.model_dir)].get("readOnly")
        state = mounts[str(settings.trainer_dir)]
        assert volumes[state["name"]]["persistentVolumeClaim"]["claimName"] in claims
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
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


def kubernetes_version_named_in_readme() -> str:
    """The Kubernetes version the README's deployment section says the manifests are for."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Deployment", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"Kubernetes (\d+\.\d+)\b", section)
    assert match, "README's Deployment section names no Kubernetes version"
    return match.group(1)


def k8s_resources() -> list[tuple[str, dict]]:
    """Every object `kubectl apply -k deploy/k8s` sends, with its file."""
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")[0]
    return [(name, doc) for name in kustomization["resources"] for doc in load_yaml(K8S_DIR / name)]


def test_k8s_manifests_validate_against_the_named_kubernetes_schemas():
    import kubernetes_validate

    named = kubernetes_version_named_in_readme()
    # The named version (what we promise) and the newest the pinned package ships (what is coming).
    latest = ".".join(kubernetes_validate.latest_version().split(".")[:2])
    versions = sorted({named, latest})
    resources = k8s_resources()
    assert {doc["kind"] for _, doc in resources} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                                    "ConfigMap", "Secret", "PersistentVolumeClaim"}
    for name, doc in resources:
        for version in versions:
            try:
                # strict: a misspelt field (livenesProbe) is an error, not silently ignored
                used = kubernetes_validate.validate(doc, version, strict=True)
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} is not valid Kubernetes {version}: {exc}")
            assert used == version, f"kubernetes-validate has no schemas for {version} (used {used})"


def test_k8s_validation_rejects_a_broken_manifest():
    import kubernetes_validate

    deployment = json.loads(json.dumps(DEPLOYMENTS["iat-ranking"]))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_version_named_in_readme(), strict=True)
    container["livenessProbe"] = container.pop("livenesProbe")
    container["resources"]["limits"]["cpu"] = ["2"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_version_named_in_readme(), strict=True)


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity as a number (cpu: cores, memory: bytes)."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and (match.group(2) in units or not match.group(2)), f"not a quantity: {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_k8s_containers_have_cpu_and_memory_limits_and_distinct_probes(name):
    for container in DEPLOYMENTS[name]["spec"]["template"]["spec"]["containers"]:
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            assert resource in resources["limits"], f"{name}: no {resource} limit"
            assert resource in resources["requests"], f"{name}: no {resource} request"
            assert quantity(resources["requests"][resource]) <= quantity(resources["limits"][resource]), name
        # Liveness restarts a stuck process; readiness only takes it out of the Service while its
        # store or model is not there. The same check for both would restart pods for a Redis outage.
        live, ready = container["livenessProbe"]["httpGet"]["path"], container["readinessProbe"]["httpGet"]["path"]
        assert (live, ready) == ("/healthz", "/readyz"), name


# --- the seed job's data ----------------------------------------------------------------

def test_seed_instances_are_valid_requests_with_the_loaders_ins_ids(tmp_path):
    from models.data.prepared import load_dataset
    from models.data.schema import DatasetSchema
    from models.data.synthetic import write_synthetic
    from models.runtime.featurizer import FeatureSpec, Featurizer
    from models.runtime.hashing import ins_id
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


# --- exposure: nothing published beyond this machine, no default token (issue 14, item 9) ------

def published_ports(compose: dict) -> list[tuple[str, str, str]]:
    """(service, host address, container port) of every published port; '' = every interface."""
    ports = []
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            if isinstance(port, dict):  # long syntax
                ports.append((name, port.get("host_ip", ""), str(port["target"])))
            else:  # [HOST:][PUBLISHED:]TARGET
                parts = str(port).rsplit(":", 2)
                ports.append((name, parts[0] if len(parts) == 3 else "", parts[-1]))
    return ports


def test_compose_publishes_ports_on_loopback_unless_told_otherwise():
    default = published_ports(interpolate(RAW_COMPOSE, COMPOSE_ENV))
    assert len(default) >= 7, default  # ranking x2, source, sequencer, prometheus, grafana, locust
    wide_open = [p for p in default if p[1] != "127.0.0.1"]
    assert not wide_open, f"published beyond loopback by default: {wide_open}"
    told = published_ports(interpolate(RAW_COMPOSE, COMPOSE_ENV | {"IAT_BIND": "0.0.0.0"}))
    assert {host for _, host, _ in told} == {"0.0.0.0"}, told


def test_compose_has_no_default_bearer_token():
    for env in ({}, {"IAT_API_TOKEN": ""}):  # unset, or set to nothing (Settings reads "" as no token)
        with pytest.raises(InterpolationError, match="IAT_API_TOKEN"):
            interpolate(RAW_COMPOSE, env)
    composed = interpolate(RAW_COMPOSE, {"IAT_API_TOKEN": "from-the-shell"})
    for name in [*SERVED, "seed", "locust"]:
        assert settings_with(composed["services"][name]["environment"]).token == "from-the-shell", name


def test_interpolate_follows_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$$SET ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:+a} ${UNSET+a}", env) == "$SET x x d d  a "
    with pytest.raises(InterpolationError):
        interpolate("${EMPTY:?say why}", env)
    assert interpolate("${EMPTY?fine}", env) == ""


def test_docker_compose_resolves_the_file_the_same_way():
    """Where compose v2 is installed (the compose test installs it), it agrees with the checks above."""
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"],
                                                        capture_output=True).returncode != 0:
        pytest.skip("docker compose v2 is not installed here (tests/deploy/test_compose_up.py installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IAT_", "DEMO_", "COMPOSE_"))}
    command = ["docker", "compose", "-f", "docker-compose.yml", "config"]
    refused = subprocess.run([*command, "-q"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "IAT_API_TOKEN" in refused.stderr, refused
    done = subprocess.run([*command, "--format", "json"], cwd=REPO, env=env | COMPOSE_ENV,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    for name, svc in config["services"].items():
        for port in svc.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
        if name in image_services():
            ours = {k: str(v) for k, v in COMPOSE["services"][name]["environment"].items()}
            assert svc["environment"] == ours, name
