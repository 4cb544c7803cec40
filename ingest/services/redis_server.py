"""A real `redis-server` on 127.0.0.1: `LocalRedis`."""

from __future__ import annotations

import os
import shutil
from urllib.parse import quote

from ingest.services.lifecycle import LocalService
from ingest.services.process import HOST, ServiceError


class LocalRedis(LocalService):
    """A `redis-server` on 127.0.0.1, optionally with a password, persisting to an append-only
    file so that `restart()` (same port, same data dir) keeps the data."""

    name = "redis"
    stop_timeout = 10.0

    def __init__(
        self,
        *,
        port: int = 0,
        password: str | None = None,
        data_dir: str | os.PathLike | None = None,
        appendfsync: str = "everysec",
        startup_timeout: float = 20.0,
        extra_config: dict[str, str | int] | None = None,
    ) -> None:
        super().__init__(data_dir, startup_timeout)
        self.port = port
        self._fixed = frozenset({"port"} if port else ())
        self.password = password
        self.appendfsync = appendfsync
        self.extra_config = dict(extra_config or {})

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    def client(self, **kwargs):
        """A redis-py client for this server (the caller closes it)."""
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

    def _prepare(self) -> None:
        cfg: dict[str, str | int] = {
            "bind": HOST,
            "port": self.port,
            "protected-mode": "yes",
            "daemonize": "no",
            "dir": str(self.data_dir),
            "logfile": '""',  # stdout, which goes to redis.out
            # Durability across restart(): AOF (flushed on SIGTERM) rather than RDB snapshots,
            # so even a SIGKILL loses at most `appendfsync` worth of writes.
            "appendonly": "yes",
            "appendfsync": self.appendfsync,
            "save": '""',
        }
        if self.password:
            cfg["requirepass"] = self.password
        cfg.update(self.extra_config)
        # A config file, not argv: the password stays out of `ps`.
        conf = self.data_dir / "redis.conf"
        conf.write_text("".join(f"{k} {v}\n" for k, v in cfg.items()))
        conf.chmod(0o600)

    def _command(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise ServiceError("redis-server not found: install it (make system-deps)")
        return [exe, str(self.data_dir / "redis.conf")]

    def _ready(self) -> bool:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:
            # No client-side retries: this loop is the retry, and it must see each failure at once.
            with redis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=1.0,
                             retry=Retry(NoBackoff(), 0)) as r:  # fmt: skip
                r.ping()  # raises BusyLoadingError while the AOF is replayed
                # Someone else may own the port (our server then exits on the bind error):
                # only our own process counts as ready.
                return int(r.info("server")["process_id"]) == self.pid
        except redis.RedisError:
            return False

