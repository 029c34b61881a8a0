//! TLS on a node's listeners: its certificate and key, and the cluster CA that client
//! certificates must chain to (mutual TLS between nodes; clients may present none and use a
//! token instead, but a certificate from another CA is refused in the handshake).

use std::path::Path;
use std::sync::Arc;

use mendfs_meta::auth::CertifiedIdentity;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::NodeError;

/// The server side of TLS, shared by every connection of a listener.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
}

fn read_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, NodeError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|e| NodeError::Start(format!("cannot read the {what} from {}: {e}", path.display())))?;
    if certificates.is_empty() {
        return Err(NodeError::Start(format!("{} holds no {what} (PEM)", path.display())));
    }
    Ok(certificates)
}

impl ServerTls {
    /// Loads the node's certificate chain and key and the CA, all PEM files. `alpn`: the
    /// protocols offered (`h2` for gRPC, `http/1.1` for the HTTP side).
    pub fn load(cert: &Path, key: &Path, ca: &Path, alpn: &[&[u8]]) -> Result<Self, NodeError> {
        let chain = read_certificates(cert, "certificate")?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| NodeError::Start(format!("cannot read the private key from {}: {e}", key.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in read_certificates(ca, "CA certificate")? {
            roots
                .add(certificate)
                .map_err(|e| NodeError::Start(format!("the CA certificate in {} is unusable: {e}", ca.display())))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            // Clients without a certificate get through the handshake and must show a token.
            .allow_unauthenticated()
            .build()
            .map_err(|e| NodeError::Start(format!("TLS client verification: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| NodeError::Start(format!("TLS: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| {
                NodeError::Start(format!("the certificate in {} does not match its key: {e}", cert.display()))
            })?;
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        Ok(Self { acceptor: TlsAcceptor::from(Arc::new(config)) })
    }

    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        self.acceptor.accept(stream).await
    }
}

/// The identity in the verified client certificate of a TLS connection, if there is one.
/// rustls has already checked that it chains to the cluster CA; a certificate that names no
/// MendFS identity is refused.
pub fn certified_identity(
    stream: &tokio_rustls::server::TlsStream<TcpStream>,
) -> Result<Option<CertifiedIdentity>, String> {
    let Some(leaf) = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()) else {
        return Ok(None);
    };
    identity_of(leaf.as_ref()).map(Some)
}

/// The URI under which MendFS certificates name whom they were issued to.
pub const IDENTITY_URI_PREFIX: &str = "spiffe://mendfs/";

/// Reads `spiffe://mendfs/node/ID` or `spiffe://mendfs/client/NAME` from a certificate's
/// subject alternative names.
pub fn identity_of(certificate_der: &[u8]) -> Result<CertifiedIdentity, String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(certificate_der)
        .map_err(|e| format!("the client certificate does not parse: {e}"))?;
    let names = certificate
        .subject_alternative_name()
        .map_err(|e| format!("the client certificate's alternative names do not parse: {e}"))?;
    for name in names.iter().flat_map(|names| names.value.general_names.iter()) {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(identity) = uri.strip_prefix(IDENTITY_URI_PREFIX) {
                return parse_identity(identity).ok_or_else(|| format!("unknown identity {uri:?} in the certificate"));
            }
        }
    }
    Err(format!("the client certificate names no {IDENTITY_URI_PREFIX}... identity"))
}

fn parse_identity(identity: &str) -> Option<CertifiedIdentity> {
    match identity.split_once('/')? {
        ("node", id) => id.parse().ok().filter(|id| *id > 0).map(CertifiedIdentity::Node),
        ("client", name) if !name.is_empty() => Some(CertifiedIdentity::Client(name.to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_name_a_node_or_a_client() {
        assert_eq!(parse_identity("node/3"), Some(CertifiedIdentity::Node(3)));
        assert_eq!(parse_identity("client/ci"), Some(CertifiedIdentity::Client("ci".into())));
        for bad in ["node/0", "node/x", "node/", "client/", "admin/1", "node"] {
            assert_eq!(parse_identity(bad), None, "{bad:?}");
        }
    }
}
