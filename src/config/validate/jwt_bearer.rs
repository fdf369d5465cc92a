//! `grant = "jwt_bearer"` (RFC 7523 2.1): the signing key, the subject, and the assertion's
//! issuer and audience.

use super::*;

impl Validator<'_> {
    pub(super) fn jwt_bearer(
        &mut self,
        c: &RawConnector,
        place: &str,
        client_id: Option<&str>,
        token_url: Option<&Uri>,
    ) -> Option<Grant> {
        const G: &str = "grant = \"jwt_bearer\"";
        self.unused(
            place,
            G,
            &[
                ("username", c.username.is_some()),
                ("password", c.password.is_some()),
            ],
        );
        let subject = self.required(&c.subject, place, "subject", G, "\"svc@example.com\"");
        let key = self.required(
            &c.private_key,
            place,
            "private_key",
            G,
            "{ file = \"certs/signing-key.pem\" }",
        );
        let (subject, key) = (subject?, key?);
        let key_pem = self.secret(key, place, "private_key")?;
        let key_der = self.private_key_der(&key_pem, key, place)?;
        // The certificate is optional: where it is given, its thumbprints identify the key.
        let cert_chain = match &c.certificate {
            None => Vec::new(),
            Some(cert) => {
                let pem = self.secret(cert, place, "certificate")?;
                self.certificates(&pem, cert, place)?
            }
        };
        let identity = ClientIdentity {
            cert_chain,
            key: key_der,
        };
        // client_assertion_alg where it names a signature; an HMAC one is client_secret_jwt's.
        let wanted = c
            .client_assertion_alg
            .as_ref()
            .map(|a| *a.get_ref())
            .filter(|a| a.scheme().is_some());
        let alg = self.assertion_alg(&identity, wanted, place)?;
        let issuer = c
            .issuer
            .as_ref()
            .map(|i| i.get_ref().clone())
            .or_else(|| client_id.map(str::to_owned))?;
        let audience = c
            .audience
            .as_ref()
            .map(|a| a.get_ref().clone())
            .or_else(|| token_url.map(ToString::to_string))?;
        Some(Grant::JwtBearer(Box::new(JwtBearer {
            key: identity,
            alg,
            issuer,
            subject: subject.get_ref().clone(),
            audience,
        })))
    }
}
