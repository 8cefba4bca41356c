//! Pulling from a registry with the `oci-client` crate. Registries on loopback speak
//! plain HTTP (a local `docker-registry`), as do those listed in
//! `BULKHEAD_INSECURE_REGISTRIES` (comma-separated `host:port`); all others HTTPS.
//! Blobs are verified against their digests and kept under `<store>/blobs/sha256`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::ImageConfiguration;
use sha2::Digest;

use crate::image::{flatten, ImageConfig, Prepared};

pub fn sha256_file(p: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(p)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(registry)
        .trim_matches(['[', ']']);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

fn protocol_for(registry: &str) -> ClientProtocol {
    let insecure: Vec<String> = std::env::var("BULKHEAD_INSECURE_REGISTRIES")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if is_loopback(registry) || insecure.iter().any(|r| r == registry) {
        ClientProtocol::Http
    } else {
        ClientProtocol::Https
    }
}

fn blob_file(store: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| anyhow!("unsupported or malformed digest {digest:?}"))?;
    Ok(store.join("blobs").join("sha256").join(hex))
}

/// Pull `reference` into `store`, with the credentials [`crate::auth`] finds for it
/// (`authfile`: `--authfile`), else anonymously.
pub async fn pull(reference: &str, store: &Path, authfile: Option<&Path>) -> Result<Prepared> {
    let r = Reference::from_str(reference)
        .map_err(|e| anyhow!("image {reference:?}: not a valid reference: {e}"))?;
    let client = Client::new(ClientConfig {
        protocol: protocol_for(r.resolve_registry()),
        ..Default::default()
    });
    let files = crate::auth::files(authfile);
    let found = crate::auth::lookup(&files, r.registry(), r.repository())?;
    let auth = found
        .as_ref()
        .map(|f| f.auth.clone())
        .unwrap_or(RegistryAuth::Anonymous);
    let (manifest, mdigest, config) = client
        .pull_manifest_and_config(&r, &auth)
        .await
        .map_err(|e| {
            let how = match &found {
                Some(f) => format!("with the credentials for {:?} in {}", f.key, f.file.display()),
                None => format!(
                    "anonymously (no credentials for {} in {}; log in with podman, skopeo or docker, or give --authfile)",
                    r.registry(),
                    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            };
            anyhow!("cannot pull {reference} {how}: {e}")
        })?;
    let config: ImageConfiguration =
        serde_json::from_str(&config).context("the image's config is not valid JSON")?;
    std::fs::create_dir_all(store.join("blobs").join("sha256"))?;
    let mut layers = vec![];
    for l in &manifest.layers {
        let path = blob_file(store, &l.digest)?;
        // Blobs are written under their digest only after oci-client verified them.
        if !path.exists() {
            let tmp = path.with_extension(format!("part.{}", std::process::id()));
            let f = tokio::fs::File::create(&tmp).await?;
            if let Err(e) = client.pull_blob(&r, l, f).await {
                let _ = std::fs::remove_file(&tmp);
                bail!("cannot pull layer {} of {reference}: {e}", l.digest);
            }
            std::fs::rename(&tmp, &path)?;
        }
        layers.push((path, l.media_type.clone()));
    }
    let rootfs = flatten(store, &mdigest, &layers)?;
    Ok(Prepared {
        rootfs,
        config: ImageConfig::from_oci(&config),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_use_http() {
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example.com"));
        assert!(matches!(
            protocol_for("127.0.0.1:5000"),
            ClientProtocol::Http
        ));
        assert!(matches!(protocol_for("quay.io"), ClientProtocol::Https));
    }
}
