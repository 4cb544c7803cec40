"""Real local services: a single-node Apache Kafka broker (KRaft) and a `redis-server`.

The one package that starts and stops real services, one module per concern:
- `process`: child processes that die with their parent (PR_SET_PDEATHSIG, own process group),
  stop by PID, free ports, temp data dirs; also what `make stack` starts its services with;
- `lifecycle`: `LocalService`, the start / readiness / stop / restart cycle both services share;
- `kafka_broker`: the broker jars from Maven Central and `LocalKafka`;
- `redis_server`: `LocalRedis`;
- `__main__`: `python -m ingest.services fetch-kafka | up`.
"""

from ingest.services.kafka_broker import LocalKafka, fetch_kafka_jars, kafka_jars_ready
from ingest.services.process import HOST, ServiceError, free_port, pid_alive
from ingest.services.redis_server import LocalRedis

__all__ = ["HOST", "LocalKafka", "LocalRedis", "ServiceError", "fetch_kafka_jars", "free_port",
           "kafka_jars_ready", "pid_alive"]
