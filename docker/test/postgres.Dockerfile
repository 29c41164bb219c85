# PostgreSQL from Debian's package, for the compose tests on a machine that reaches no image registry.
# It reads POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB as the upstream postgres image does and keeps
# its cluster in the same volume path, /var/lib/postgresql/data.
ARG BASE_IMAGE=segq-test/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql \
    && (pg_dropcluster --stop 15 main || true) \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /run/postgresql && chmod 700 /var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
