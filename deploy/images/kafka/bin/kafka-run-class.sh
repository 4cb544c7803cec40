#!/bin/sh
# Kafka's class launcher, reduced to what this image runs: a main class on the jars in /opt/kafka/libs,
# with the distribution's environment knobs and defaults (KAFKA_HEAP_OPTS, KAFKA_JVM_PERFORMANCE_OPTS,
# KAFKA_LOG4J_OPTS, KAFKA_OPTS).
base=$(dirname "$0")/..
exec java ${KAFKA_HEAP_OPTS:--Xmx256M} \
  ${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true} \
  ${KAFKA_LOG4J_OPTS:--Dlog4j.configuration=file:$base/config/tools-log4j.properties} \
  -Dkafka.logs.dir="$base/logs" $KAFKA_OPTS -cp "$base/libs/*" "$@"
