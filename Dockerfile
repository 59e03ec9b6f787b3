# The ociworker worker image: `ociworker serve` with runc, crun, fuse-overlayfs and the
# rootless tools, the package in a venv at /opt/ociworker.
#
#   scripts/make-debian-base    # Debian bookworm base -> 127.0.0.1:5000/debian:bookworm
#   scripts/make-wheelhouse     # the Python wheels -> wheelhouse/ (PyPI is not reachable in RUN)
#   ociworker build -t ociworker:dev --build-arg REVISION="$(git rev-parse HEAD)" .
#   # or: DOCKER_BUILDKIT=1 docker build --network=host ... (the same file tree)
#
# Both tools build this file to the same file tree (integration/test_worker_image.py), so
# nothing here may depend on the builder: no BuildKit-only syntax beyond what dockerd 20.10's
# builtin frontend knows, no timestamps in files (SOURCE_DATE_EPOCH makes pycs hash-based and
# shadow's dates fixed).
#
# Run it privileged (a worker makes mounts, namespaces and cgroups):
#   docker run -d --privileged --name ow -v ow-state:/var/lib/ociworker ociworker:dev
#   docker exec ow ociworker info

ARG BASE=127.0.0.1:5000/debian:bookworm

FROM ${BASE} AS venv
ARG SOURCE_DATE_EPOCH=1747699200
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    /var/log/alternatives.log /var/cache/ldconfig/aux-cache
COPY wheelhouse /wheelhouse
COPY pyproject.toml README.md /src/
COPY src /src/src
# --no-index: every wheel, the build backend's too, comes from the wheelhouse. The pycs pip
# writes are checked-hash ones (SOURCE_DATE_EPOCH is set), so they do not record the mtime of
# the moment each file was unpacked.
RUN python3 -m venv /opt/ociworker \
 && /opt/ociworker/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse /src \
 && /opt/ociworker/bin/pip uninstall --yes pip setuptools \
 && /opt/ociworker/bin/ociworker --version

FROM ${BASE}
ARG SOURCE_DATE_EPOCH=1747699200
ARG VERSION=0.1.0
ARG REVISION=unknown
# The project has no public home yet: override both at release.
ARG SOURCE=https://github.com/ociworker/ociworker
# runc, crun: OCI runtimes; fuse-overlayfs, uidmap, passt, slirp4netns: rootless mode;
# iproute2, nftables: the sandbox network of RUN steps; git, openssh-client: git contexts.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
    python3 runc crun uidmap fuse-overlayfs passt slirp4netns iproute2 nftables \
    git openssh-client ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    /var/log/alternatives.log /var/cache/ldconfig/aux-cache \
 && useradd --create-home --uid 1000 --user-group --shell /bin/bash ociworker \
 && mkdir -p /var/lib/ociworker /run/ociworker
COPY --from=venv /opt/ociworker /opt/ociworker
RUN ln -s /opt/ociworker/bin/ociworker /usr/local/bin/ociworker
LABEL org.opencontainers.image.title="ociworker" \
      org.opencontainers.image.description="A BuildKit-class container image builder: the worker daemon (ociworker serve)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.url="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
VOLUME /var/lib/ociworker
# `ociworker serve` listens on unix:///run/ociworker/ociworker.sock, the client's default, so
# `docker exec CONTAINER ociworker ...` reaches it; share /run/ociworker to reach it from outside.
# TCP needs mutual TLS: add --addr tcp://0.0.0.0:1234 --tlscacert ... --tlscert ... --tlskey ...
ENTRYPOINT ["ociworker", "serve"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD ["ociworker", "info"]
