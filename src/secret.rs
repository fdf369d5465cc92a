//! Secrets and where they come from.
//!
//! A [`Secret`] never prints itself: `Debug` and `Display` are constants, so a secret that ends
//! up in a log line, an error or `/status` by accident shows as `[redacted]`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use subtle::ConstantTimeEq;

/// A secret value, loaded once at configuration time.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The only way to read the value; grep for it to audit every use.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this secret. Constant-time in the content; only the length can
    /// be learnt from timing.
    pub fn matches(&self, presented: &[u8]) -> bool {
        presented.ct_eq(self.0.as_bytes()).into()
    }
}

/// The token of an `Authorization`-style value `Bearer <token>` (the scheme in any case), or
/// `None` when it has another scheme or none.
pub fn bearer_token(value: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    let (scheme, token) = split_scheme(value)?;
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then_some(std::borrow::Cow::Borrowed(token))
}

/// The password of `Basic base64(user:password)`, any user: how a browser, prompted by
/// `WWW-Authenticate: Basic`, sends a token typed as the password.
pub fn basic_password(value: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    use base64::Engine as _;
    let (scheme, encoded) = split_scheme(value)?;
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(std::borrow::Cow::Owned(decoded[colon + 1..].to_vec()))
}

fn split_scheme(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    Some((scheme, rest.trim_ascii()))
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret-bearing field takes its value from: `"literal"`, `{ env = "NAME" }` or
/// `{ file = "path" }` (relative to the configuration file's folder).
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    Literal(Secret),
    Env(String),
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Literal(_) => f.write_str("Literal([redacted])"),
            Self::Env(name) => write!(f, "Env({name:?})"),
            Self::File(path) => write!(f, "File({path:?})"),
        }
    }
}

/// Why a secret could not be loaded. Never carries the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "environment variable {0} is not set (set it, or use a literal or {{ file = \"..\" }})"
    )]
    EnvMissing(String),
    #[error("environment variable {0} is not valid UTF-8")]
    EnvNotUnicode(String),
    #[error("cannot read secret file {}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret is empty")]
    Empty,
}

impl SecretSource {
    /// Loads the value. A file's trailing newline is dropped, as `echo secret > file` adds one.
    pub fn load(&self, base_dir: &Path) -> Result<Secret, SecretError> {
        let value = match self {
            Self::Literal(secret) => secret.clone(),
            Self::Env(name) => match std::env::var(name) {
                Ok(v) => Secret(v),
                Err(std::env::VarError::NotPresent) => {
                    return Err(SecretError::EnvMissing(name.clone()));
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(SecretError::EnvNotUnicode(name.clone()));
                }
            },
            Self::File(path) => {
                let path = base_dir.join(path);
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| SecretError::File { path, source })?;
                Secret(text.trim_end_matches(['\r', '\n']).to_owned())
            }
        };
        if value.0.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(value)
    }
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SourceVisitor;

        impl<'de> Visitor<'de> for SourceVisitor {
            type Value = SecretSource;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a string, { env = "NAME" } or { file = "path" }"#)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretSource, E> {
                Ok(SecretSource::Literal(Secret(v.to_owned())))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSource, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        r#"empty table: write { env = "NAME" } or { file = "path" }"#,
                    ));
                };
                let source = match key.as_str() {
                    "env" => SecretSource::Env(map.next_value()?),
                    "file" => SecretSource::File(map.next_value::<String>()?.into()),
                    other => return Err(de::Error::unknown_field(other, &["env", "file"])),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "a secret takes one source, found `{key}` and `{extra}`"
                    )));
                }
                Ok(source)
            }
        }

        deserializer.deserialize_any(SourceVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        let source = SecretSource::Literal(secret);
        assert!(!format!("{source:?}").contains("hunter2"));
    }

    #[test]
    fn file_secret_drops_trailing_newline_and_resolves_relative_to_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        let loaded = SecretSource::File("pw".into()).load(dir.path()).unwrap();
        assert_eq!(loaded.expose(), "s3cret");
    }

    #[test]
    fn missing_env_names_the_variable() {
        let err = SecretSource::Env("CONNECTOR_PROXY_SURELY_UNSET_VAR".into())
            .load(Path::new("."))
            .unwrap_err();
        assert!(err.to_string().contains("CONNECTOR_PROXY_SURELY_UNSET_VAR"));
    }

    #[test]
    fn parses_each_source_form() {
        #[derive(Deserialize)]
        struct T {
            a: SecretSource,
            b: SecretSource,
            c: SecretSource,
        }
        let t: T = toml::from_str("a = \"x\"\nb = { env = \"E\" }\nc = { file = \"f\" }").unwrap();
        assert_eq!(t.a, SecretSource::Literal(Secret::new("x")));
        assert_eq!(t.b, SecretSource::Env("E".into()));
        assert_eq!(t.c, SecretSource::File("f".into()));
        let err = toml::from_str::<T>("a = { vault = \"x\" }\nb = \"\"\nc = \"\"")
            .err()
            .unwrap();
        assert!(err.to_string().contains("vault"), "{err}");
    }
}
