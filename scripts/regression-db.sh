#!/usr/bin/env bash
# Builds PostgreSQL's own regression database (what `make installcheck` leaves behind, the one
# pg_upgrade's test migrates) for the installed server version, once per machine, and caches it:
#
#   <cache>/regression.dump   pg_dump -Fc of the `regression` database
#   <cache>/roles.sql         the roles the suite leaves (pg_dumpall --roles-only)
#   <cache>/lib/              regress.so, autoinc.so, refint.so: the functions in the dump load
#                             them from here (the suite ran with --dlpath=<cache>/lib); test
#                             clusters set dynamic_library_path to it
#
# <cache> is $PGFERRY_CACHE_DIR/regression-<server version> (default /var/cache/pgferry as root,
# ~/.cache/pgferry otherwise). Prints
# <cache> on its last line. Needs root on Debian/Ubuntu the first time: it adds a deb-src entry,
# installs dpkg-dev and postgresql-server-dev-<major>, runs `apt-get source postgresql-<major>`,
# compiles regress.so against the server's headers and runs the suite (parallel schedule,
# --use-existing) on a throwaway cluster. Later runs find the cache and do nothing.
set -euo pipefail

bindir=${PGFERRY_PG_BINDIR:-}
if [ -z "$bindir" ]; then
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/postgres" ] && bindir=$d
    done
fi
if [ -z "$bindir" ] || [ ! -x "$bindir/postgres" ]; then
    echo "error: no PostgreSQL server binaries (set PGFERRY_PG_BINDIR, or apt-get install postgresql)" >&2
    exit 1
fi
version=$("$bindir/postgres" --version | awk '{print $3}')
major=${version%%.*}
# The server (running as postgres) loads the libraries from the cache: not under root's home.
if [ "$(id -u)" = 0 ]; then
    cache_root=${PGFERRY_CACHE_DIR:-/var/cache/pgferry}
else
    cache_root=${PGFERRY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pgferry}
fi
cache=$cache_root/regression-$version

if [ -s "$cache/regression.dump" ] && [ -s "$cache/lib/regress.so" ] && [ -f "$cache/roles.sql" ]; then
    echo "$cache"
    exit 0
fi

started=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/pgferry-regress.XXXXXX")
cluster_started=
cleanup() {
    if [ -n "$cluster_started" ]; then
        as_postgres "$bindir/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

as_postgres() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# 1. The source of the installed version, and the server headers.
export DEBIAN_FRONTEND=noninteractive
pkgver=$(dpkg-query -W -f='${Version}' "postgresql-$major" 2>/dev/null || true)
if [ -z "$pkgver" ]; then
    echo "error: package postgresql-$major is not installed; this script builds the regression database for Debian's server" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: the first run needs root (apt-get); later runs use the cache in $cache" >&2
    exit 1
fi
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
            >/etc/apt/sources.list.d/pgferry-deb-src.sources
    else
        sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >/etc/apt/sources.list.d/pgferry-deb-src.list
    fi
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends dpkg-dev "postgresql-server-dev-$major=$pkgver" >/dev/null
mkdir -p "$work/src"
(cd "$work/src" && apt-get source -qq "postgresql-$major=$pkgver" >/dev/null)
srcdir=$(find "$work/src" -maxdepth 1 -mindepth 1 -type d -name "postgresql-$major*" | head -n 1)
regress=$srcdir/src/test/regress

# 2. regress.so, built against the installed server's headers; autoinc and refint from the
# server's own library directory.
mkdir -p "$cache/lib"
incdir=$(/usr/lib/postgresql/"$major"/bin/pg_config --includedir-server 2>/dev/null || pg_config --includedir-server)
gcc -O2 -fPIC -shared -I"$incdir" -o "$cache/lib/regress.so" "$regress/regress.c"
pkglibdir=$(/usr/lib/postgresql/"$major"/bin/pg_config --pkglibdir 2>/dev/null || pg_config --pkglibdir)
cp "$pkglibdir/autoinc.so" "$pkglibdir/refint.so" "$cache/lib/"
chmod -R a+rX "$cache"

# 3. A throwaway cluster, the suite against it with --use-existing.
chmod a+rx "$work"
chown -R postgres "$work"
chmod -R a+rX "$srcdir"
port=$(( 20000 + RANDOM % 20000 ))
as_postgres "$bindir/initdb" -D "$work/data" -A trust -U postgres --no-instructions >/dev/null
cat >>"$work/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$work'
port = $port
max_connections = 50
fsync = off
dynamic_library_path = '$cache/lib:\$libdir'
EOF
as_postgres "$bindir/pg_ctl" -D "$work/data" -l "$work/server.log" -w start >/dev/null
cluster_started=1
as_postgres "$bindir/psql" -h "$work" -p "$port" -U postgres -X -q -d postgres \
    -c "CREATE DATABASE regression TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'" \
    -c "ALTER DATABASE regression SET lc_messages TO 'C'" -c "ALTER DATABASE regression SET lc_monetary TO 'C'" \
    -c "ALTER DATABASE regression SET lc_numeric TO 'C'" -c "ALTER DATABASE regression SET lc_time TO 'C'" \
    -c "ALTER DATABASE regression SET bytea_output TO 'hex'" -c "ALTER DATABASE regression SET timezone_abbreviations TO 'Default'"
mkdir -p "$work/out/testtablespace"
chown -R postgres "$work/out"
pg_regress=$(dirname "$(/usr/lib/postgresql/"$major"/bin/pg_config --pgxs)")/../test/regress/pg_regress
set +e
(cd "$work/out" && as_postgres "$pg_regress" --use-existing --host="$work" --port="$port" --user=postgres \
    --bindir="$bindir" --dlpath="$cache/lib" --inputdir="$regress" --outputdir="$work/out" \
    --schedule="$regress/parallel_schedule" --max-connections=8 >"$work/out/pg_regress.log" 2>&1)
status=$?
set -e
summary=$(grep -E 'tests (passed|failed)|of [0-9]+ tests' "$work/out/pg_regress.log" | tail -n 1 || true)
echo "pg_regress (exit $status): ${summary:-see its log}" >&2
# Some tests fail on a server built with other options than the source's defaults; what matters is
# the database they leave. It must be there and full.
tables=$(as_postgres "$bindir/psql" -h "$work" -p "$port" -U postgres -X -At -d regression \
    -c "SELECT count(*) FROM pg_class WHERE relkind IN ('r', 'p') AND relnamespace::regnamespace::text NOT IN ('pg_catalog', 'information_schema')")
if [ "${tables:-0}" -lt 300 ]; then
    echo "error: the regression database has only ${tables:-0} tables; the suite did not run:" >&2
    tail -n 40 "$work/out/pg_regress.log" >&2
    exit 1
fi

# 4. The cache.
as_postgres "$bindir/pg_dump" -h "$work" -p "$port" -U postgres -Fc -f "$work/regression.dump" regression
as_postgres "$bindir/pg_dumpall" -h "$work" -p "$port" -U postgres --roles-only -f "$work/roles.sql"
mv "$work/regression.dump" "$work/roles.sql" "$cache/"
chmod a+r "$cache/regression.dump" "$cache/roles.sql"
echo "regression database: $tables tables, built in $(( $(date +%s) - started )) s" >&2
echo "$cache"
