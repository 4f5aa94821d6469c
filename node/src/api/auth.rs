//! API tokens: a file of lines `admin <token>` or `read-only <token>` ('#' comments).
//! Clients send `Authorization: Bearer <token>`. Reads need any token; changes need an
//! admin token.

use std::path::Path;

use crate::peer::wire::same_mac;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Admin,
    ReadOnly,
}

/// Shortest token accepted.
pub const MIN_TOKEN: usize = 16;

#[derive(Clone)]
pub struct Tokens {
    /// SHA-256 of each token with its access (compared in constant time).
    entries: Vec<([u8; 32], Access)>,
}

fn digest(t: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(t.as_bytes()).into()
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the API tokens file {}: {e}", path.display()))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Tokens, String> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = |m: &str| format!("{}:{}: {m}", path.display(), i + 1);
            let mut parts = line.split_whitespace();
            let access = match parts.next() {
                Some("admin") => Access::Admin,
                Some("read-only") => Access::ReadOnly,
                Some(other) => {
                    return Err(at(&format!(
                        "unknown role {other:?} (expected admin or read-only)"
                    )))
                }
                None => continue,
            };
            let token = parts
                .next()
                .ok_or_else(|| at("the role needs a token after it"))?;
            if token.len() < MIN_TOKEN {
                return Err(at(&format!(
                    "tokens must be at least {MIN_TOKEN} characters"
                )));
            }
            if parts.next().is_some() {
                return Err(at("expected `<role> <token>`"));
            }
            entries.push((digest(token), access));
        }
        if entries.is_empty() {
            return Err(format!(
                "{}: no tokens (add a line `admin <token>`)",
                path.display()
            ));
        }
        Ok(Tokens { entries })
    }

    /// The access a bearer token grants, if any.
    pub fn check(&self, token: &str) -> Option<Access> {
        let d = digest(token);
        // Look at every entry so the time taken does not tell which matched.
        let mut found = None;
        for (e, a) in &self.entries {
            if same_mac(e, &d) {
                found = Some(*a);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file() {
        let p = Path::new("tokens");
        let t = Tokens::parse(
            p,
            "# ops\nadmin aaaaaaaaaaaaaaaa\nread-only bbbbbbbbbbbbbbbb # viewer\n",
        )
        .unwrap();
        assert_eq!(t.check("aaaaaaaaaaaaaaaa"), Some(Access::Admin));
        assert_eq!(t.check("bbbbbbbbbbbbbbbb"), Some(Access::ReadOnly));
        assert_eq!(t.check("cccccccccccccccc"), None);
        assert_eq!(
            Tokens::parse(p, "root aaaaaaaaaaaaaaaa").err().unwrap(),
            "tokens:1: unknown role \"root\" (expected admin or read-only)"
        );
        assert!(Tokens::parse(p, "\nadmin short")
            .err()
            .unwrap()
            .starts_with("tokens:2:"));
        assert!(Tokens::parse(p, "# nothing\n").is_err());
    }
}
