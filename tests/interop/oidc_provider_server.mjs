// A token endpoint built on oidc-provider (npm), for the interop tests: the client credentials
// grant, with clients authenticating by client_secret_jwt (RFC 7523, HMAC keyed by the secret).
//
//   node oidc_provider_server.mjs NODE_MODULES CERT KEY ISSUER CLIENTS_JSON
//
// CLIENTS_JSON maps client ids to { secret, alg }. Listens on 127.0.0.1 with TLS (CERT, KEY),
// prints "listening <port>", then "issued <client_id>" for each token it issues.
import fs from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const [modules, cert, key, issuer, clientsJson] = process.argv.slice(2);
const entry = path.join(modules, 'oidc-provider', 'lib', 'index.js');
const { default: Provider } = await import(pathToFileURL(entry).href);

const clients = Object.entries(JSON.parse(clientsJson)).map(([id, { secret, alg }]) => ({
  client_id: id,
  client_secret: secret,
  grant_types: ['client_credentials'],
  redirect_uris: [],
  response_types: [],
  token_endpoint_auth_method: 'client_secret_jwt',
  token_endpoint_auth_signing_alg: alg,
}));

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
provider.on('client_credentials.saved', (token) => {
  console.log(`issued ${token.clientId}`);
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
