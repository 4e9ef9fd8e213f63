//! API keys: how they are made, stored (as SHA-256 hashes only) and read from a request.
//!
//! `credential` is the one place that reads a key from a request's headers; the websocket bridge
//! feeds the token of a first `auth` message to the same `KeyStore::verify`.

use crate::FastMap;
use std::sync::Arc;

use base64::Engine;
use http::HeaderMap;
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::config::{KeyConfig, KeyKind};
use crate::error::GatewayError;

/// Random characters after the prefix: 32 alphanumerics carry about 190 bits.
const KEY_RANDOM_CHARS: usize = 32;

/// A fresh key: `pnu_`/`pnb_` and 32 random alphanumerics.
pub fn generate(kind: KeyKind) -> String {
    // ThreadRng is a CSPRNG seeded from the OS.
    let mut rng = rand::rng();
    format!(
        "{}{}",
        kind.prefix(),
        Alphanumeric.sample_string(&mut rng, KEY_RANDOM_CHARS)
    )
}

pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The form stored in config: `sha256:<hex>`.
pub fn hash_string(key: &str) -> String {
    format!("sha256:{}", hex::encode(digest(key)))
}

pub fn parse_hash(text: &str) -> Result<[u8; 32], String> {
    let hex_part = text.strip_prefix("sha256:").ok_or_else(|| {
        format!(
            "{text:?}: a key hash is written \"sha256:<64 hex digits>\" (see `tollgate keys new`)"
        )
    })?;
    let bytes = hex::decode(hex_part).map_err(|_| "the hash is not hexadecimal".to_string())?;
    bytes
        .try_into()
        .map_err(|_| "a sha256 hash has 64 hex digits".to_string())
}

pub fn parse_expiry(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{text:?} is not an RFC 3339 time like 2027-01-01T00:00:00Z: {e}"))
}

/// A stored key, as the config describes it.
#[derive(Debug)]
pub struct ApiKey {
    pub id: String,
    pub account: Uuid,
    /// `None`: every workspace of the account.
    pub workspaces: Option<Vec<Uuid>>,
    pub kind: KeyKind,
    pub expires: Option<OffsetDateTime>,
    hash: [u8; 32],
}

impl ApiKey {
    pub fn allows(&self, workspace: Uuid) -> bool {
        self.workspaces
            .as_ref()
            .is_none_or(|w| w.contains(&workspace))
    }
}

/// The keys of the config, looked up by hash.
#[derive(Debug, Default)]
pub struct KeyStore {
    by_hash: FastMap<[u8; 32], Arc<ApiKey>>,
}

impl KeyStore {
    /// Builds from a config that `Config::problems` found clean.
    pub fn from_config(keys: &[KeyConfig]) -> Result<KeyStore, String> {
        let mut by_hash = FastMap::default();
        for k in keys {
            let hash = parse_hash(&crate::config::resolve_secret(&k.hash)?)?;
            let workspaces = match &k.workspaces {
                None => None,
                Some(list) => Some(
                    list.iter()
                        .map(|w| Uuid::parse_str(w).map_err(|e| format!("key {}: {e}", k.id)))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            let key = ApiKey {
                id: k.id.clone(),
                account: Uuid::parse_str(&k.account).map_err(|e| format!("key {}: {e}", k.id))?,
                workspaces,
                kind: k.kind,
                expires: k.expires.as_deref().map(parse_expiry).transpose()?,
                hash,
            };
            by_hash.insert(hash, Arc::new(key));
        }
        Ok(KeyStore { by_hash })
    }

    /// The stored key for a presented one, if it is known and not expired.
    pub fn verify(&self, presented: &str) -> Result<Arc<ApiKey>, GatewayError> {
        let hash = digest(presented);
        // The map finds the candidate by its hash; the final comparison is constant-time so the
        // time taken says nothing about how much of a hash matched.
        let found = self
            .by_hash
            .get(&hash)
            .filter(|k| bool::from(k.hash.ct_eq(&hash)))
            .ok_or(GatewayError::Unauthorized("invalid API key"))?;
        if let Some(expiry) = found.expires {
            if crate::clock::now_utc() >= expiry {
                return Err(GatewayError::Unauthorized("API key expired"));
            }
        }
        Ok(found.clone())
    }
}

/// The key a request presents, from `Authorization: Bearer`, `X-Api-Key` or
/// `Authorization: Basic base64(<key>)` (a self-hosted-mode client whose
/// `PREFECT_API_AUTH_STRING` holds the key). `Ok(None)`: no credential at all.
pub fn credential(headers: &HeaderMap) -> Result<Option<String>, GatewayError> {
    const MALFORMED: GatewayError = GatewayError::Unauthorized(
        "malformed Authorization header: send \"Authorization: Bearer <API key>\"",
    );
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let text = value.to_str().map_err(|_| MALFORMED)?.trim();
        let (scheme, rest) = text.split_once(' ').ok_or(MALFORMED)?;
        let rest = rest.trim();
        if rest.is_empty() {
            return Err(MALFORMED);
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            return Ok(Some(rest.to_string()));
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or(MALFORMED)?;
            // The auth string is the key itself; "user:key" is accepted too.
            let key = match decoded.split_once(':') {
                Some((_, password)) => password.to_string(),
                None => decoded,
            };
            return Ok(Some(key));
        }
        return Err(MALFORMED);
    }
    if let Some(value) = headers.get("x-api-key") {
        let text = value.to_str().map_err(|_| MALFORMED)?.trim();
        if text.is_empty() {
            return Err(MALFORMED);
        }
        return Ok(Some(text.to_string()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(key: &str, expires: Option<&str>) -> KeyStore {
        KeyStore::from_config(&[KeyConfig {
            id: "k".into(),
            hash: hash_string(key),
            account: "11111111-1111-4111-8111-111111111111".into(),
            workspaces: None,
            kind: KeyKind::User,
            expires: expires.map(str::to_string),
        }])
        .unwrap()
    }

    #[test]
    fn fresh_keys_have_the_prefix_and_enough_randomness() {
        let a = generate(KeyKind::User);
        let b = generate(KeyKind::Service);
        assert!(a.starts_with("pnu_") && b.starts_with("pnb_"));
        assert_eq!(a.len(), 4 + KEY_RANDOM_CHARS);
        assert_ne!(a[4..], b[4..]);
    }

    #[test]
    fn verify_accepts_the_key_and_refuses_others_and_expired_ones() {
        let s = store("pnu_abc", None);
        assert!(s.verify("pnu_abc").is_ok());
        assert!(s.verify("pnu_abd").is_err());
        let expired = store("pnu_abc", Some("2000-01-01T00:00:00Z"));
        assert!(matches!(
            expired.verify("pnu_abc"),
            Err(GatewayError::Unauthorized("API key expired"))
        ));
    }

    #[test]
    fn credential_reads_every_documented_form() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "BeArEr pnu_x".parse().unwrap());
        assert_eq!(credential(&h).unwrap().as_deref(), Some("pnu_x"));
        h.insert("authorization", "Basic cG51X3g=".parse().unwrap());
        assert_eq!(credential(&h).unwrap().as_deref(), Some("pnu_x"));
        h.insert("authorization", "Bearer".parse().unwrap());
        assert!(credential(&h).is_err());
        h.insert("authorization", "Basic !!!".parse().unwrap());
        assert!(credential(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "pnb_y".parse().unwrap());
        assert_eq!(credential(&h).unwrap().as_deref(), Some("pnb_y"));
        assert_eq!(credential(&HeaderMap::new()).unwrap(), None);
    }
}
