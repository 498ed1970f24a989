//! Optional TLS for the control plane (rustls through tonic): with `launch.tls_ca` set,
//! every agent reaches the coordinator over TLS and checks its certificate against that CA;
//! node 0 serves with `launch.tls_cert` and `launch.tls_key` (PEM). The shared secret
//! ([`crate::auth`]) still authenticates the agents.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::LaunchOptions;
use crate::error::{Error, Result};

/// The control plane's TLS settings of this node; `None` fields: plain TCP.
#[derive(Clone, Debug, Default)]
pub struct Tls {
    pub client: Option<ClientTlsConfig>,
    pub server: Option<ServerTlsConfig>,
}

fn pem(key: &str, path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|source| Error::ConfigIo {
        path: path.to_path_buf(),
        source,
    })?;
    if !bytes.starts_with(b"-----BEGIN") {
        return Err(Error::Config {
            file: path.to_path_buf(),
            message: format!("launch.{key}: not a PEM file (it should start with -----BEGIN)"),
        });
    }
    Ok(bytes)
}

impl Tls {
    /// Read the certificates `launch` names; errors name the key and the file.
    pub fn load(launch: &LaunchOptions) -> Result<Self> {
        let Some(ca) = &launch.tls_ca else {
            if launch.tls_cert.is_some() || launch.tls_key.is_some() {
                return Err(Error::Config {
                    file: "launch.tls_ca".into(),
                    message: "TLS needs launch.tls_ca on every node (the CA agents check the \
                              coordinator's certificate against)"
                        .into(),
                });
            }
            return Ok(Self::default());
        };
        let mut client =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem("tls_ca", ca)?));
        // Node 0 dials its own coordinator by address: check the name the others dial.
        let rdzv_host = launch
            .rdzv
            .as_deref()
            .and_then(|r| r.rsplit_once(':'))
            .map(|(h, _)| h.trim_matches(|c| c == '[' || c == ']').to_string());
        if let Some(domain) = launch.tls_domain.clone().or(rdzv_host) {
            client = client.domain_name(domain);
        }
        let server = match (&launch.tls_cert, &launch.tls_key, launch.node_rank) {
            (Some(cert), Some(key), 0) => {
                let identity = Identity::from_pem(pem("tls_cert", cert)?, pem("tls_key", key)?);
                let config = ServerTlsConfig::new().identity(identity);
                // A key that does not match the certificate fails here, not at the first call.
                tonic::transport::Server::builder()
                    .tls_config(config.clone())
                    .map_err(|e| Error::Config {
                        file: key.clone(),
                        message: format!("launch.tls_cert / launch.tls_key: {e}"),
                    })?;
                Some(config)
            }
            (_, _, 0) => {
                return Err(Error::Config {
                    file: "launch.tls_cert".into(),
                    message: "node 0 serves the control plane over TLS (launch.tls_ca is set) \
                              and needs launch.tls_cert and launch.tls_key"
                        .into(),
                })
            }
            _ => None,
        };
        Ok(Self {
            client: Some(client),
            server,
        })
    }

    /// The URL scheme agents use.
    pub fn scheme(&self) -> &'static str {
        if self.client.is_some() {
            "https"
        } else {
            "http"
        }
    }
}
