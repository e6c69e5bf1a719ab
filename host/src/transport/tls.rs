//! TLS to a RabbitMQ broker, as oslo.messaging sets it up: the broker's
//! certificate must verify against `ssl_ca_file` alone when it is set, or
//! against the system's trusted CAs when it is not; `ssl_cert_file` and
//! `ssl_key_file` give a client certificate. There is no way to skip
//! verification.
//!
//! This module owns reading those files (once, before any connection, so a
//! wrong path is reported as a config error), the rustls connector built from
//! them, and turning a handshake failure into an error an operator can act on.
//! The connection itself is opened in `amqp`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lapin::tcp::{RustlsConnector, RustlsConnectorConfig};
use rustls::AlertDescription;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::RabbitOptions;

/// What a TLS connection to one broker trusts and presents.
#[derive(Clone)]
pub struct TlsSetup {
    connector: Arc<RustlsConnector>,
    /// Where the trusted CAs came from, for error messages.
    trust: Trust,
}

#[derive(Clone)]
enum Trust {
    CaFile(PathBuf),
    SystemRoots,
}

impl fmt::Display for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::CaFile(path) => write!(f, "the CA file {} (`ssl_ca_file`)", path.display()),
            Trust::SystemRoots => write!(
                f,
                "the system's trusted CAs (no `ssl_ca_file` is set in [oslo_messaging_rabbit])"
            ),
        }
    }
}

impl TlsSetup {
    /// Reads the CA and client certificate files `options` name; `label`
    /// names the broker in errors.
    pub fn from_options(options: &RabbitOptions, label: &str) -> Result<TlsSetup> {
        let (config, trust) = match options.ca_file() {
            Some(path) => {
                // Only this CA, as oslo does with `ca_certs`: a deployment
                // that pins its own CA does not want public CAs trusted too.
                // Certificates that cannot serve as a CA are skipped when the
                // connector is built, which fails if none is left.
                let certs = read_certificates(&path, "ssl_ca_file", label)?;
                let config = RustlsConnectorConfig::default().with_parsable_certificates(certs);
                (config, Trust::CaFile(path))
            }
            None => (
                RustlsConnectorConfig::new_with_native_certs().with_context(|| {
                    format!(
                        "TLS to the broker of {label}: cannot load the system's trusted CAs; set `ssl_ca_file` in [oslo_messaging_rabbit]"
                    )
                })?,
                Trust::SystemRoots,
            ),
        };
        let connector = match options.client_certificate() {
            Some((cert_path, key_path)) => {
                let chain = read_certificates(&cert_path, "ssl_cert_file", label)?;
                let key = read_key(&key_path, label)?;
                config
                    .connector_with_single_cert(chain, key)
                    .with_context(|| {
                        format!(
                            "TLS to the broker of {label}: the client certificate {} and key {} (`ssl_cert_file`, `ssl_key_file`) cannot be used together",
                            cert_path.display(),
                            key_path.display()
                        )
                    })?
            }
            None => config.connector_with_no_client_auth().with_context(|| {
                format!("TLS to the broker of {label}: cannot set up the TLS client with {trust}")
            })?,
        };
        Ok(TlsSetup {
            connector: Arc::new(connector),
            trust,
        })
    }

    pub(super) fn connector(&self) -> Arc<RustlsConnector> {
        self.connector.clone()
    }

    /// Rewrites a failed connection's error when TLS refused it: the
    /// broker's certificate, or ours; other errors are returned as they are.
    pub(super) fn explain(
        &self,
        error: lapin::Error,
        label: &str,
        host: &str,
        port: u16,
    ) -> anyhow::Error {
        match tls_error(&error) {
            Some(refused @ rustls::Error::InvalidCertificate(_)) => anyhow::anyhow!(
                "TLS to the broker of {label} at {host}:{port}: the broker's certificate did not verify against {} ({refused}); the connection was refused. Check that the broker's certificate is signed by that CA and names {host} in its subjectAltName",
                self.trust
            ),
            Some(rustls::Error::AlertReceived(
                alert @ (AlertDescription::CertificateRequired
                | AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown),
            )) => anyhow::anyhow!(
                "TLS to the broker of {label} at {host}:{port}: the broker refused the connection for want of an acceptable client certificate (alert {alert:?}); set `ssl_cert_file` and `ssl_key_file` in [oslo_messaging_rabbit] to a certificate the broker's CA signed"
            ),
            _ => anyhow::Error::new(error).context(format!(
                "TLS connection to the broker of {label} at {host}:{port} failed"
            )),
        }
    }
}

/// The rustls error inside a lapin error, if any.
fn tls_error(error: &lapin::Error) -> Option<&rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        // `io::Error::source` skips the error it wraps, so look inside it.
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        for candidate in [Some(e), inner].into_iter().flatten() {
            if let Some(tls) = candidate.downcast_ref::<rustls::Error>() {
                return Some(tls);
            }
        }
        current = inner.and_then(|i| i.source()).or_else(|| e.source());
    }
    None
}

fn read_certificates(path: &Path, key: &str, label: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| {
        format!(
            "`{key}` {} (broker of {label}): cannot read the file",
            path.display()
        )
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow::anyhow!(
                "`{key}` {} (broker of {label}): not a PEM certificate file: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        bail!(
            "`{key}` {} (broker of {label}): holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
}

fn read_key(path: &Path, label: &str) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| {
        format!(
            "`ssl_key_file` {} (broker of {label}): cannot read the file",
            path.display()
        )
    })?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        anyhow::anyhow!(
            "`ssl_key_file` {} (broker of {label}): no unencrypted PEM private key in it: {e}",
            path.display()
        )
    })
}
