# The environment of the local stack, for a shell: `source deploy/local/env.sh`.
# The Makefile exports the same defaults; every value can be overridden beforehand.
export KAFKA_BOOTSTRAP_SERVERS="${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:9092}"
export BILLING_PG_ADMIN_DSN="${BILLING_PG_ADMIN_DSN:-postgresql://billing_admin:billing_admin@127.0.0.1:5433/billing}"
