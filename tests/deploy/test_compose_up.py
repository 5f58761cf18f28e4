"""`docker compose up`, for real: the demo brought up in containers and used from the host.

deploy/local-images.sh installs and starts the engine where needed (Debian's docker.io, compose v2)
and builds the base images locally (no image registry is reachable here; they are kept between
runs); deploy/compose.local.yml maps the compose services to them. Then the demo comes up with
`up -d --build`, every health check is waited on, Score is answered over gRPC and REST from the
host, Prometheus must scrape every service, and a finalizer takes it all down even on failure:
`compose down -v`, the dockerd the script started stopped, the iptables FORWARD policy restored.

Skipped only where no container engine can be started (the script's exit status 3). Grafana has
no package to build a local image from: it stays out (compose.local.yml puts it in a profile).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from iat.ranking.v1 import ranking_pb2, ranking_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local-images.sh"
FILES = ["-f", "docker-compose.yml", "-f", "deploy/compose.local.yml"]
NO_ENGINE = 3
# Generous: a cold run debootstraps Debian and installs torch into the image; the train job runs on
# two loaded cores. The waits end as soon as their event happens.
SCRIPT_TIMEOUT_S = 1800
UP_TIMEOUT_S = 2400
HEALTH_DEADLINE_S = 600
SCRAPE_DEADLINE_S = 300
HISTORY_DEADLINE_S = 300
DEMO_USERS = "40"  # DEMO_MAX_USERS: train and replay this many synthetic users (quick settings)
ONE_SHOT = {"train", "seed"}


def forward_policy() -> str | None:
    if shutil.which("iptables") is None:
        return None
    done = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("-P FORWARD "):
            return line.split()[2]
    return None


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    token: str
    say: callable
    phases: dict[str, float] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(["docker", "compose", "-p", self.project, *FILES, *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stderr[-4000:]}\n{self.logs()}")
        return done

    def containers(self) -> dict[str, dict]:
        """`compose ps -a` as {service: container}; the JSON is one array, or one object a line."""
        out = self.compose("ps", "-a", "--format", "json", timeout=60).stdout.strip()
        rows = json.loads(out) if out.startswith("[") else [json.loads(line) for line in out.splitlines() if line]
        return {row["Service"]: row for row in rows}

    def logs(self) -> str:
        done = subprocess.run(["docker", "compose", "-p", self.project, *FILES, "logs", "--no-color", "--tail", "40"],
                              cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120)
        return done.stdout[-12000:]

    def phase(self, name: str, started: float) -> None:
        self.phases[name] = time.monotonic() - started
        self.say(f"{name}: {self.phases[name]:.0f} s")


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")

    def say(message: str) -> None:  # in the CI log even when the test passes (past output capture)
        line = f"[compose] {message}"
        if reporter is None or capture is None:
            print(line, file=sys.stderr, flush=True)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    if sys.platform != "linux" or shutil.which("bash") is None:
        pytest.skip("no container engine can be started here: deploy/local-images.sh needs Linux and bash")
    # With no iptables before (a fresh machine: `up` installs it), nothing had set a FORWARD
    # policy with it, and the kernel's default, ACCEPT, is what `down` must leave.
    policy_before = forward_policy() if shutil.which("iptables") else "ACCEPT"
    engine_before = engine_answers()
    began = time.monotonic()
    started = time.monotonic()
    done = subprocess.run([str(SCRIPT), "up"], cwd=REPO, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if done.returncode == NO_ENGINE:
        pytest.skip(f"no container engine can be started here: {done.stderr.strip()[-800:]}")
    token = secrets.token_hex(16)
    data_dir = tmp_path_factory.mktemp("no-movielens")  # the jobs fall back to the synthetic generator
    data_dir.chmod(0o755)  # readable by the containers' user, as a real data folder would be
    env = {**os.environ, "IAT_API_TOKEN": token, "IAT_DATA_DIR": str(data_dir), "DEMO_MAX_USERS": DEMO_USERS}
    env.pop("IAT_BIND", None)  # the default: every published port on 127.0.0.1
    env.pop("COMPOSE_FILE", None)
    stack = Stack(project=f"iat-compose-test-{os.getpid()}", env=env, token=token, say=say)
    try:
        assert done.returncode == 0, f"deploy/local-images.sh up exited {done.returncode}:\n{done.stderr[-4000:]}"
        stack.phase("engine and base images (deploy/local-images.sh up)", started)
        started = time.monotonic()
        # Waits itself for the start-up order: redis healthy, train done, services healthy, seed done.
        stack.compose("up", "-d", "--build", timeout=UP_TIMEOUT_S)
        stack.phase("compose up -d --build", started)
        for job in sorted(ONE_SHOT):
            state = json.loads(subprocess.run(
                ["docker", "inspect", "-f", "{{json .State}}", stack.containers()[job]["ID"]],
                capture_output=True, text=True, check=True).stdout)
            took = _seconds(state["FinishedAt"]) - _seconds(state["StartedAt"])
            say(f"  {job} job: {took:.0f} s, exit {state['ExitCode']}")
        yield stack
    finally:
        started = time.monotonic()
        problems = []
        if engine_answers():
            down = stack.compose("down", "-v", "--remove-orphans", "-t", "10", timeout=600, check=False)
            if down.returncode != 0:
                problems.append(f"compose down exited {down.returncode}: {down.stderr[-2000:]}")
        if not engine_before:  # an engine that was already running stays as it was
            stopped = subprocess.run([str(SCRIPT), "down"], cwd=REPO, capture_output=True, text=True, timeout=300,
                                     stdin=subprocess.DEVNULL)
            if stopped.returncode != 0:
                problems.append(f"deploy/local-images.sh down exited {stopped.returncode}: {stopped.stderr[-2000:]}")
        stack.phase("compose down -v and engine stopped", started)
        say(f"total: {time.monotonic() - began:.0f} s")
        # Nothing left behind: the engine as it was, the FORWARD policy as it was.
        if not engine_before and engine_answers():
            problems.append("the container engine the test started is still running")
        if engine_before and engine_answers():
            left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={stack.project}"],
                                  capture_output=True, text=True).stdout.split()
            if left:
                problems.append(f"containers left behind: {left}")
        if forward_policy() != policy_before:
            problems.append(f"iptables FORWARD policy is {forward_policy()}, was {policy_before}")
        assert not problems, "\n".join(problems)


def _seconds(stamp: str) -> float:
    """Docker's RFC 3339 time with nanoseconds, as seconds (only differences are used)."""
    from datetime import datetime

    day, _, clock = stamp.rstrip("Z").partition("T")
    whole, _, frac = clock.partition(".")
    return datetime.fromisoformat(f"{day}T{whole}+00:00").timestamp() + float(f"0.{frac or 0}")


def score_request(user_id: str) -> dict:
    # After every synthetic event (they span 60 days from 2020-09-13): the whole history is usable.
    return {"request_id": "compose-test", "user_id": user_id, "request_time_ms": 1_700_000_000_000,
            "model": "iat", "candidates": [{"item_id": "i1"}, {"item_id": "i2"}, {"item_id": "i3"}]}


def test_every_service_healthy_and_the_jobs_done(stack):
    deadline = time.monotonic() + HEALTH_DEADLINE_S
    started = time.monotonic()
    while True:
        containers = stack.containers()
        checked = {name: c for name, c in containers.items() if name not in ONE_SHOT}
        if checked and all(c["State"] == "running" and c["Health"] in ("healthy", "") for c in checked.values()):
            break
        exited = [n for n, c in checked.items() if c["State"] != "running"]
        assert not exited and time.monotonic() < deadline, (
            f"not healthy after {time.monotonic() - started:.0f} s: "
            f"{ {n: (c['State'], c['Health']) for n, c in containers.items()} }\n{stack.logs()}")
        time.sleep(2)
    stack.phase("every health check passing (after up)", started)
    healthchecked = {"redis", "source", "sequencer", "ranking", "trainer", "prometheus"}
    assert {n for n, c in containers.items() if c["Health"] == "healthy"} == healthchecked
    for job in ONE_SHOT:
        assert containers[job]["State"] == "exited" and containers[job]["ExitCode"] == 0, containers[job]
    assert containers["locust"]["State"] == "running"
    assert "grafana" not in containers  # no local image for it (see deploy/compose.local.yml)
    stack.say("healthy: " + ", ".join(f"{n} {c['Health'] or c['State']}" for n, c in sorted(containers.items())))


def test_published_ports_listen_on_loopback_only(stack):
    published = [(name, p) for name, c in stack.containers().items() for p in c.get("Publishers") or []
                 if p.get("PublishedPort")]
    assert {p["PublishedPort"] for _, p in published} == {50051, 8000, 8001, 8002, 8003, 9090, 8089}
    assert all(p["URL"] == "127.0.0.1" for _, p in published), published


def test_score_over_grpc(stack):
    body = score_request("u1")
    request = ranking_pb2.ScoreRequest(**{k: v for k, v in body.items() if k != "candidates"},
                                       candidates=[ranking_pb2.Candidate(item_id=c["item_id"]) for c in body["candidates"]])
    with grpc.insecure_channel("127.0.0.1:50051") as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        # The seed job has posted everything; the sequencer may still be a moment behind it.
        deadline = time.monotonic() + HISTORY_DEADLINE_S
        while True:
            reply = stub.Score(request, metadata=[("authorization", f"Bearer {stack.token}")], timeout=30)
            if reply.history_length > 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Score(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reply.model == "iat" and list(reply.tasks) == ["like", "love"]
    assert len(reply.scores) == 3 * len(reply.tasks) and all(0.0 <= s <= 1.0 for s in reply.scores)
    assert reply.history_length > 0, "the seed job's instances should be in u1's history"
    stack.say(f"gRPC Score: {reply.model} {reply.model_version}, history_length {reply.history_length}, "
              f"scores {[round(s, 4) for s in reply.scores]}")


def post_json(url: str, body: dict, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_score_over_rest(stack):
    status, body = post_json("http://127.0.0.1:8000/v1/score", score_request("u1"), stack.token)
    assert status == 200, body
    assert body["model"] == "iat" and body["tasks"] == ["like", "love"]
    assert len(body["scores"]) == 3 * len(body["tasks"]) and body["history_length"] > 0
    refused, _ = post_json("http://127.0.0.1:8000/v1/score", score_request("u1"), token=None)
    assert refused == 401
    stack.say(f"REST Score: {body['model']} {body['model_version']}, history_length {body['history_length']}, "
              f"scores {[round(s, 4) for s in body['scores']]}")


def test_prometheus_scrapes_every_service(stack):
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while True:
        with urllib.request.urlopen("http://127.0.0.1:9090/api/v1/targets", timeout=30) as response:
            targets = json.load(response)["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if set(health) == {"ranking", "source", "sequencer", "trainer"} and set(health.values()) == {"up"}:
            break
        assert time.monotonic() < deadline, f"Prometheus targets not all up: {targets}"
        time.sleep(2)
    stack.say("Prometheus targets: " + ", ".join(f"{t['scrapeUrl']} {t['health']}" for t in targets))
