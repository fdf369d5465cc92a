//! `client_auth = "client_secret_jwt"`: the client secret and the HMAC it keys.

use super::*;

impl Validator<'_> {
    /// `grant_signs`: the grant (jwt_bearer) uses `private_key` and `certificate`, and
    /// `client_assertion_alg` when it names a signature.
    pub(super) fn secret_jwt(
        &mut self,
        c: &RawConnector,
        place: &str,
        grant_signs: bool,
    ) -> Option<ClientAuth> {
        let ctx = "client_auth = \"client_secret_jwt\"";
        self.unused(
            place,
            ctx,
            &[
                ("certificate", c.certificate.is_some() && !grant_signs),
                ("private_key", c.private_key.is_some() && !grant_signs),
            ],
        );
        let alg = match c.client_assertion_alg.as_ref() {
            None => Some(AssertionAlg::HS256),
            // A signature algorithm is then the grant's.
            Some(alg) if grant_signs && alg.get_ref().hmac_key_bytes().is_none() => {
                Some(AssertionAlg::HS256)
            }
            Some(alg) if alg.get_ref().hmac_key_bytes().is_some() => Some(*alg.get_ref()),
            Some(alg) => {
                self.problem(Some(alg.span()), place, format!(
                    "client_assertion_alg {} signs with a private key (client_auth = \"private_key_jwt\"); client_secret_jwt takes HS256 (the default), HS384 or HS512",
                    alg.get_ref().name()
                ));
                None
            }
        };
        let source = self.required(
            &c.client_secret,
            place,
            "client_secret",
            ctx,
            "{ env = \"CLIENT_SECRET\" }",
        )?;
        let secret = self.secret(source, place, "client_secret")?;
        let alg = alg?;
        let needed = alg.hmac_key_bytes().unwrap_or_default();
        if secret.expose().len() < needed {
            // The message gives the sizes, never the secret.
            self.problem(Some(source.span()), place, format!(
                "client_secret is {} bytes, shorter than {needed}: RFC 7518 3.2 wants an {} key at least as long as its hash; use a longer secret or a shorter hash (client_assertion_alg)",
                secret.expose().len(),
                alg.name()
            ));
            return None;
        }
        Some(ClientAuth::SecretJwt { secret, alg })
    }
}
