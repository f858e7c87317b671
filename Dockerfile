# lightpath: one image for the node proxy (`lightpath run`, the DaemonSet)
# and the admission webhook (`lightpath webhook`, the hybrid Deployment).
#
# Build: docker build -t REGISTRY/lightpath:TAG .
# (Not built in this repository's CI: there is no container engine there.)

# --- build -------------------------------------------------------------
FROM rust:1.95-bookworm AS build
# cmake: for dependencies whose build scripts compile C code with it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p lightpath --bin lightpath \
 && install -D -m 0755 target/release/lightpath /out/lightpath

# --- runtime -----------------------------------------------------------
FROM debian:bookworm-slim
# nftables: `nft -f -` programs the TPROXY rules. iproute2: policy routing
# (`ip rule`, `ip route ... table`). ca-certificates: the API server's CA is
# mounted by Kubernetes, but outbound TLS elsewhere needs the system roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/lightpath /usr/local/bin/lightpath
# Root, on purpose: the node proxy needs CAP_NET_ADMIN (nftables, routing) and
# CAP_NET_RAW (IP_TRANSPARENT), and file capabilities on the binary would be
# dropped by `allowPrivilegeEscalation: false` (no_new_privs) for a non-root
# user. The DaemonSet drops every other capability and is not privileged.
# The webhook Deployment overrides this with runAsUser 65532 and no
# capabilities.
USER 0:0
ENTRYPOINT ["/usr/local/bin/lightpath"]
CMD ["--help"]
