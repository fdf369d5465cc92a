"""A token endpoint built on Authlib (PyPI), for the interop tests: the client credentials
grant, with clients authenticating by client_secret_jwt (RFC 7523, HMAC keyed by the secret).

    python authlib_token_server.py CERT KEY TOKEN_URL CLIENTS_JSON

CLIENTS_JSON maps client ids to their secrets. Listens on 127.0.0.1 with TLS (CERT, KEY), prints
"listening <port>", then "issued <client_id> <access_token>" for each token it issues.
"""

import json
import ssl
import sys

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from flask import Flask
from joserfc.jwk import OctKey
from werkzeug.serving import make_server

cert, key, token_url, clients_json = sys.argv[1:5]
secrets = json.loads(clients_json)
# The assertion methods go by one name in Authlib.
METHOD = JWTBearerClientAssertion.CLIENT_AUTH_METHOD


class Client:
    def __init__(self, client_id, secret):
        self.client_id = client_id
        self.secret = secret

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return None

    def get_allowed_scope(self, scope):
        return scope or ""

    def check_redirect_uri(self, redirect_uri):
        return False

    def check_client_secret(self, client_secret):
        # Never by the secret itself: only by an assertion it keys.
        return False

    def check_endpoint_auth_method(self, method, endpoint):
        return method == METHOD

    def check_response_type(self, response_type):
        return False

    def check_grant_type(self, grant_type):
        return grant_type == "client_credentials"


seen_jti = set()


class SecretJwt(JWTBearerClientAssertion):
    def get_audiences(self):
        return [token_url]

    def validate_jti(self, claims, jti):
        if jti in seen_jti:
            return False
        seen_jti.add(jti)
        return True

    def resolve_client_public_key(self, client):
        return OctKey.import_key(client.secret)


class ClientCredentials(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = [METHOD]


def query_client(client_id):
    secret = secrets.get(client_id)
    return Client(client_id, secret) if secret is not None else None


def save_token(token, request):
    print("issued", request.client.client_id, token["access_token"], flush=True)


app = Flask(__name__)
server = AuthorizationServer(app, query_client=query_client, save_token=save_token)
server.register_grant(ClientCredentials)
server.register_client_auth_method(METHOD, SecretJwt())


@app.route("/token", methods=["POST"])
def issue_token():
    return server.create_token_response()


context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
http = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=context)
print("listening", http.server_port, flush=True)
http.serve_forever()
