#!/bin/sh
# Creates Temporal's two databases and brings their schemas to the version this admin-tools image
# ships. Safe to re-run on every `up`: setup-schema keeps a newer version, update-schema applies
# only what is missing.
set -eu

SCHEMA_ROOT=/etc/temporal/schema/postgresql/v12
sql() {
    temporal-sql-tool --plugin postgres12 --ep "$SQL_HOST" -p "$SQL_PORT" -u "$SQL_USER" "$@"
}

for db in "$TEMPORAL_DB" "$TEMPORAL_VISIBILITY_DB"; do
    # PostgreSQL has no CREATE DATABASE IF NOT EXISTS: a failure here means the database exists
    # (a real connection problem fails setup-schema right after).
    sql --db "$db" create || echo "database $db already exists"
done

sql --db "$TEMPORAL_DB" setup-schema -v 0.0
sql --db "$TEMPORAL_DB" update-schema -d "$SCHEMA_ROOT/temporal/versioned"
sql --db "$TEMPORAL_VISIBILITY_DB" setup-schema -v 0.0
sql --db "$TEMPORAL_VISIBILITY_DB" update-schema -d "$SCHEMA_ROOT/visibility/versioned"
echo "temporal schema ready"
