//! Registry credentials, from the files `podman login`, `skopeo login` and `docker login`
//! write, so that a user who logged in with those tools can `bulkhead run` a private
//! image. Looked up in podman's order (containers-auth.json(5)):
//!
//! 1. `--authfile PATH`, else `$REGISTRY_AUTH_FILE`;
//! 2. `$XDG_RUNTIME_DIR/containers/auth.json` (root without it: `/run/containers/0/auth.json`);
//! 3. `$XDG_CONFIG_HOME/containers/auth.json` (else `~/.config/containers/auth.json`);
//! 4. `$DOCKER_CONFIG/config.json` (else `~/.docker/config.json`).
//!
//! The first file with an entry for the image wins. In a file, the most specific key
//! wins: `host/ns/repo` before `host/ns` before `host`. Entries are `{"auth":
//! base64("user:password")}`, or docker's `username`/`password`, or an `identitytoken`
//! (sent as a bearer token). Credential helpers (`credHelpers`, `credsStore`) are not
//! run: log in with `--authfile` or podman/skopeo instead.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// Where a credential came from, for messages.
#[derive(Debug)]
pub struct Found {
    pub auth: RegistryAuth,
    pub file: PathBuf,
    pub key: String,
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::HashMap<String, Entry>,
}

#[derive(Deserialize, Default)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The files to look in, in order (those that do not exist are skipped later).
pub fn files(authfile: Option<&Path>) -> Vec<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(f) = authfile
        .map(Path::to_path_buf)
        .or_else(|| env("REGISTRY_AUTH_FILE"))
    {
        return vec![f];
    }
    let home = env("HOME");
    let mut out = vec![];
    match env("XDG_RUNTIME_DIR") {
        Some(d) => out.push(d.join("containers/auth.json")),
        None => {
            // SAFETY: getuid has no preconditions.
            let uid = unsafe { libc::getuid() };
            out.push(PathBuf::from(format!("/run/containers/{uid}/auth.json")));
        }
    }
    if let Some(d) = env("XDG_CONFIG_HOME").or_else(|| home.as_ref().map(|h| h.join(".config"))) {
        out.push(d.join("containers/auth.json"));
    }
    if let Some(d) = env("DOCKER_CONFIG").or_else(|| home.as_ref().map(|h| h.join(".docker"))) {
        out.push(d.join("config.json"));
    }
    out
}

/// Credentials for `registry` (as written in the reference, e.g. `docker.io`,
/// `127.0.0.1:5000`) and `repository` (`library/busybox`), from the first of `files`
/// that has them. A file that exists but cannot be read or parsed is an error: a typo
/// in it should not silently become an anonymous pull.
pub fn lookup(files: &[PathBuf], registry: &str, repository: &str) -> Result<Option<Found>> {
    for f in files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(anyhow!("auth file {}: {e}", f.display())),
        };
        if let Some((key, auth)) = from_text(&text, registry, repository)
            .with_context(|| format!("auth file {}", f.display()))?
        {
            return Ok(Some(Found {
                auth,
                file: f.clone(),
                key,
            }));
        }
    }
    Ok(None)
}

/// A key as docker and podman write them, reduced to `host[/path]`:
/// `https://index.docker.io/v1/` is `docker.io`.
fn normalize(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let k = k
        .strip_suffix("/v1")
        .or_else(|| k.strip_suffix("/v2"))
        .unwrap_or(k);
    match k.split_once('/') {
        Some((host, rest)) => format!("{}/{rest}", canonical_host(host)),
        None => canonical_host(k).to_string(),
    }
}

fn canonical_host(h: &str) -> &str {
    match h {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        h => h,
    }
}

fn from_text(
    text: &str,
    registry: &str,
    repository: &str,
) -> Result<Option<(String, RegistryAuth)>> {
    let file: AuthFile = serde_json::from_str(text).context("not a valid auth file")?;
    let want = format!("{}/{repository}", canonical_host(registry));
    // The longest key that is the image's host, or a path prefix of host/repository.
    let best = file
        .auths
        .iter()
        .map(|(k, e)| (normalize(k), k, e))
        .filter(|(n, _, _)| want == *n || want.starts_with(&format!("{n}/")))
        .max_by_key(|(n, _, _)| n.len());
    let Some((_, key, e)) = best else {
        return Ok(None);
    };
    Ok(Some((
        key.clone(),
        entry_auth(e).with_context(|| format!("entry {key:?}"))?,
    )))
}

fn entry_auth(e: &Entry) -> Result<RegistryAuth> {
    if let Some(token) = e.identitytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let Some(a) = e.auth.as_ref().filter(|a| !a.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .context("\"auth\" is not base64")?;
        let text = String::from_utf8(raw).context("\"auth\" is not UTF-8")?;
        let (user, pass) = text
            .split_once(':')
            .ok_or_else(|| anyhow!("\"auth\" is not user:password"))?;
        return Ok(RegistryAuth::Basic(user.into(), pass.into()));
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u.clone(), p.clone())),
        _ => Err(anyhow!(
            "no credentials in it (credential helpers are not run: log in with --authfile)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: &RegistryAuth) -> (&str, &str) {
        match a {
            RegistryAuth::Basic(u, p) => (u, p),
            other => panic!("{other:?}"),
        }
    }

    const FILE: &str = r#"{"auths": {
        "127.0.0.1:5000": {"auth": "YWxpY2U6czNjcmV0"},
        "127.0.0.1:5000/team": {"auth": "Ym9iOmh1bnRlcjI="},
        "https://index.docker.io/v1/": {"username": "carol", "password": "pw:with:colons"},
        "quay.io": {"identitytoken": "tok"},
        "broken.example": {"auth": "!!!"},
        "helper.example": {}
    }, "credHelpers": {"gcr.io": "gcloud"}}"#;

    fn find(reg: &str, repo: &str) -> Result<Option<(String, RegistryAuth)>> {
        from_text(FILE, reg, repo)
    }

    #[test]
    fn the_most_specific_key_wins() {
        let (k, a) = find("127.0.0.1:5000", "team/app").unwrap().unwrap();
        assert_eq!(
            (k.as_str(), basic(&a)),
            ("127.0.0.1:5000/team", ("bob", "hunter2"))
        );
        let (k, a) = find("127.0.0.1:5000", "other/app").unwrap().unwrap();
        assert_eq!(
            (k.as_str(), basic(&a)),
            ("127.0.0.1:5000", ("alice", "s3cret"))
        );
        // "team" is not a prefix of "teamster".
        let (k, _) = find("127.0.0.1:5000", "teamster/app").unwrap().unwrap();
        assert_eq!(k, "127.0.0.1:5000");
    }

    #[test]
    fn docker_hub_keys_and_other_entry_forms() {
        let (_, a) = find("docker.io", "library/busybox").unwrap().unwrap();
        assert_eq!(basic(&a), ("carol", "pw:with:colons"));
        let (_, a) = find("index.docker.io", "library/busybox").unwrap().unwrap();
        assert_eq!(basic(&a), ("carol", "pw:with:colons"));
        let (_, a) = find("quay.io", "x/y").unwrap().unwrap();
        assert!(matches!(a, RegistryAuth::Bearer(t) if t == "tok"));
        assert!(find("ghcr.io", "x/y").unwrap().is_none());
        assert!(
            find("gcr.io", "x/y").unwrap().is_none(),
            "helpers are not run"
        );
    }

    #[test]
    fn bad_entries_and_files_are_errors() {
        let e = find("broken.example", "x").unwrap_err();
        assert!(format!("{e:#}").contains("not base64"), "{e:#}");
        let e = find("helper.example", "x").unwrap_err();
        assert!(format!("{e:#}").contains("credential helpers"), "{e:#}");
        assert!(from_text("{not json", "a", "b").is_err());
        // A file with no "auths" at all is simply empty.
        assert!(from_text("{}", "a", "b").unwrap().is_none());
    }

    #[test]
    fn files_in_order_the_first_with_an_entry_wins() {
        let dir = std::env::temp_dir().join(format!("bh-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b, missing) = (
            dir.join("a.json"),
            dir.join("b.json"),
            dir.join("none.json"),
        );
        std::fs::write(&a, r#"{"auths": {"other.example": {"auth": "eDp5"}}}"#).unwrap();
        std::fs::write(&b, FILE).unwrap();
        let order = [missing, a.clone(), b.clone()];
        let f = lookup(&order, "127.0.0.1:5000", "x/y").unwrap().unwrap();
        assert_eq!(f.file, b);
        let f = lookup(&order, "other.example", "x/y").unwrap().unwrap();
        assert_eq!(f.file, a);
        std::fs::write(&a, "garbage").unwrap();
        let e = lookup(&order, "127.0.0.1:5000", "x/y").unwrap_err();
        assert!(format!("{e:#}").contains("a.json"), "{e:#}");
        assert_eq!(files(Some(&b)), vec![b.clone()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
