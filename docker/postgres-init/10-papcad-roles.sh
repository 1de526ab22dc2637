#!/bin/sh
# Runs once, when the PostgreSQL volume is first created (docker-entrypoint-initdb.d).
# papcad_owner owns the database and its schema and runs the migrations; papcad_app is what the
# server and workers connect as: each upgrade grants it SELECT/INSERT/UPDATE/DELETE on the tables
# and only SELECT/INSERT on audit_events, and it owns nothing, so it cannot disable triggers,
# truncate, alter or drop.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v db="$POSTGRES_DB" -v owner_pw="$PAPCAD_OWNER_PASSWORD" -v app_pw="$PAPCAD_APP_PASSWORD" <<'SQL'
CREATE ROLE papcad_owner LOGIN PASSWORD :'owner_pw';
CREATE ROLE papcad_app LOGIN PASSWORD :'app_pw';
ALTER DATABASE :"db" OWNER TO papcad_owner;
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO papcad_app;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT CREATE, USAGE ON SCHEMA public TO papcad_owner;
GRANT USAGE ON SCHEMA public TO papcad_app;
SQL
