"""The recommender HTTP service: `python -m recommender.service` (FastAPI + uvicorn).

Thin routes over `recommender.core.Recommender` (docs/ARCHITECTURE.md, seams):
`GET /items/{item_id}/similar?k=`, `GET /users/{user_id}/recommendations?k=`, `POST /events`,
`GET /health` (with `index_size`), `GET /metrics` (Prometheus text), and `GET /stats` (recent
latency and freshness percentiles for the UI).
"""


import argparse
import logging
import os
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from ingest.schema import InvalidEvent
from ingest.settings import Settings, add_settings_flags, settings_from_args
from recommender.core import MAX_K, Recommender, UnknownItem
from recommender.stopping import StopRequested, abort_on_signal

log = logging.getLogger("recommender.service")
GRACEFUL_SHUTDOWN_S = 3  # in-flight requests after SIGTERM, then the runtime stops (bounded too)


class ResultItem(BaseModel, extra="allow"):
    item_id: str
    score: float
    title: str


class Results(BaseModel, extra="allow"):
    items: list[ResultItem]
    latency_ms: dict[str, float]


class Accepted(BaseModel):
    event_id: str
    ts: float
    type: str
    topic: str


K = Annotated[int, Query(ge=1, le=MAX_K, description=f"how many results, 1 to {MAX_K}")]
Id = Annotated[str, Path(min_length=1, max_length=256)]


def create_app(recommender: Recommender) -> FastAPI:
    app = FastAPI(title="ternrec recommender", version="0.1.0")

    def core() -> Recommender:
        return recommender

    Core = Annotated[Recommender, Depends(core)]

    @app.get("/items/{item_id}/similar", response_model=Results)
    def similar(item_id: Id, rec: Core, k: K = 10):
        try:
            return rec.similar(item_id, k).to_dict()
        except UnknownItem as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/users/{user_id}/recommendations", response_model=Results)
    def recommendations(user_id: Id, rec: Core, k: K = 10):
        return rec.recommend(user_id, k).to_dict()

    @app.post("/events", status_code=202, response_model=Accepted)
    def events(rec: Core, body: Annotated[Any, Body()]):
        try:
            event = rec.submit(body)
        except InvalidEvent as exc:
            raise HTTPException(422, f"invalid event: {exc}") from None
        return Accepted(event_id=event.event_id, ts=event.ts, type=event.type, topic=rec.topic_of(event))

    @app.get("/health")
    def health(rec: Core):
        status = rec.health()
        return JSONResponse(status, status_code=200 if status["status"] == "ok" else 503)

    @app.get("/stats")
    def stats(rec: Core, window_s: Annotated[float, Query(gt=0, le=3600)] = 60.0):
        return {**rec.metrics.snapshot(window_s), "freshness_series": rec.metrics.freshness_series(),
                "index_size": len(rec.index)}

    @app.get("/metrics")
    def metrics(rec: Core):
        return Response(rec.metrics.prometheus_text(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(ValueError)
    def bad_value(_: Request, exc: ValueError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    return app


def app_from_environment() -> FastAPI:
    """One replica: its own index (bootstrapped from Redis, fed by item-embeddings) and routes.

    The factory uvicorn calls in each worker process when TERNREC_HTTP_WORKERS > 1.
    """
    from contextlib import asynccontextmanager

    from recommender.runtime import Runtime

    try:
        with abort_on_signal():  # uvicorn only watches its signals once the app is loaded
            runtime = Runtime(Settings())
            runtime.start()
    except StopRequested as exc:
        log.info("%s: not started", exc)
        raise SystemExit(0) from None  # asked to stop: a clean exit, not a start-up failure
    log.info("replica ready (pid %d, index: %d items)", os.getpid(), len(runtime.index))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        runtime.stop()

    app = create_app(runtime.recommender)
    app.router.lifespan_context = lifespan
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve similar-item and per-user recommendations.")
    add_settings_flags(parser)
    parser.add_argument("--http-port", type=int, help="overrides TERNREC_HTTP_PORT")
    parser.add_argument("--http-workers", type=int, help="overrides TERNREC_HTTP_WORKERS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings_from_args(args)
    if settings.embedded_log and settings.http_workers > 1:
        parser.error("several HTTP workers need a shared event log: set TERNREC_KAFKA_BOOTSTRAP and TERNREC_REDIS_URL")
    import uvicorn

    # Replicas are processes: each has its own index and its own GIL, so they use every core.
    for name in ("kafka_bootstrap", "redis_url", "encoder", "partitions", "http_port", "http_workers"):
        os.environ[f"TERNREC_{name.upper()}"] = str(getattr(settings, name))
    log.info("serving on http://%s:%d with %d replica(s)", settings.http_host, settings.http_port,
             settings.http_workers)
    uvicorn.run("recommender.service:app_from_environment", factory=True, host=settings.http_host,
                port=settings.http_port, workers=settings.http_workers, log_level="warning", access_log=False,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


if __name__ == "__main__":
    main()
