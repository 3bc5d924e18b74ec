#!/bin/sh
# Run once by the postgres image when its data volume is new (/docker-entrypoint-initdb.d).
# Grafana gets its own role that can only read: SELECT on every table and view the
# migrations create, now and later (default privileges of the owner role), nothing else.
set -eu
: "${GRAFANA_PG_PASSWORD:?set GRAFANA_PG_PASSWORD}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v ro_password="$GRAFANA_PG_PASSWORD" -v db="$POSTGRES_DB" -v owner="$POSTGRES_USER" <<'SQL'
CREATE ROLE grafana_ro LOGIN PASSWORD :'ro_password' NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
ALTER ROLE grafana_ro SET default_transaction_read_only = on;
GRANT CONNECT ON DATABASE :"db" TO grafana_ro;
GRANT USAGE ON SCHEMA public TO grafana_ro;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_ro;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO grafana_ro;
SQL
