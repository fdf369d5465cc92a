# Shared by benches/load.sh and benches/instructions.sh (sourced, not run).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

# make_certs DIR: a test CA (DIR/ca.pem) and a certificate for crm.example.com (DIR/crm.pem,
# DIR/crm.key), for this run only.
make_certs() {
    local dir=$1
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=crm.example.com" \
        -keyout "$dir/crm.key" -out "$dir/crm.csr" 2>/dev/null
    printf 'subjectAltName=DNS:crm.example.com\n' >"$dir/ext"
    openssl x509 -req -in "$dir/crm.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
        -days 2 -extfile "$dir/ext" -out "$dir/crm.pem" 2>/dev/null
}

# basic_config FILE LISTEN_PORT ADMIN_PORT UPSTREAM_PORT USERNAME PASSWORD: a connector-proxy
# configuration with one Basic connector, `basic`, for crm.example.com pinned to the upstream.
basic_config() {
    cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"

[upstream]
extra_ca_file = "ca.pem"
allow_networks = ["127.0.0.0/8"]
resolve = { "crm.example.com:443" = "127.0.0.1:$4" }

[orgs.bench.connectors.basic]
auth = "basic"
resource_domain = "https://crm.example.com"
username = "$5"
password = "$6"
EOF
}

# oauth_connector FILE NAME TOKEN_PATH: appends a client-credentials connector NAME for
# crm.example.com whose token endpoint is the upstream's TOKEN_PATH.
oauth_connector() {
    cat >>"$1" <<EOF

[orgs.bench.connectors.$2]
auth = "oauth2"
grant = "client_credentials"
resource_domain = "https://crm.example.com"
token_url = "https://crm.example.com$3"
client_id = "bench"
client_secret = "bench-secret"
EOF
}
