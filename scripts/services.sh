#!/usr/bin/env bash
# Make sure a Redis (and, with --postgres, a PostgreSQL) answers on this machine: start the
# installed server if it is down, install it from Debian's packages if it is missing (needs root).
set -euo pipefail
want_pg=0
[ "${1:-}" = "--postgres" ] && want_pg=1

have() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
  if [ "$(id -u)" != 0 ]; then echo "segq: install $* (apt-get install $*) or start it, then run again" >&2; exit 1; fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! (have redis-cli && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG); then
  have redis-server || apt_install redis-server redis-tools
  mkdir -p /tmp/segq-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --dir /tmp/segq-redis --save "" --appendonly no \
    --logfile /tmp/segq-redis/redis.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
fi
echo "redis: $(redis-cli -h 127.0.0.1 ping)"

if [ "$want_pg" = 1 ]; then
  if ! (have pg_isready && pg_isready -q -h 127.0.0.1 -p 5432); then
    have pg_ctlcluster || apt_install postgresql
    version=$(ls /etc/postgresql | sort -n | tail -1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
  fi
  # The tests connect over TCP as postgres to database `test`; make sure that database exists.
  if have psql && ! psql -h 127.0.0.1 -U postgres -d test -c "select 1" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && have runuser; then
      runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'" || true
      runuser -u postgres -- createdb test 2>/dev/null || true
      echo "postgres: set SEGQ_TEST_POSTGRES_URL=postgresql+psycopg2://postgres:postgres@127.0.0.1:5432/test" >&2
    fi
  fi
  echo "postgres: $(pg_isready -h 127.0.0.1 -p 5432)"
fi
