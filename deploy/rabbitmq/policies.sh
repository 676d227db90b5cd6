#!/usr/bin/env bash
# RabbitMQ policies for Kiln's queues (see docs/amqp.md). Apply once per
# cluster (idempotent: `set_policy` replaces a policy of the same name).
#
#   deploy/rabbitmq/policies.sh [vhost]
#
# kiln-jobs: for the jobs queue (default name kiln.jobs):
#   - dead-letter to kiln.jobs.dlx (the same as the queue argument Kiln
#     declares; a policy lets operators change it without redeclaring);
#   - delivery-limit 5 (quorum queues only): a message redelivered more
#     than 5 times (it keeps crashing the nodes that take it) is
#     dead-lettered by the broker instead of being retried for ever.
# kiln-dead: dead letters are kept 14 days, at most 1 million of them.
set -euo pipefail
vhost=${1:-/}
rabbitmqctl set_policy -p "$vhost" --apply-to queues --priority 10 \
    kiln-jobs '^kiln\.jobs$' \
    '{"dead-letter-exchange":"kiln.jobs.dlx","delivery-limit":5}'
rabbitmqctl set_policy -p "$vhost" --apply-to queues --priority 10 \
    kiln-dead '^kiln\.jobs\.dead$' \
    '{"message-ttl":1209600000,"max-length":1000000,"overflow":"drop-head"}'
