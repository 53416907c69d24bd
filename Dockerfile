# syntax=docker/dockerfile:1
# weir's image, for deploy/base/daemonset.yaml. From the repository root:
#
#   docker build -t ghcr.io/weir-proxy/weir:0.1.0 .
#
# The builder compiles weir; its build script builds the embedded kube-default policy for
# wasm32-wasip2 on the way. The runtime is Debian slim with iproute2 and nftables: weir
# runs `ip` to create its capture interface, and `ip` and `nft` for the policy routing of
# proxy.transparent. No CA certificates: the in-cluster API server's CA
# comes with the service account.

FROM rust:1.95-bookworm AS build
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
# The target directory is a cache mount, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weir --bin weir \
    && cp target/release/weir /usr/local/bin/weir

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/weir /usr/local/bin/weir
ENTRYPOINT ["weir"]
CMD ["run", "--config", "/etc/weir/weir.toml"]
