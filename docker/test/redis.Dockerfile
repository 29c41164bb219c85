# Redis from Debian's package, for the compose tests on a machine that reaches no image registry.
# docker-compose.yml gives the command (AOF, noeviction, password); this image only supplies redis-server
# and redis-cli, and /data for the AOF like the upstream redis image.
ARG BASE_IMAGE=segq-test/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
