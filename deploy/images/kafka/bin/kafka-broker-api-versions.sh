#!/bin/sh
# What the compose healthcheck calls, as in the official image.
exec "$(dirname "$0")/kafka-run-class.sh" kafka.admin.BrokerApiVersionsCommand "$@"
