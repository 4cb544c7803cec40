"""Base images without a registry: local stand-ins for the public defaults, from Debian packages.

The Dockerfile and docker-compose.yml build and run on public images, each behind a variable
(PYTHON_BUILD_IMAGE, PYTHON_IMAGE, KAFKA_IMAGE, REDIS_IMAGE). Where a default cannot be pulled
(no registry on this machine), `resolve_base_images` builds a stand-in and returns the variable
that points compose at it:
- a Debian root filesystem per flavour, made by debootstrap from the Debian mirror apt uses here
  and cached as a tarball under ~/.cache/ternrec/rootfs (`prepare_rootfs`, a set-up step that
  downloads), imported as an image; then the recipe in deploy/images/<flavour>/ on top of it,
  built with `--network none`;
- python-build / python: Debian's python3 (3.11), with / without the C toolchain;
- kafka: a Java 17 runtime + the Maven Central jars `make stack` uses, configured by Kafka's own
  kafka.docker.KafkaDockerWrapper, so it reads the same KAFKA_* environment as apache/kafka;
- redis: Debian's redis-server.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deploy.dockerd import EngineError, PrivateDocker
from ingest.settings import REPO_ROOT, Settings

RECIPES = Path(__file__).resolve().parent / "images"
ROOTFS_CACHE = Path.home() / ".cache" / "ternrec" / "rootfs"
RECIPE_VERSION = "1"  # bump when the rootfs trimming changes (invalidates the cached tarballs)


@dataclass(frozen=True)
class Flavour:
    name: str
    variable: str  # the compose / build variable that names the image
    packages: tuple[str, ...]  # Debian packages on top of debootstrap's minbase
    recipe: str  # folder under deploy/images


FLAVOURS = (
    Flavour("python-build", "PYTHON_BUILD_IMAGE",
            ("python3", "python3-venv", "python3-dev", "gcc", "libc6-dev"), "python"),
    Flavour("python", "PYTHON_IMAGE", ("python3", "python3-venv"), "python"),
    Flavour("kafka", "KAFKA_IMAGE", ("openjdk-17-jre-headless",), "kafka"),
    Flavour("redis", "REDIS_IMAGE", ("redis-server",), "redis"),
)


def default_images() -> dict[str, str]:
    """The public defaults, read where they are declared (Dockerfile ARGs, compose ${VAR:-default})."""
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    found = {}
    for flavour in FLAVOURS:
        match = (re.search(rf"^ARG {flavour.variable}=(\S+)", dockerfile, re.M)
                 or re.search(rf"\$\{{{flavour.variable}:-([^}}]+)\}}", compose))
        if match is None:
            raise EngineError(f"no default for {flavour.variable} in Dockerfile or docker-compose.yml")
        found[flavour.variable] = match.group(1)
    return found


# --------------------------------------------------------------------------- root filesystems


def apt_mirror() -> tuple[str, str]:
    """(suite, mirror URI) of the Debian main archive this machine's apt uses."""
    suite = re.search(r"^VERSION_CODENAME=(\S+)", Path("/etc/os-release").read_text(), re.M).group(1)
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in (p for p in sources if p.is_file()):
        text = path.read_text()
        for stanza in re.split(r"\n\s*\n", text):  # deb822: URIs / Suites / Components per stanza
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if suite in fields.get("Suites", "").split() and "main" in fields.get("Components", "").split():
                return suite, fields["URIs"].split()[0]
        for line in text.splitlines():  # one-line style: deb URI suite components...
            parts = line.split()
            if len(parts) >= 4 and parts[0] == "deb" and parts[2] == suite and "main" in parts[3:]:
                return suite, parts[1]
    raise EngineError(f"no apt source for Debian {suite} main in /etc/apt (needed by debootstrap)")


def rootfs_tarball(flavour: Flavour) -> Path:
    suite, mirror = apt_mirror()
    key = hashlib.sha256(f"{RECIPE_VERSION} {suite} {mirror} {' '.join(flavour.packages)}".encode()).hexdigest()
    return ROOTFS_CACHE / f"{flavour.name}-{suite}-{key[:12]}.tar"


def prepare_rootfs(log=print) -> None:
    """Set-up step (downloads): a debootstrap tarball per flavour, unless cached."""
    for flavour in FLAVOURS:
        target = rootfs_tarball(flavour)
        if target.exists():
            continue
        suite, mirror = apt_mirror()
        log(f"debootstrap {suite} minbase + {', '.join(flavour.packages)} from {mirror}")
        (ROOTFS_CACHE / "debs").mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{flavour.name}-", dir=ROOTFS_CACHE))
        try:
            root = work / "root"
            proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(flavour.packages)}",
                                   f"--cache-dir={ROOTFS_CACHE / 'debs'}", suite, str(root), mirror],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise EngineError(f"debootstrap failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-3000:]}")
            _trim(root)
            subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(work / "rootfs.tar"), "."],
                           check=True)
            (work / "rootfs.tar").rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for old in ROOTFS_CACHE.glob(f"{flavour.name}-{suite}-*.tar"):  # superseded recipes
            if old != target:
                old.unlink()


def _trim(root: Path) -> None:
    """What the slim images leave out: package caches and lists, docs (but copyrights), man pages."""
    for pattern in ("var/cache/apt/*", "var/lib/apt/lists/*", "usr/share/man/*", "usr/share/info/*",
                    "usr/share/locale/*", "var/log/*"):
        for path in root.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for path in (root / "usr/share/doc").rglob("*"):
        if path.is_file() and path.name != "copyright":
            path.unlink()


# --------------------------------------------------------------------------- images


def resolve_base_images(engine: PrivateDocker, log=print) -> tuple[dict[str, str], dict[str, str]]:
    """({variable: image} for compose, {variable: why the default was not used}) .

    A default already in the engine is used as is; otherwise one `docker pull` is tried, and on
    failure the local stand-in is built."""
    images, reasons = {}, {}
    for flavour in FLAVOURS:
        default = default_images()[flavour.variable]
        if engine.image_exists(default):
            images[flavour.variable] = default
            continue
        pulled = engine.docker("pull", "-q", default, check=False, timeout=120)
        if pulled.returncode == 0:
            images[flavour.variable] = default
            continue
        reasons[flavour.variable] = f"docker pull {default}: {pulled.stderr.strip().splitlines()[-1]}"
        images[flavour.variable] = build_local_image(engine, flavour, log)
    return images, reasons


def build_local_image(engine: PrivateDocker, flavour: Flavour, log=print) -> str:
    tarball = rootfs_tarball(flavour)
    if not tarball.exists():
        raise EngineError(f"{tarball} missing: the set-up step (prepare_rootfs) did not run")
    rootfs_image = f"ternrec-local/{flavour.name}-rootfs:{tarball.stem.rsplit('-', 1)[1]}"
    if not engine.image_exists(rootfs_image):
        log(f"importing {tarball.name} as {rootfs_image}")
        with open(tarball, "rb") as stream:
            engine.docker("import", "-", rootfs_image, stdin=stream, timeout=600)
    image = f"ternrec-local/{flavour.name}:{_local_tag(flavour)}"
    with tempfile.TemporaryDirectory(prefix=f"ternrec-{flavour.name}-context-") as context:
        shutil.copytree(RECIPES / flavour.recipe, context, dirs_exist_ok=True)
        if flavour.name == "kafka":
            _add_kafka_jars(Path(context) / "libs")
        engine.docker("build", "--network", "none", "-q", "--build-arg", f"BASE={rootfs_image}",
                      "-t", image, context, timeout=900)
    return image


def _local_tag(flavour: Flavour) -> str:
    """The version the stand-in really carries (Debian's, or the Kafka jars')."""
    if flavour.name == "kafka":
        return _kafka_version()
    return {"redis": "debian-bookworm", "python": "3.11-debian", "python-build": "3.11-debian"}[flavour.name]


def _kafka_libs() -> Path:
    return Settings().kafka_home / "libs"


def _kafka_version() -> str:
    jars = sorted(_kafka_libs().glob("kafka_2.13-*.jar"))
    if not jars:
        raise EngineError(f"no Kafka jars in {_kafka_libs()}: run `python -m ingest.services fetch-kafka`")
    return jars[0].name.removeprefix("kafka_2.13-").removesuffix(".jar")


def _add_kafka_jars(target: Path) -> None:
    target.mkdir()
    for jar in _kafka_libs().glob("*.jar"):
        try:
            (target / jar.name).hardlink_to(jar)
        except OSError:  # another file system
            shutil.copy2(jar, target / jar.name)
