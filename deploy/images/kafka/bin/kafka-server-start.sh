#!/bin/sh
# kafka-server-start.sh CONFIG: the broker, with the distribution's heap and log4j defaults.
base=$(dirname "$0")/..
export KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}"
export KAFKA_LOG4J_OPTS="${KAFKA_LOG4J_OPTS:--Dlog4j.configuration=file:$base/config/log4j.properties}"
exec "$base/bin/kafka-run-class.sh" kafka.Kafka "$@"
