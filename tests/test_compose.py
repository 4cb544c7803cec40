"""docker-compose.yml checked against the app, without a Docker engine.

Parses the compose file (PyYAML), interpolates it with .env.example the way `docker compose` does,
and checks it against ingest/settings.py and the code it runs: service names, ports, every TERNREC_*
variable, the commands' modules and flags, healthchecks, depends_on conditions, a scalable worker.
"""

import contextlib
import importlib.util
import io
import os
import re
from urllib.parse import urlparse

import pytest
import yaml

from ingest.settings import KAFKA_VERSION, REPO_ROOT, Settings

COMPOSE_TEXT = (REPO_ROOT / "docker-compose.yml").read_text()
ENV_EXAMPLE = dict(line.split("=", 1) for line in (REPO_ROOT / ".env.example").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))
SERVICES = {"kafka", "redis", "topic-init", "worker", "recommender", "ui", "replay"}
APP_SERVICES = {"topic-init", "worker", "recommender", "ui", "replay"}
LONG_RUNNING_WITH_ENDPOINT = {"kafka", "redis", "recommender", "ui"}
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ (a literal $), recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name} is required: {arg}")
        return arg if op else ""

    return _VAR.sub(one, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(yaml.safe_load(COMPOSE_TEXT), ENV_EXAMPLE)


def app_env(compose, service) -> dict[str, str]:
    return {k: str(v) for k, v in compose["services"][service]["environment"].items()}


def settings_of(compose, service, monkeypatch) -> Settings:
    for name in [n for n in os.environ if n.startswith("TERNREC_")]:
        monkeypatch.delenv(name)
    for name, value in app_env(compose, service).items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_services_and_volumes(compose):
    assert set(compose["services"]) == SERVICES
    kafka, redis = compose["services"]["kafka"], compose["services"]["redis"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"  # the official image, the version we test with
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft
    data_dir = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert any(v.endswith(f":{data_dir}") and v.split(":")[0] in compose["volumes"] for v in kafka["volumes"])
    assert any(v.split(":")[0] in compose["volumes"] and v.endswith(":/data") for v in redis["volumes"])
    for service in APP_SERVICES:
        assert compose["services"][service]["build"] == "."


def test_every_ternrec_variable_is_a_setting():
    fields = set(Settings.model_fields)
    texts = [COMPOSE_TEXT, (REPO_ROOT / ".env.example").read_text(), (REPO_ROOT / "Dockerfile").read_text()]
    used = {name for text in texts for name in re.findall(r"TERNREC_([A-Z0-9_]+)", text)}
    assert used, "the compose file configures the app through TERNREC_* variables"
    unknown = sorted(f"TERNREC_{n}" for n in used if n.lower() not in fields)
    assert not unknown, f"not read by ingest/settings.py: {unknown}"


def test_app_settings_in_containers(compose, monkeypatch):
    kafka = compose["services"]["kafka"]["environment"]
    advertised = urlparse(kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")[0]).netloc
    for service in APP_SERVICES:
        settings = settings_of(compose, service, monkeypatch)
        assert settings.kafka_bootstrap == advertised == "kafka:9092"
        redis_url = urlparse(settings.redis_url)
        assert (redis_url.scheme, redis_url.hostname, redis_url.port) == ("redis", "redis", 6379)
        assert redis_url.password == ENV_EXAMPLE["REDIS_PASSWORD"]  # from the env file, nothing literal
        assert settings.http_host == "0.0.0.0"  # reachable from the other containers
        assert settings.partitions == int(kafka["KAFKA_NUM_PARTITIONS"])
    assert "${REDIS_PASSWORD" in COMPOSE_TEXT and ENV_EXAMPLE["REDIS_PASSWORD"] not in COMPOSE_TEXT
    assert "$$REDIS_PASSWORD" in str(yaml.safe_load(COMPOSE_TEXT)["services"]["redis"]["command"])


def test_ports_and_service_url(compose, monkeypatch):
    services = compose["services"]
    rec = settings_of(compose, "recommender", monkeypatch)
    assert services["recommender"]["ports"] == [f"{rec.http_port}:{rec.http_port}"]
    assert str(rec.http_port) == ENV_EXAMPLE["TERNREC_HTTP_PORT"]
    ui = settings_of(compose, "ui", monkeypatch)
    assert services["ui"]["ports"] == [f"{ui.ui_port}:{ui.ui_port}"]
    assert "--server.port \"$TERNREC_UI_PORT\"" in services["ui"]["command"][-1]
    assert ui.resolved_service_url == f"http://recommender:{rec.http_port}"
    health = services["recommender"]["healthcheck"]["test"][-1]
    assert "TERNREC_HTTP_PORT" in health and "/health" in health


def test_healthchecks_and_depends_on_conditions(compose):
    services = compose["services"]
    for name in LONG_RUNNING_WITH_ENDPOINT:
        assert services[name]["healthcheck"]["test"], name
    for name, service in services.items():
        assert service.get("restart") == "on-failure", name
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
            elif condition == "service_completed_successfully":
                assert dependency == "topic-init"
            else:
                assert condition == "service_started"
    assert services["worker"]["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["topic-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["ui"]["depends_on"]["recommender"]["condition"] == "service_healthy"


def test_worker_is_scalable(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker  # `--scale worker=N` needs both absent
    assert not any("container_name" in s for s in compose["services"].values())


def _module_of(command: list[str]) -> str | None:
    return command[command.index("-m") + 1] if "-m" in command else None


@pytest.mark.parametrize("service, module", [("worker", "recommender.worker"), ("recommender", "recommender.service"),
                                             ("replay", "ingest.replay")])
def test_commands_run_existing_modules_with_valid_flags(compose, service, module, monkeypatch):
    command = compose["services"][service]["command"]
    assert command[:2] == ["python", "-m"] and _module_of(command) == module
    assert importlib.util.find_spec(module) is not None
    # Parse the real flags: with no Kafka configured each CLI stops on that, after its flags parsed.
    for name in [n for n in os.environ if n.startswith("TERNREC_")]:
        monkeypatch.delenv(name)
    main = importlib.import_module(module).main
    stderr = io.StringIO()
    if module == "recommender.service":
        assert "--http-port" in _help(main)
        return
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
        main(command[3:])
    assert exit_.value.code == 2 and ("TERNREC_KAFKA_BOOTSTRAP" in stderr.getvalue()), stderr.getvalue()
    assert "unrecognized arguments" not in stderr.getvalue()


def _help(main) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    return out.getvalue()


def test_topic_init_and_ui_commands(compose, monkeypatch, capsys):
    for name in [n for n in os.environ if n.startswith("TERNREC_")]:
        monkeypatch.delenv(name)
    command = compose["services"]["topic-init"]["command"]
    assert command[:2] == ["python", "-c"]
    exec(compile(command[2], "topic-init", "exec"), {})  # embedded log here: the same code creates the topics
    assert "topics ready: item-events user-events item-embeddings dead-letter" in capsys.readouterr().out
    ui = compose["services"]["ui"]["command"][-1]
    script = re.search(r"streamlit run (\S+)", ui).group(1)
    assert (REPO_ROOT / script).is_file()  # the image's WORKDIR is a copy of the repository


def test_dockerfile_and_env_file():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)
    assert "download.pytorch.org/whl/cpu" in dockerfile and "pip install ." in dockerfile
    assert ".env" in (REPO_ROOT / ".dockerignore").read_text().split()  # no secrets in the image
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE_TEXT))
    assert required <= {k for k, v in ENV_EXAMPLE.items() if v}, "every required variable has an example"
