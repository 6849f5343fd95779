// A real OpenID Connect provider (the `oidc-provider` package) for phigate's tests,
// on loopback over HTTPS, issuing JWT access tokens by client credentials.
//
//   node oidc-provider.mjs --port 9600 --cert c.pem --key k.pem --keys keys.json [--kid k2]
//
// --keys: private signing keys (JWKS); created with a new P-256 key (kid --kid, default
// "k1") when the file does not exist, so restarting with another file rotates keys.
// Clients (secret = "secret"): clinician-app (groups ["fhir-clinicians"]),
// billing-app (groups ["billing"]), plain-app (no groups), and 0oa7x1q9dana, whose
// subject is opaque as many providers' are, with an `email` claim naming its person.
// fhir-backend (secret "secret") and, with --smart-key PUB.pem, smart-backend, which
// authenticates with a signed JWT assertion (private_key_jwt, RFC 7523; SMART Backend
// Services) made with that key's private half: phigate's own upstream credentials.
// Resources: https://fhir-backend (aud fhir-backend, --backend-ttl seconds, default
// 4), https://patients-api (aud patients-api, 300 s), https://other-api
// (aud other-api), https://short-lived (aud patients-api, 1 s).
import https from 'node:https';
import fs from 'node:fs';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].slice(2)] = process.argv[i + 1];
const port = Number(args.port);
const issuer = `https://127.0.0.1:${port}`;

if (!fs.existsSync(args.keys)) {
  const { privateKey } = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: args.kid || 'k1', alg: 'ES256', use: 'sig' };
  fs.writeFileSync(args.keys, JSON.stringify({ keys: [jwk] }));
}
const jwks = JSON.parse(fs.readFileSync(args.keys, 'utf8'));

const GROUPS = {
  'clinician-app': ['fhir-clinicians'],
  'billing-app': ['billing'],
  'plain-app': [],
  '0oa7x1q9dana': ['fhir-clinicians'],
  'fhir-backend': ['backend'],
};
const EMAIL = { '0oa7x1q9dana': 'dana@hospital.test' };
const RESOURCES = {
  'https://fhir-backend': { audience: 'fhir-backend', ttl: Number(args['backend-ttl'] || 4) },
  'https://patients-api': { audience: 'patients-api', ttl: 300 },
  'https://other-api': { audience: 'other-api', ttl: 300 },
  'https://short-lived': { audience: 'patients-api', ttl: 1 },
};

const smart = args['smart-key']
  ? [{
    client_id: 'smart-backend',
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: 'ES384',
    id_token_signed_response_alg: 'ES256',
    jwks: { keys: [{ ...crypto.createPublicKey(fs.readFileSync(args['smart-key'])).export({ format: 'jwk' }), kid: 'smart-1', use: 'sig', alg: 'ES384' }] },
  }]
  : [];
GROUPS['smart-backend'] = ['backend'];

const provider = new Provider(issuer, {
  clients: smart.concat(Object.keys(GROUPS).filter((id) => id !== 'smart-backend').map((id) => ({
    client_id: id,
    client_secret: 'secret',
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_post',
    id_token_signed_response_alg: 'ES256',
  }))),
  jwks,
  // SMART Backend Services asks for ES384 or RS384 assertions.
  enabledJWA: { clientAuthSigningAlgValues: ['RS256', 'RS384', 'PS256', 'ES256', 'ES384', 'Ed25519', 'EdDSA'] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'https://patients-api',
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => {
        const r = RESOURCES[resource];
        if (!r) throw new Error(`unknown resource ${resource}`);
        return {
          scope: 'api',
          audience: r.audience,
          accessTokenTTL: r.ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'ES256' } },
        };
      },
    },
  },
  extraTokenClaims: async (ctx, token) => ({
    groups: GROUPS[token.clientId] ?? [],
    ...(EMAIL[token.clientId] ? { email: EMAIL[token.clientId] } : {}),
  }),
});

https
  .createServer({ cert: fs.readFileSync(args.cert), key: fs.readFileSync(args.key) }, provider.callback())
  .listen(port, '127.0.0.1', () => console.log(`oidc-provider ready on ${issuer}`));
