"""docker-compose.yml checked against the app, without a Docker engine (`make compose-check` runs it).

Parses the compose file (PyYAML), interpolates it with .env.example the way `docker compose` does,
and checks it against ingest/settings.py and the code it runs: service names, ports, every TERNREC_*
variable, the commands' modules and flags, healthchecks, depends_on conditions, a scalable worker;
the check's override (deploy/compose.check.yml) against the same; the stand-in Kafka image's
configuration through Kafka's own KafkaDockerWrapper, with the compose file's environment.
"""

import contextlib
import importlib.util
import io
import os
import re
import socket
import subprocess
from urllib.parse import urlparse

import pytest
import yaml

from deploy.probes import CheckFailed, ContainerEvent, EventRecorder, verify_start_order
from ingest.services import fetch_kafka_jars, kafka_jars_ready
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
        assert compose["services"][service]["build"]["context"] == "."


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
    assert services["recommender"]["ports"] == [f"127.0.0.1:{rec.http_port}:{rec.http_port}"]  # loopback by default
    assert str(rec.http_port) == ENV_EXAMPLE["TERNREC_HTTP_PORT"]
    ui = settings_of(compose, "ui", monkeypatch)
    assert services["ui"]["ports"] == [f"127.0.0.1:{ui.ui_port}:{ui.ui_port}"]
    opened = interpolate(yaml.safe_load(COMPOSE_TEXT), {**ENV_EXAMPLE, "PUBLISH_ADDR": "0.0.0.0"})["services"]
    assert opened["recommender"]["ports"] == [f"0.0.0.0:{rec.http_port}:{rec.http_port}"]
    assert opened["ui"]["ports"] == [f"0.0.0.0:{ui.ui_port}:{ui.ui_port}"]
    assert app_env(compose, "ui")["STREAMLIT_SERVER_ADDRESS"] == "0.0.0.0"  # inside its container
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


def test_dockerfile_and_env_file(compose):
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", dockerfile, re.M))
    assert args["PYTHON_IMAGE"] == "python:3.11-slim" and args["PYTHON_BUILD_IMAGE"] == "python:3.11"
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${PYTHON_BUILD_IMAGE}", "${PYTHON_IMAGE}"]
    for service in APP_SERVICES:  # compose passes the same defaults
        build_args = compose["services"][service]["build"]["args"]
        assert build_args == {k: args[k] for k in ("PYTHON_BUILD_IMAGE", "PYTHON_IMAGE")}
    # Only the ordinary index (or the wheelhouse the check passes): no apt, no other index, no torch pin.
    assert "apt-get install" not in dockerfile and "--index-url" not in dockerfile and "torch" not in dockerfile
    assert "pip wheel --no-deps" in dockerfile and "pip install -r" in dockerfile
    assert ".env" in (REPO_ROOT / ".dockerignore").read_text().split()  # no secrets in the image
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE_TEXT))
    assert required <= {k for k, v in ENV_EXAMPLE.items() if v}, "every required variable has an example"


# --------------------------------------------------------------------------- make compose-check

CHECK_TEXT = (REPO_ROOT / "deploy" / "compose.check.yml").read_text()
CHECK_VARIABLES = {"REDIS_PASSWORD": "pw", "TERNREC_HTTP_PORT": "18000",
                   **{name: "10000" for name in re.findall(r"CHECK_\w+", CHECK_TEXT)}}
CHECK_OVERRIDE = interpolate(yaml.safe_load(CHECK_TEXT), CHECK_VARIABLES)


def test_check_override_keeps_everything_on_loopback():
    services = CHECK_OVERRIDE["services"]
    assert set(services) == SERVICES
    assert all(s["network_mode"] == "host" for s in services.values())  # the check's namespace: loopback only
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["TERNREC_HTTP_HOST"] == "127.0.0.1"
        for url in (env["TERNREC_KAFKA_BOOTSTRAP"], env["TERNREC_REDIS_URL"], env["TERNREC_SERVICE_URL"]):
            assert urlparse(url if "://" in url else f"kafka://{url}").hostname == "127.0.0.1", url
        assert services[name]["build"]["args"]["PIP_NO_INDEX"] == "1"  # offline: the loopback wheelhouse only
    assert services["ui"]["environment"]["STREAMLIT_SERVER_ADDRESS"] == "127.0.0.1"
    kafka = services["kafka"]["environment"]
    for listener in kafka["KAFKA_LISTENERS"].split(",") + kafka["KAFKA_ADVERTISED_LISTENERS"].split(","):
        assert urlparse(listener).hostname == "127.0.0.1", listener
    assert "--bind 127.0.0.1" in services["redis"]["command"][-1]
    check = (REPO_ROOT / "deploy" / "compose_check.py").read_text()
    for name in set(re.findall(r"\$\{(CHECK_[A-Z_]+)", CHECK_TEXT)):
        assert f'"{name}"' in check, f"{name} is not set by deploy/compose_check.py"


def test_kafka_stand_in_reads_the_compose_environment(compose, tmp_path):
    """deploy/images/kafka configures the broker as apache/kafka does: Kafka's own KafkaDockerWrapper
    turns the compose file's KAFKA_* variables into server.properties and formats the log dir."""
    settings = Settings()
    if not kafka_jars_ready(settings):
        fetch_kafka_jars(settings)
    env = {k: str(v) for k, v in compose["services"]["kafka"]["environment"].items()}
    env["KAFKA_LOG_DIRS"] = str(tmp_path / "data")
    defaults = REPO_ROOT / "deploy" / "images" / "kafka" / "docker"
    (tmp_path / "mounted").mkdir()
    (tmp_path / "final").mkdir()
    proc = subprocess.run(
        ["java", "-Xmx128m", "-cp", f"{settings.kafka_home / 'libs'}/*",
         f"-Dlog4j.configuration=file:{defaults / 'tools-log4j.properties'}",
         "kafka.docker.KafkaDockerWrapper", "setup",
         "--default-configs-dir", str(defaults), "--mounted-configs-dir", str(tmp_path / "mounted"),
         "--final-configs-dir", str(tmp_path / "final")],
        env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    props = dict(line.split("=", 1) for line in (tmp_path / "final" / "server.properties").read_text().splitlines()
                 if "=" in line)
    assert props["process.roles"] == "broker,controller" and props["node.id"] == "1"
    assert props["advertised.listeners"] == "PLAINTEXT://kafka:9092"
    assert props["num.partitions"] == ENV_EXAMPLE["TERNREC_PARTITIONS"]
    assert props["auto.create.topics.enable"] == "false"
    meta = (tmp_path / "data" / "meta.properties").read_text()
    assert f"cluster.id={env['CLUSTER_ID']}" in meta  # formatted with the compose file's cluster id
    for name in ("log4j.properties", "tools-log4j.properties"):
        assert (tmp_path / "final" / name).is_file()


def _recorder(*events: tuple[float, str, str, int | None]) -> EventRecorder:
    recorder = EventRecorder(engine=None, project="test")
    recorder.events = [ContainerEvent(int(t * 1e9), action, service, service, code)
                       for t, action, service, code in events]
    return recorder


def test_start_order_is_read_from_the_events():
    depends_on = {"worker": {"topic-init": {"condition": "service_completed_successfully"},
                             "redis": {"condition": "service_healthy"}}}
    held = _recorder((1, "start", "redis", None), (2, "health_status: healthy", "redis", None),
                     (3, "start", "topic-init", None), (4, "die", "topic-init", 0), (5, "start", "worker", None))
    assert len(verify_start_order(held, depends_on, since=0)) == 2
    failed_init = _recorder((2, "health_status: healthy", "redis", None), (4, "die", "topic-init", 1),
                            (5, "start", "worker", None))
    with pytest.raises(CheckFailed, match="never reached service_completed_successfully"):
        verify_start_order(failed_init, depends_on, since=0)
    early = _recorder((2, "health_status: healthy", "redis", None), (1, "start", "worker", None),
                      (4, "die", "topic-init", 0), (6, "start", "worker", None))
    with pytest.raises(CheckFailed, match="before topic-init"):
        verify_start_order(early, depends_on, since=0)


def test_listening_addresses_are_decoded_from_proc():
    from deploy.probes import _decode_address, listening_addresses

    assert _decode_address("0100007F", 8) == "127.0.0.1"
    assert _decode_address("0000000000000000FFFF00000100007F", 32) == "127.0.0.1"  # IPv4-mapped, as Java binds
    assert _decode_address("00000000000000000000000001000000", 32) == "::1"
    with socket.socket() as listener:  # a real one, seen by the same reader the check uses
        listener.bind(("127.0.0.2", 0))
        listener.listen()
        assert "127.0.0.2" in listening_addresses()
