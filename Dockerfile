# Two stages: build with the full toolchain, run on a small image as a non-root user.
#   docker build -t connector-proxy .
#   docker run --rm -p 8080:8080 -p 9090:9090 -e CONNECTOR_PROXY_DEMO_TOKEN=change-me \
#     -e CONNECTOR_PROXY_ADMIN_TOKEN=change-me-too connector-proxy
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --locked --release --bin connector-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/connector-proxy /usr/local/bin/connector-proxy
COPY config/container.toml /etc/connector-proxy/proxy.toml
ENV CONNECTOR_PROXY_CONFIG=/etc/connector-proxy/proxy.toml
# distroless nonroot: numeric, so that Kubernetes runAsNonRoot can check it.
USER 65532:65532
# 8080: the proxy listener; 9090: /metrics /healthz /readyz /status /reload.
EXPOSE 8080 9090
# The image has no shell or curl: the binary asks its own admin listener.
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/connector-proxy", "health"]
ENTRYPOINT ["/usr/local/bin/connector-proxy"]
