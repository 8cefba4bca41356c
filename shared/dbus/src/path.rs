//! Sandbox ids in object paths. A path element allows only `[A-Za-z0-9_]`, so every
//! other byte (and `_` itself) becomes `_xx` (two lowercase hex digits), as systemd does
//! for unit names: `web-1` is `web_2d1`. Escaping is reversible and unambiguous.

use zbus::zvariant::OwnedObjectPath;

use crate::SANDBOX_PATH_PREFIX;

pub fn escape_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// The inverse of [`escape_id`]; `None` for text `escape_id` never produces.
pub fn unescape_id(s: &str) -> Option<String> {
    if s == "_" {
        return Some(String::new());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'_' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if b[i].is_ascii_alphanumeric() {
            out.push(b[i]);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// `/org/bulkhead/Manager1/sandbox/<escaped id>`.
pub fn sandbox_path(id: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("{SANDBOX_PATH_PREFIX}/{}", escape_id(id)))
        .expect("escaped ids are valid path elements")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for id in ["web-1", "a_b", "x.y", "ABC123", "-", "_", "é"] {
            let e = escape_id(id);
            assert!(
                e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{e}"
            );
            assert_eq!(unescape_id(&e).as_deref(), Some(id), "{e}");
        }
        assert_eq!(escape_id("web-1"), "web_2d1");
        assert_eq!(unescape_id("_zz"), None);
        assert_eq!(unescape_id("a_2"), None);
        assert_eq!(
            sandbox_path("web-1").as_str(),
            "/org/bulkhead/Manager1/sandbox/web_2d1"
        );
    }
}
