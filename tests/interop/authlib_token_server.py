"""A token endpoint built on Authlib (PyPI), for the interop tests: the client credentials
grant, with clients authenticating by client_secret_jwt (RFC 7523, HMAC keyed by the secret),
and the JWT bearer grant (RFC 7523 2.1, an assertion signed with the client's key).

    python authlib_token_server.py CERT KEY TOKEN_URL CLIENTS_JSON

CLIENTS_JSON maps client ids to their secret (a string: client_secret_jwt) or to
{"public_key": PEM, "subject": ...} (the JWT bearer grant, for that subject only). Listens on
127.0.0.1 with TLS (CERT, KEY), prints "listening <port>", then
"issued <client_id> <access_token>" for each token it issues.
"""

import json
import ssl
import sys

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7523 import JWTBearerGrant
from joserfc.jwk import ECKey
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
        # A string (client_secret_jwt) or {"public_key", "subject"} (the JWT bearer grant).
        self.secret = secret if isinstance(secret, str) else None
        self.bearer = None if isinstance(secret, str) else secret

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
        if self.bearer is not None:
            return grant_type == JWTBearerGrant.GRANT_TYPE
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


class User:
    def __init__(self, subject):
        self.subject = subject

    def get_user_id(self):
        return self.subject


class JwtBearer(JWTBearerGrant):
    def resolve_issuer_client(self, issuer):
        return query_client(issuer)

    def resolve_client_public_key(self, client):
        return ECKey.import_key(client.bearer["public_key"])

    def authenticate_user(self, subject):
        return User(subject)

    def get_audiences(self):
        return [token_url]

    def has_granted_permission(self, client, user):
        return user.subject == client.bearer["subject"]


def query_client(client_id):
    secret = secrets.get(client_id)
    return Client(client_id, secret) if secret is not None else None


def save_token(token, request):
    print("issued", request.client.client_id, token["access_token"], flush=True)


app = Flask(__name__)
server = AuthorizationServer(app, query_client=query_client, save_token=save_token)
server.register_grant(ClientCredentials)
server.register_grant(JwtBearer)
server.register_client_auth_method(METHOD, SecretJwt())


@app.route("/token", methods=["POST"])
def issue_token():
    return server.create_token_response()


context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
http = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=context)
print("listening", http.server_port, flush=True)
http.serve_forever()
