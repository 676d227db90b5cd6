//! Content digests: the `sha256:<64 hex>` names blobs are stored and
//! verified by. Only sha256 is accepted; it is the one algorithm every
//! registry and `docker save` uses, and one algorithm keeps the store's
//! layout (`blobs/sha256/<hex>`) a function of the digest alone.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A `sha256:` content digest, parsed: 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// Why a string is not a digest this store accepts.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a digest: expected sha256: and 64 lowercase hex digits")]
pub struct BadDigest(pub String);

impl Digest {
    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut h = Hasher::default();
        h.update(bytes);
        h.finish()
    }

    /// A digest from bare hex digits (as `docker save` names its files).
    pub fn from_hex(hex: &str) -> Result<Self, BadDigest> {
        format!("sha256:{hex}").parse()
    }
}

impl FromStr for Digest {
    type Err = BadDigest;

    fn from_str(s: &str) -> Result<Self, BadDigest> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| BadDigest(s.to_owned()))?;
        if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadDigest(s.to_owned()))
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A running sha256 of bytes written through it.
#[derive(Default)]
pub struct Hasher {
    sha: Sha256,
    len: u64,
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> Digest {
        let mut s = String::with_capacity(71);
        s.push_str("sha256:");
        for b in self.sha.finalize() {
            s.push_str(&format!("{b:02x}"));
        }
        Digest(s)
    }
}

impl Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_of_nothing_is_the_well_known_one() {
        assert_eq!(
            Digest::of(b"").hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn only_sha256_with_64_lowercase_hex_digits_parses() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(format!("sha256:{hex}").parse::<Digest>().is_ok());
        assert!(format!("sha512:{hex}").parse::<Digest>().is_err());
        assert!(format!("sha256:{}", hex.to_uppercase())
            .parse::<Digest>()
            .is_err());
        assert!(format!("sha256:{}", &hex[1..]).parse::<Digest>().is_err());
        assert!("sha256:../../etc/passwd".parse::<Digest>().is_err());
    }
}
