//! HTTP/1.1 over a Unix socket, the way both hops of hearth talk: the CLI
//! to `hearthd`, and `hearthd` to each Firecracker. One [`UnixConnection`]
//! is one keep-alive connection; requests on it go one after another.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the socket (or it does not exist).
    #[error("cannot connect to {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke or the peer spoke something other than HTTP.
    #[error("HTTP exchange with {} failed ({method} {uri})", path.display())]
    Http {
        /// The socket.
        path: PathBuf,
        /// Request method.
        method: Method,
        /// Request path.
        uri: String,
        /// What hyper saw.
        #[source]
        source: hyper::Error,
    },
    /// The request could not be built (a bad path).
    #[error("invalid request {method} {uri}")]
    Build {
        /// Request method.
        method: Method,
        /// Request path.
        uri: String,
        /// Why.
        #[source]
        source: hyper::http::Error,
    },
}

impl ClientError {
    /// True when the peer is not there at all (no socket, nobody listening).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Connect { .. })
    }
}

/// A complete answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status.
    pub status: StatusCode,
    /// Whole body.
    pub body: Bytes,
}

/// One keep-alive HTTP/1.1 connection over a Unix socket.
#[derive(Debug)]
pub struct UnixConnection {
    path: PathBuf,
    sender: SendRequest<Full<Bytes>>,
}

impl UnixConnection {
    /// Connects and performs the HTTP handshake.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ClientError::Http {
                path: path.to_owned(),
                method: Method::GET,
                uri: "(handshake)".into(),
                source,
            })?;
        // The connection task ends when the sender is dropped or the peer
        // closes; its error, if any, surfaces on the next request.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(UnixConnection {
            path: path.to_owned(),
            sender,
        })
    }

    /// Sends one request and returns the status and the streaming body.
    pub async fn send_streaming(
        &mut self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Incoming), ClientError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|source| ClientError::Build {
                method: method.clone(),
                uri: uri.to_owned(),
                source,
            })?;
        let http_err = |source| ClientError::Http {
            path: self.path.clone(),
            method: method.clone(),
            uri: uri.to_owned(),
            source,
        };
        self.sender.ready().await.map_err(http_err)?;
        let resp = self.sender.send_request(req).await.map_err(http_err)?;
        let status = resp.status();
        Ok((status, resp.into_body()))
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(
        &mut self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        let (status, incoming) = self.send_streaming(method.clone(), uri, body).await?;
        let body = incoming
            .collect()
            .await
            .map_err(|source| ClientError::Http {
                path: self.path.clone(),
                method,
                uri: uri.to_owned(),
                source,
            })?
            .to_bytes();
        Ok(Response { status, body })
    }
}

/// Connects, sends one request, reads the answer.
pub async fn request(
    path: &Path,
    method: Method,
    uri: &str,
    body: Option<Vec<u8>>,
) -> Result<Response, ClientError> {
    UnixConnection::connect(path)
        .await?
        .send(method, uri, body)
        .await
}

pub use hyper::body::Incoming as HttpBody;
pub use hyper::{Method as HttpMethod, StatusCode as HttpStatus};
