# syntax=docker/dockerfile:1
# The wlcad runtime image: the package and its serving dependencies (no training extras, no GPU).
#
# Two stages. `build` turns the source into wheels: wlcad's own (build_hooks.py generates the wlcad.v1
# gRPC modules into it with the pinned grpcio-tools of pyproject's build-system) and one for every
# runtime dependency. `runtime` installs those wheels offline (--no-index) and nothing else: no source
# tree, no compiler, no grpc_tools, no codegen at start-up.
#
# Every runtime dependency is pinned (deploy/docker/constraints.txt, checked against pyproject by
# tests/test_deploy_images.py). The base is pinned by tag only: pinning a digest needs a registry lookup,
# which the machine this file was written on cannot make. Pin `python:3.11-slim-bookworm@sha256:…` when
# building for release.
#
# Runs as 10001:10001 and writes only to /tmp (HOME and every cache point there) and to /data, both
# declared volumes, so `docker run --read-only` and Kubernetes' readOnlyRootFilesystem work.
#
# One image, one command per role (`wlcad serve gateway|label-estimation|cade`): docs/deploy.md says
# why. The GPU variant (onnxruntime-gpu) is Dockerfile.gpu, built on top of this one.

FROM python:3.11-slim-bookworm AS build
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md build_hooks.py ./
COPY proto ./proto
COPY services ./services
COPY training ./training
COPY deploy/docker/constraints.txt ./constraints.txt
# the stack checks (`helm test`, compose's integration and load profiles) run from the image too
COPY deploy/checks ./checks
# The wheel must carry the generated modules and the runtime must not need grpcio-tools: check both here.
RUN pip wheel --no-cache-dir --constraint constraints.txt --wheel-dir /wheels . \
 && python -c "import glob, zipfile; wheel, = glob.glob('/wheels/wlcad-*.whl'); names = zipfile.ZipFile(wheel).namelist(); assert 'services/api/_generated/wlcad/v1/label_estimation_pb2_grpc.py' in names, 'wheel lacks the generated modules'" \
 && python -c "import glob; assert not glob.glob('/wheels/grpcio_tools-*'), 'grpcio-tools must not be a runtime dependency'"

FROM python:3.11-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    WLCAD_MODEL_REPOSITORY=/opt/wlcad/model_repository \
    WLCAD_DATA_DIR=/tmp/wlcad/samples \
    WLCAD_HEALTH_ADDRESS=127.0.0.1:50061
# The wheels are bind-mounted from the build stage, so they never become a layer of this image.
# Byte code is compiled here, as root, so that a read-only root never needs to write any.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
 && pip install --no-cache-dir --compile --no-index --find-links=/wheels /wheels/wlcad-*.whl \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('grpc_tools') is not None)" \
 && python -c "from services.api.pb import label_estimation_pb2; import services.servers.grpc_server" \
 && groupadd --system --gid 10001 wlcad \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin wlcad \
 && mkdir /data && chown 10001:10001 /data
COPY model_repository /opt/wlcad/model_repository
COPY --from=build /src/checks /opt/wlcad/checks
WORKDIR /data
VOLUME ["/tmp", "/data"]
USER 10001:10001
# label-estimation and cade gRPC with their /metrics; the gateway's gRPC and HTTP (`serve gateway`).
EXPOSE 50061 9101 50062 9102 50051 8080
# grpc.health.v1 Check of the overall status ("") at $WLCAD_HEALTH_ADDRESS: exit 0 only for SERVING,
# 1 for any other status or an RPC error (unreachable, deadline). For `serve gateway`, set
# WLCAD_HEALTH_ADDRESS=127.0.0.1:50051 (plaintext gRPC only: a TLS gateway needs its own check).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc\nfrom grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g\nwith grpc.insecure_channel(os.environ['WLCAD_HEALTH_ADDRESS']) as channel:\n    reply = g.HealthStub(channel).Check(h.HealthCheckRequest(), timeout=5)\nsys.exit(0 if reply.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["wlcad"]
CMD ["serve", "label-estimation", "--listen", "0.0.0.0:50061", "--metrics-listen", "0.0.0.0:9101"]
