//! The control plane's shared secret. Every gRPC call an agent makes carries it (metadata
//! `x-tidemill-token`); the coordinator compares it in constant time and rejects, and logs,
//! a call without it or with a wrong one. The secret comes from `TIDEMILL_TOKEN`, else the
//! file `launch.token_file`; a one-node job without either makes its own (agent and
//! coordinator share the process), a multi-node job must be given one.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::LaunchOptions;
use crate::error::{Error, Result};

pub const TOKEN_ENV: &str = "TIDEMILL_TOKEN";
pub const HEADER: &str = "x-tidemill-token";

/// The job's secret (never printed).
#[derive(Clone)]
pub struct Token(MetadataValue<Ascii>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// `TIDEMILL_TOKEN`, else `launch.token_file`'s first line, else (one node only) a
    /// fresh random one.
    pub fn resolve(launch: &LaunchOptions) -> Result<Self> {
        if let Ok(text) = std::env::var(TOKEN_ENV) {
            return Self::parse(&text, TOKEN_ENV);
        }
        if let Some(path) = &launch.token_file {
            let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigIo {
                path: path.clone(),
                source,
            })?;
            return Self::parse(
                text.lines().next().unwrap_or(""),
                &path.display().to_string(),
            );
        }
        if launch.nnodes > 1 {
            return Err(Error::Config {
                file: "launch.token_file".into(),
                message: format!(
                    "a job of {} nodes needs a shared secret for its control plane: set \
                     {TOKEN_ENV} or launch.token_file on every node",
                    launch.nnodes
                ),
            });
        }
        let random: [u8; 24] = rand::random();
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        Self::parse(&hex, "a generated token")
    }

    /// A token from text: printable ASCII without spaces, at least 16 characters.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let t = text.trim();
        let bad = |message: &str| Error::Config {
            file: source.into(),
            message: message.into(),
        };
        if t.len() < 16 {
            return Err(bad(
                "the control-plane token must be at least 16 characters",
            ));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "the control-plane token must be printable ASCII without spaces",
            ));
        }
        MetadataValue::try_from(t)
            .map(Self)
            .map_err(|_| bad("the control-plane token is not a valid header value"))
    }

    fn matches(&self, given: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        // Lengths are not secret; the bytes are compared without an early exit.
        mine.len() == given.len() && bool::from(mine.ct_eq(given))
    }
}

/// Client side: puts the token on every call.
#[derive(Clone, Debug)]
pub struct Attach(pub Token);

impl Interceptor for Attach {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(HEADER, self.0 .0.clone());
        Ok(request)
    }
}

/// Server side: lets a call through only with the job's token; otherwise tells `rejected`
/// (the peer's address and why) and answers UNAUTHENTICATED.
#[derive(Clone)]
pub struct Check {
    pub token: Token,
    pub rejected: Arc<dyn Fn(String, &'static str) + Send + Sync>,
}

impl Interceptor for Check {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let why = match request.metadata().get(HEADER) {
            None => "no token",
            Some(v) if self.token.matches(v.as_bytes()) => return Ok(request),
            Some(_) => "wrong token",
        };
        let peer = request
            .remote_addr()
            .map_or_else(|| "an unknown peer".to_string(), |a| a.to_string());
        (self.rejected)(peer, why);
        Err(Status::unauthenticated(format!(
            "{why}: this coordinator accepts only calls carrying the job's token ({TOKEN_ENV} or launch.token_file)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole_and_bad_ones_are_refused() {
        let t = Token::parse("0123456789abcdef-secret", "test").expect("token");
        assert!(t.matches(b"0123456789abcdef-secret"));
        assert!(!t.matches(b"0123456789abcdef-secreT"));
        assert!(!t.matches(b"0123456789abcdef-secre"));
        assert!(!t.matches(b""));
        assert!(Token::parse("short", "x").is_err());
        assert!(Token::parse("has a space in it, long", "x").is_err());
        assert!(!format!("{t:?}").contains("secret"));
        let one = LaunchOptions::default();
        if std::env::var(TOKEN_ENV).is_err() {
            assert!(Token::resolve(&one).is_ok(), "one node makes its own");
            let two = LaunchOptions {
                nnodes: 2,
                ..LaunchOptions::default()
            };
            let err = Token::resolve(&two)
                .expect_err("two nodes need one")
                .to_string();
            assert!(err.contains(TOKEN_ENV), "{err}");
        }
    }
}
