// A token endpoint built on oidc-provider (npm), for the interop tests:
//
// - the client credentials grant, with clients authenticating by client_secret_jwt (RFC 7523,
//   HMAC keyed by the secret): CLIENTS_JSON entries { secret, alg };
// - the JWT bearer grant (RFC 7523 2.1) for clients authenticating by client_secret_basic on top:
//   entries { secret, bearer: { public_key, subject } }. oidc-provider has no such grant of its
//   own; it is registered through its extension point (`registerGrantType`), and the assertion
//   is verified by `jose` (the JOSE library oidc-provider is built on): signature, `iss` = the
//   client, `sub` = the subject the client may act for, `aud` = the token URL, `exp`, `jti`.
//   oidc-provider authenticates the client, checks the grant is allowed to it and mints the
//   token.
//
//   node oidc_provider_server.mjs NODE_MODULES CERT KEY ISSUER CLIENTS_JSON
//
// Listens on 127.0.0.1 with TLS (CERT, KEY), prints "listening <port>", then
// "issued <client_id> <access token>" for each token it issues.
import { createPublicKey } from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const [modules, cert, key, issuer, clientsJson] = process.argv.slice(2);
const load = (relative) => import(pathToFileURL(path.join(modules, relative)).href);
const { default: Provider, errors } = await load('oidc-provider/lib/index.js');
const { jwtVerify } = await load('jose/dist/webapi/index.js');

const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const tokenUrl = `${issuer}/token`;
const bearers = new Map();

const clients = Object.entries(JSON.parse(clientsJson)).map(([id, { secret, alg, bearer }]) => {
  if (bearer) {
    bearers.set(id, { key: createPublicKey(bearer.public_key), subject: bearer.subject });
    return {
      client_id: id,
      client_secret: secret,
      grant_types: [JWT_BEARER],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_basic',
    };
  }
  return {
    client_id: id,
    client_secret: secret,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_jwt',
    token_endpoint_auth_signing_alg: alg,
  };
});

const provider = new Provider(issuer, {
  clients,
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: false },
  },
  // Tokens for the test's API, not for the userinfo endpoint.
  scopes: ['api'],
  // HS384 and HS512 besides the default HS256.
  enabledJWA: {
    clientAuthSigningAlgValues: ['HS256', 'HS384', 'HS512', 'RS256', 'PS256', 'ES256'],
  },
});

provider.registerGrantType(
  JWT_BEARER,
  async (ctx) => {
    const { client, params } = ctx.oidc;
    const bearer = bearers.get(client.clientId);
    let claims;
    try {
      ({ payload: claims } = await jwtVerify(params.assertion, bearer.key, {
        issuer: client.clientId,
        subject: bearer.subject,
        audience: tokenUrl,
        requiredClaims: ['exp', 'jti'],
        maxTokenAge: '5 minutes',
      }));
    } catch (error) {
      throw new errors.InvalidGrant(`assertion refused: ${error.message}`);
    }
    const token = new provider.ClientCredentials({ client, scope: params.scope || undefined });
    const value = await token.save();
    console.log(`assertion ${client.clientId} sub=${claims.sub} jti=${claims.jti}`);
    ctx.body = {
      access_token: value,
      expires_in: token.expiration,
      token_type: token.tokenType,
    };
  },
  ['assertion', 'scope'],
);

// Opaque access tokens: the value is the token's jti.
provider.on('client_credentials.saved', (token) => {
  console.log(`issued ${token.clientId} ${token.jti}`);
});
provider.on('server_error', (ctx, error) => console.error('server_error', error));
provider.on('grant.error', (ctx, error) => console.error('grant.error', error.message, error.error_description));

const server = https.createServer(
  { cert: fs.readFileSync(cert), key: fs.readFileSync(key) },
  provider.callback(),
);
server.listen(0, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
