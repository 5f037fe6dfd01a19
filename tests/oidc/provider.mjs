// The OpenID Connect provider of CloudTask's login tests (tests/test_oidc_login.py): the
// `oidc-provider` package (pinned in package.json) run by Node.js, on loopback only.
//
// One confidential client (authorization code flow, PKCE required), the accounts the test
// gives (a login name, a password, their claims: preferred_username, email, groups), a login
// page of its own at /interaction/<uid> that a real browser fills in, and consent granted
// at once (a first-party client). Signing keys are made at start.
//
// Configuration: the environment variable OIDC_TEST_CONFIG, JSON:
//   {"port": 8123, "issuer": "http://localhost:8123",
//    "client": {"client_id": "...", "client_secret": "...", "redirect_uris": ["..."]},
//    "accounts": {"erin": {"password": "...", "claims": {"groups": ["ops"], ...}}},
//    "conform_id_token_claims": true}
// It prints "listening <port>" once it serves. POST /test/accounts (JSON, the same form as
// "accounts") changes accounts while it runs.

import http from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';

import Provider from 'oidc-provider';

const config = JSON.parse(process.env.OIDC_TEST_CONFIG || '{}');
const { port, issuer, client, accounts = {} } = config;
if (!port || !issuer || !client) {
  console.error('OIDC_TEST_CONFIG needs port, issuer and client');
  process.exit(2);
}

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-key-1', use: 'sig', alg: 'RS256' };

const SCOPE = 'openid profile email groups';

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: client.client_id,
      client_secret: client.client_secret,
      redirect_uris: client.redirect_uris,
      response_types: ['code'],
      grant_types: ['authorization_code'],
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  pkce: { required: () => true },
  claims: {
    openid: ['sub'],
    profile: ['preferred_username', 'name'],
    email: ['email'],
    groups: ['groups'],
  },
  conformIdTokenClaims: config.conform_id_token_claims !== false,
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  jwks: { keys: [signingKey] },
  async findAccount(ctx, id) {
    const account = accounts[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, ...(account.claims || {}) };
      },
    };
  },
  // a first-party client: consent is given at once
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope(SCOPE);
    await grant.save();
    return grant;
  },
});

const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function loginPage(res, uid, message, status = 200) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/html; charset=utf-8');
  res.end(`<!doctype html><html><head><title>Test provider: sign in</title></head><body>
<h1>Test provider</h1>
${message ? `<p id="error">${escape(message)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}/login" id="provider-login">
  <label>Login <input name="login" autocomplete="username"></label>
  <label>Password <input name="password" type="password" autocomplete="current-password"></label>
  <button type="submit">Sign in</button>
</form></body></html>`);
}

async function body(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

const callback = provider.callback();

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, issuer);
    if (url.pathname === '/test/accounts' && req.method === 'POST') {
      // the test changes an account (its groups, say) while the provider runs
      const chunks = [];
      for await (const chunk of req) chunks.push(chunk);
      Object.assign(accounts, JSON.parse(Buffer.concat(chunks).toString('utf8')));
      res.statusCode = 204;
      res.end();
      return;
    }
    const match = url.pathname.match(/^\/interaction\/([A-Za-z0-9_-]+)(\/login)?$/);
    if (!match) {
      callback(req, res);
      return;
    }
    const details = await provider.interactionDetails(req, res);
    if (details.uid !== match[1]) {
      loginPage(res, match[1], 'this login is not the one in progress', 400);
      return;
    }
    if (!match[2]) {
      loginPage(res, details.uid, '');
      return;
    }
    const form = await body(req);
    const login = form.get('login') || '';
    const account = accounts[login];
    if (!account || account.password !== form.get('password')) {
      loginPage(res, details.uid, 'Invalid login or password', 401);
      return;
    }
    await provider.interactionFinished(
      req,
      res,
      { login: { accountId: login } },
      { mergeWithLastSubmission: false },
    );
  } catch (error) {
    res.statusCode = 500;
    res.setHeader('Content-Type', 'text/plain; charset=utf-8');
    res.end(`test provider error: ${error && error.message}`);
  }
});

server.listen(port, '127.0.0.1', () => {
  console.log(`listening ${port}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    process.exit(0);
  });
}
