# Two stages: build with the full toolchain, run on a small image as a non-root user.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --locked --release --bin connector-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/connector-proxy /usr/local/bin/connector-proxy
COPY config/proxy.toml /etc/connector-proxy/proxy.toml
ENV CONNECTOR_PROXY_CONFIG=/etc/connector-proxy/proxy.toml
USER nonroot:nonroot
# Proxy listener and admin listener; the config must listen on a non-loopback address (and so
# set inbound_token for every org) to be reachable from outside the container.
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/connector-proxy"]
