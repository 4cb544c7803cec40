"""The one settings object of ternrec.

Every value comes from a `TERNREC_*` environment variable (or a CLI flag that overrides it);
nothing about connections is hard-coded elsewhere. An empty Kafka bootstrap or Redis URL means
embedded mode: the in-process event log and the embedded store.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent  # the app's one; resources beside the code
BUNDLED_TERNARY_MODEL = REPO_ROOT / "models" / "ternary-minilm"
KAFKA_VERSION = "3.9.1"
LANES = ("live", "bulk")  # the lanes of item events, in the order the worker drains them


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TERNREC_", extra="ignore")

    # Connections. Empty = embedded (in-process log / embedded store).
    kafka_bootstrap: str = Field("", description="Kafka bootstrap servers, e.g. 127.0.0.1:9092")
    redis_url: str = Field("", description="Redis URL, e.g. redis://:password@127.0.0.1:6379/0")

    # Services.
    http_host: str = Field("127.0.0.1", description="address the recommender HTTP API binds to")
    http_port: int = Field(8000, ge=0, le=65535, description="recommender HTTP API port")
    http_workers: int = Field(1, ge=1, le=64, description="recommender processes serving the HTTP port")
    ui_port: int = Field(8501, ge=0, le=65535, description="Streamlit UI port")
    service_url: str = Field("", description="recommender URL the UI calls (default: from host/port)")
    api_key: SecretStr = Field(SecretStr(""), description="write key: when set, POST /events needs "
                                                           "'Authorization: Bearer <key>' (reads stay open)")

    # Model: a sentence-transformers name/path or a packed ternary model directory.
    # Empty = the bundled ternary model when present, else the full-precision default.
    encoder: str = Field("", description="encoder spec for load_encoder()")

    # Native ternary kernel.
    kernel_threads: int = Field(2, ge=1, le=256, description="threads of the packed ternary kernel")
    kernel_path: str = Field("", description="force a kernel path (reference, avx2, avx512vnni, ...); "
                                             "empty = the best this CPU runs")

    # Topics and their layout. Item events travel in two lanes (docs/ARCHITECTURE.md): live
    # (POST /events, producers of new items) and bulk (replay, backfills, re-encodes); the worker
    # drains the live lane first.
    partitions: int = Field(3, ge=1, le=256, description="partitions per topic created at start-up")
    topic_item_events: str = Field("item-events", description="the live lane of item events")
    topic_item_backfill: str = Field("item-backfill", description="the bulk lane of item events")
    topic_user_events: str = "user-events"
    topic_item_embeddings: str = "item-embeddings"
    topic_dead_letter: str = "dead-letter"

    # Encoder worker micro-batching: a batch takes what is available up to max_batch (single items
    # when idle); only a bulk batch waits (max_wait_ms) to fill, and it is cut to about bulk_slice_ms of
    # encoding while live events flow, the longest a live event then waits behind one.
    max_batch: int = Field(32, ge=1, le=4096, description="largest micro-batch the worker encodes")
    max_wait_ms: float = Field(5.0, ge=0, description="longest a bulk micro-batch waits to fill")
    bulk_slice_ms: float = Field(20.0, gt=0, description="encoding time of one bulk batch while live "
                                                          "events flow")

    # Similar items: each replica keeps every item's nearest items (recommender/neighbours.py), so
    # that a request up to this k is answered without a scan; 0 = no lists, a scan per request.
    kept_neighbours: int = Field(100, ge=0, le=1000, description="similar items answered from kept "
                                                                 "lists up to this k (0: scan)")

    # The HTTP path: the longest a request waits for the broker or Redis before it answers 503.
    request_timeout_s: float = Field(1.5, gt=0, le=30, description="longest a request waits for Kafka or Redis")

    # Event limits: larger events are rejected (dead-lettered), never silently truncated.
    max_text_chars: int = Field(8000, ge=1, description="longest item text accepted")
    max_title_chars: int = Field(1000, ge=1, description="longest item title accepted")
    max_event_bytes: int = Field(64 * 1024, ge=1, description="largest serialized event accepted")

    # Where the Kafka broker jars are cached (outside the repo).
    kafka_home: Path = Field(
        Path.home() / ".cache" / "ternrec" / f"kafka-{KAFKA_VERSION}",
        description="directory holding the Kafka broker jars",
    )

    def item_topic(self, lane: str) -> str:
        """The topic of one lane of item events ("live" or "bulk")."""
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}; expected one of {', '.join(LANES)}")
        return self.topic_item_events if lane == "live" else self.topic_item_backfill

    @property
    def embedded_log(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def embedded_store(self) -> bool:
        return not self.redis_url

    @property
    def resolved_service_url(self) -> str:
        return self.service_url or f"http://{self.http_host}:{self.http_port}"

    @property
    def resolved_encoder(self) -> str:
        """The encoder spec for `encoder.load_encoder`: the configured one, else the bundled ternary
        model when present, else "" (load_encoder's default: the full-precision base model)."""
        if self.encoder:
            return self.encoder
        return str(BUNDLED_TERNARY_MODEL) if (BUNDLED_TERNARY_MODEL / "config.json").is_file() else ""


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Adds the connection flags every CLI shares; each overrides its environment variable."""
    parser.add_argument("--kafka-bootstrap", help="overrides TERNREC_KAFKA_BOOTSTRAP")
    parser.add_argument("--redis-url", help="overrides TERNREC_REDIS_URL")
    parser.add_argument("--encoder", help="overrides TERNREC_ENCODER")
    parser.add_argument("--partitions", type=int, help="overrides TERNREC_PARTITIONS")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name)
        for name in ("kafka_bootstrap", "redis_url", "encoder", "partitions", "http_port", "http_workers",
                     "ui_port")
        if getattr(args, name, None) is not None
    }
    return Settings(**overrides)
