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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lapin::tcp::RustlsConnector;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, ClientConfig, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::RabbitOptions;

/// What a TLS connection to one broker trusts and presents.
#[derive(Clone)]
pub struct TlsSetup {
    config: Arc<ClientConfig>,
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

/// One TLS connection attempt: the connector it uses, and whether the
/// broker asked it for a client certificate during the handshake.
pub(super) struct TlsAttempt {
    pub(super) connector: RustlsConnector,
    asked_for_certificate: Arc<AtomicBool>,
}

impl TlsSetup {
    /// Reads the CA and client certificate files `options` name; `label`
    /// names the broker in errors.
    pub fn from_options(options: &RabbitOptions, label: &str) -> Result<TlsSetup> {
        let (roots, trust) = match options.ca_file() {
            // Only this CA, as oslo does with `ca_certs`: a deployment that
            // pins its own CA does not want public CAs trusted too.
            Some(path) => (
                read_certificates(&path, "ssl_ca_file", label)?,
                Trust::CaFile(path),
            ),
            None => {
                let loaded = rustls_native_certs::load_native_certs();
                if loaded.certs.is_empty() {
                    bail!(
                        "TLS to the broker of {label}: cannot load the system's trusted CAs ({:?}); set `ssl_ca_file` in [oslo_messaging_rabbit]",
                        loaded.errors
                    );
                }
                (loaded.certs, Trust::SystemRoots)
            }
        };
        let mut store = RootCertStore::empty();
        // Certificates that cannot serve as a CA are skipped; none left is an error.
        let (usable, _skipped) = store.add_parsable_certificates(roots);
        if usable == 0 {
            bail!("TLS to the broker of {label}: no usable CA certificate in {trust}");
        }
        let builder = client_config()
            .with_context(|| format!("TLS to the broker of {label}: no TLS version to offer"))?
            .with_root_certificates(store);
        let config = match options.client_certificate() {
            Some((cert_path, key_path)) => {
                let chain = read_certificates(&cert_path, "ssl_cert_file", label)?;
                let key = read_key(&key_path, label)?;
                builder.with_client_auth_cert(chain, key).with_context(|| {
                    format!(
                        "TLS to the broker of {label}: the client certificate {} and key {} (`ssl_cert_file`, `ssl_key_file`) cannot be used together",
                        cert_path.display(),
                        key_path.display()
                    )
                })?
            }
            // Each attempt gets its own resolver (see `attempt`).
            None => builder.with_no_client_auth(),
        };
        Ok(TlsSetup {
            config: Arc::new(config),
            trust,
        })
    }

    /// The connector for one connection attempt. Without a certificate of
    /// our own, it notes whether the broker asked for one: a broker that
    /// requires one may hang up before its alert is read (TLS 1.3 finishes
    /// the client's side of the handshake first), and then only this tells
    /// why it did.
    pub(super) fn attempt(&self) -> TlsAttempt {
        let asked_for_certificate = Arc::new(AtomicBool::new(false));
        let connector = if self.config.client_auth_cert_resolver.has_certs() {
            RustlsConnector::from(self.config.clone())
        } else {
            let mut config = (*self.config).clone();
            config.client_auth_cert_resolver = Arc::new(NoCertificate {
                asked: asked_for_certificate.clone(),
            });
            RustlsConnector::from(config)
        };
        TlsAttempt {
            connector,
            asked_for_certificate,
        }
    }

    /// Rewrites a failed connection's error when TLS refused it: the
    /// broker's certificate, or ours; other errors are returned as they are.
    pub(super) fn explain(
        &self,
        error: lapin::Error,
        attempt: &TlsAttempt,
        label: &str,
        host: &str,
        port: u16,
    ) -> anyhow::Error {
        let want_of_certificate = |what: String| {
            anyhow::anyhow!(
                "TLS to the broker of {label} at {host}:{port}: the broker refused the connection for want of an acceptable client certificate ({what}); set `ssl_cert_file` and `ssl_key_file` in [oslo_messaging_rabbit] to a certificate the broker's CA signed"
            )
        };
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
            )) => want_of_certificate(format!("alert {alert:?}")),
            _ if attempt.asked_for_certificate.load(Ordering::Relaxed) => {
                want_of_certificate(format!(
                    "it asked for one during the handshake, none is configured, and then it hung up: {error}"
                ))
            }
            _ => anyhow::Error::new(error).context(format!(
                "TLS connection to the broker of {label} at {host}:{port} failed"
            )),
        }
    }
}

/// A client config on ring, offering the TLS versions rustls deems safe.
fn client_config(
) -> std::result::Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, rustls::Error>
{
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
}

/// Presents no client certificate, and notes that the broker asked for one.
#[derive(Debug)]
struct NoCertificate {
    asked: Arc<AtomicBool>,
}

impl ResolvesClientCert for NoCertificate {
    fn resolve(
        &self,
        _issuers: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        None
    }

    fn has_certs(&self) -> bool {
        false
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

#[cfg(test)]
mod tests {
    use super::*;

    fn setup_without_certificate() -> TlsSetup {
        let config = client_config()
            .expect("TLS versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        TlsSetup {
            config: Arc::new(config),
            trust: Trust::SystemRoots,
        }
    }

    fn reset() -> lapin::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionReset).into()
    }

    #[test]
    fn a_hang_up_after_the_broker_asked_for_a_certificate_says_to_configure_one() {
        let setup = setup_without_certificate();
        let attempt = setup.attempt();
        let resolver = NoCertificate {
            asked: attempt.asked_for_certificate.clone(),
        };
        assert!(resolver.resolve(&[], &[]).is_none(), "we have none to give");
        let error = setup.explain(reset(), &attempt, "b", "localhost", 5671);
        let text = format!("{error:#}");
        assert!(text.contains("client certificate"), "{text}");
        assert!(text.contains("ssl_cert_file"), "{text}");
        assert!(text.contains("reset"), "the I/O error is kept: {text}");
    }

    #[test]
    fn a_hang_up_without_a_request_for_a_certificate_is_told_as_it_is() {
        let setup = setup_without_certificate();
        // A fresh attempt: an earlier one's request does not carry over.
        let earlier = setup.attempt();
        earlier.asked_for_certificate.store(true, Ordering::Relaxed);
        let attempt = setup.attempt();
        let text = format!(
            "{:#}",
            setup.explain(reset(), &attempt, "b", "localhost", 5671)
        );
        assert!(!text.contains("ssl_cert_file"), "{text}");
        assert!(text.contains("TLS connection to the broker of b"), "{text}");
    }
}
