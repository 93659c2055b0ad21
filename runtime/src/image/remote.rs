//! Talking to a registry: manifests and blobs over HTTP(S), every answer read with a cap.
//!
//! oci-client reads whole answers into memory (manifests, and the body of any answer
//! that is not a success, blobs included), so a registry could make podvisord hold
//! gigabytes. Here reqwest, the HTTP client oci-client is built on, fetches: a manifest
//! is read up to its cap (or its declared size) and no further, a blob comes as a stream
//! for the blob store to cut at its declared size, and an error answer is read up to
//! [`ERROR_BODY_MAX`] for its message. oci-client still does the token exchange
//! ([`Client::auth`]), which reads the token server's answer whole: that server is named
//! by the registry, so that one read is not capped (a known gap).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::errors::{OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE, OciImageManifest, OciManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use podvisor_common::error_chain;
use reqwest::StatusCode;
use reqwest::header::ACCEPT;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::endpoints::{Endpoint, plain_http_hosts};
use super::error::ImageError;
use super::limits::Limit;
use super::reference::ImageName;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for any single read from a registry.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// How much of an error answer is read, for its message.
pub const ERROR_BODY_MAX: usize = 64 << 10;
/// The manifest media types asked for.
const MANIFEST_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// The HTTP clients of one pull, for all the endpoints it may try. Cheap to clone.
#[derive(Clone)]
pub(super) struct Remote {
    http: reqwest::Client,
    /// For the token exchange only.
    oci: Client,
    plain_http: Arc<Vec<String>>,
}

/// An image manifest found for a reference.
pub(super) struct Resolved {
    pub manifest: OciImageManifest,
    /// The digest of `manifest`.
    pub digest: String,
    /// The index's digest when the reference named a multi-platform index.
    pub list_digest: Option<String>,
}

/// How requests of a session authenticate.
#[derive(Clone)]
enum Credentials {
    None,
    Bearer(String),
    Basic(String, String),
}

/// One repository on one endpoint, with the credentials its registry asked for.
pub(super) struct Session {
    remote: Remote,
    reference: Reference,
    credentials: RegistryAuth,
    current: Mutex<Credentials>,
    /// The image, for errors.
    name: String,
    host: String,
}

/// The first lines of a manifest: enough to refuse what is not one.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Versioned {
    schema_version: u32,
    media_type: Option<String>,
}

impl Remote {
    /// Clients for `endpoints`: plain HTTP where configured.
    pub(super) fn new(endpoints: &[Endpoint]) -> Result<Self, ImageError> {
        let plain_http = plain_http_hosts(endpoints);
        let client_error = |e: OciDistributionError| ImageError::Client(Arc::new(e));
        let oci = Client::try_from(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain_http.clone()),
            platform_resolver: Some(Box::new(linux_amd64_resolver)),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..ClientConfig::default()
        })
        .map_err(client_error)?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|e| client_error(e.into()))?;
        Ok(Remote {
            http,
            oci,
            plain_http: Arc::new(plain_http),
        })
    }

    /// A session for `name` on `endpoint` (`reference` is the name at that endpoint),
    /// authenticated as the registry asks, with `credentials` if it asks for them.
    pub(super) async fn session(
        &self,
        name: &ImageName,
        endpoint: &Endpoint,
        reference: Reference,
        credentials: RegistryAuth,
    ) -> Result<Session, ImageError> {
        let session = Session {
            remote: self.clone(),
            reference,
            credentials,
            current: Mutex::new(Credentials::None),
            name: name.to_string(),
            host: endpoint.host.clone(),
        };
        session.authorize().await.map_err(|e| session.error(e))?;
        Ok(session)
    }
}

impl Session {
    /// Asks the registry which credentials it wants (a token, or basic credentials).
    async fn authorize(&self) -> Result<(), OciDistributionError> {
        let token = self
            .remote
            .oci
            .auth(&self.reference, &self.credentials, RegistryOperation::Pull)
            .await?;
        let credentials = match (token, &self.credentials) {
            (Some(token), _) => Credentials::Bearer(token),
            (None, RegistryAuth::Basic(user, pass)) => {
                Credentials::Basic(user.clone(), pass.clone())
            }
            (None, _) => Credentials::None,
        };
        *podvisor_common::lock(&self.current) = credentials;
        Ok(())
    }

    /// `<scheme>://<registry>/v2/<repository>/<kind>/<id>`.
    fn url(&self, kind: &str, id: &str) -> String {
        let registry = self.reference.resolve_registry();
        let scheme = if self.remote.plain_http.iter().any(|h| h == registry) {
            "http"
        } else {
            "https"
        };
        let ns = self
            .reference
            .namespace()
            .map(|ns| format!("?ns={ns}"))
            .unwrap_or_default();
        format!(
            "{scheme}://{registry}/v2/{}/{kind}/{id}{ns}",
            self.reference.repository()
        )
    }

    /// GETs `url`; a 200 answer is returned unread. A 401 renews the credentials once
    /// (a token may expire during a long pull).
    async fn get(
        &self,
        url: &str,
        accept: &[&str],
    ) -> Result<reqwest::Response, OciDistributionError> {
        let mut renewed = false;
        loop {
            let mut request = self.remote.http.get(url);
            if !accept.is_empty() {
                request = request.header(ACCEPT, accept.join(", "));
            }
            let credentials = podvisor_common::lock(&self.current).clone();
            request = match credentials {
                Credentials::None => request,
                Credentials::Bearer(token) => request.bearer_auth(token),
                Credentials::Basic(user, pass) => request.basic_auth(user, Some(pass)),
            };
            let response = request.send().await?;
            let status = response.status();
            if status == StatusCode::OK {
                return Ok(response);
            }
            if status == StatusCode::UNAUTHORIZED && !renewed {
                renewed = true;
                self.authorize().await?;
                continue;
            }
            let body = read_error_body(response).await;
            return Err(answer_error(status, &body, url));
        }
    }

    /// The linux/amd64 image manifest of the session's reference: an index is resolved
    /// to its linux/amd64 entry. Every manifest is read up to `max` bytes.
    pub(super) async fn manifest(&self, max: u64) -> Result<Resolved, ImageError> {
        let wanted = self.reference.digest();
        let id = wanted.or(self.reference.tag()).unwrap_or("latest");
        let (manifest, digest) = self.manifest_at(id, wanted, None, max).await?;
        let index = match manifest {
            OciManifest::Image(manifest) => {
                return Ok(Resolved {
                    manifest,
                    digest,
                    list_digest: None,
                });
            }
            OciManifest::ImageIndex(index) => index,
        };
        let not_found = |what: &str| {
            self.error(OciDistributionError::ImageManifestNotFoundError(
                what.to_string(),
            ))
        };
        let platform = linux_amd64_resolver(&index.manifests)
            .ok_or_else(|| not_found("no linux/amd64 entry in the image index"))?;
        let entry = index
            .manifests
            .iter()
            .find(|m| m.digest == platform)
            .ok_or_else(|| not_found("no linux/amd64 entry in the image index"))?;
        let declared = u64::try_from(entry.size)
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| ImageError::BadManifest {
                reference: self.name.clone(),
                message: format!(
                    "index entry {platform} declares size {} (must be above 0)",
                    entry.size
                ),
            })?;
        match self
            .manifest_at(&platform, Some(&platform), Some(declared), max)
            .await?
        {
            (OciManifest::Image(manifest), _) => Ok(Resolved {
                manifest,
                digest: platform,
                list_digest: Some(digest),
            }),
            (OciManifest::ImageIndex(_), _) => {
                Err(not_found("the index's linux/amd64 entry is another index"))
            }
        }
    }

    /// The manifest `id` (a tag or digest), checked against `wanted` (a digest) and the
    /// `declared` size. Returns it and its digest.
    async fn manifest_at(
        &self,
        id: &str,
        wanted: Option<&str>,
        declared: Option<u64>,
        max: u64,
    ) -> Result<(OciManifest, String), ImageError> {
        let what = format!("manifest {id} of {} from {}", self.name, self.host);
        if let Some(d) = declared
            && d > max
        {
            return Err(ImageError::LimitExceeded {
                what: format!("{what}: declared {d} bytes"),
                limit: Limit::ManifestBytes,
                max,
            });
        }
        let url = self.url("manifests", id);
        let response = self
            .get(&url, MANIFEST_TYPES)
            .await
            .map_err(|e| self.error(e))?;
        let header_digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let cap = declared.unwrap_or(max);
        let body = read_capped(response, cap)
            .await
            .map_err(|e| self.error(e.into()))?;
        let body = match (body, declared) {
            (Some(body), Some(d)) if body.len() as u64 != d => {
                return Err(ImageError::SizeMismatch {
                    what,
                    declared: d,
                    actual: body.len().to_string(),
                });
            }
            (Some(body), _) => body,
            (None, Some(d)) => {
                return Err(ImageError::SizeMismatch {
                    what,
                    declared: d,
                    actual: format!("more than {d}"),
                });
            }
            (None, None) => {
                return Err(ImageError::LimitExceeded {
                    what: format!("{what}: more than {max} bytes"),
                    limit: Limit::ManifestBytes,
                    max,
                });
            }
        };
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        for expected in [wanted, header_digest.as_deref()].into_iter().flatten() {
            // The header may use another algorithm; the body's sha256 is what counts.
            if expected.starts_with("sha256:") && expected != digest {
                return Err(ImageError::DigestMismatch {
                    what,
                    expected: expected.to_string(),
                    actual: digest,
                });
            }
        }
        Ok((self.parse_manifest(&body)?, digest))
    }

    fn parse_manifest(&self, body: &[u8]) -> Result<OciManifest, ImageError> {
        let unsupported = |what: String| ImageError::Unsupported {
            reference: self.name.clone(),
            what,
        };
        let versioned: Versioned =
            serde_json::from_slice(body).map_err(|e| unsupported(format!("manifest ({e})")))?;
        if versioned.schema_version != 2 {
            return Err(unsupported(format!(
                "manifest schema version {}",
                versioned.schema_version
            )));
        }
        if let Some(t) = versioned.media_type
            && !MANIFEST_TYPES.contains(&t.as_str())
        {
            return Err(unsupported(format!("manifest media type {t}")));
        }
        serde_json::from_slice(body).map_err(|e| unsupported(format!("manifest ({e})")))
    }

    /// The blob `digest`, its body unread: the caller reads it with a cap.
    pub(super) async fn blob(&self, digest: &str) -> Result<reqwest::Response, ImageError> {
        let url = self.url("blobs", digest);
        self.get(&url, &[]).await.map_err(|e| self.error(e))
    }

    /// A registry client error of this session as what a CRI client can act on.
    pub(super) fn error(&self, error: OciDistributionError) -> ImageError {
        registry_error(&self.name, &self.host, error)
    }
}

/// The body of `response`, or `None` once it passes `max` bytes (reading stops there).
async fn read_capped(
    mut response: reqwest::Response,
    max: u64,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response.content_length().is_some_and(|len| len > max) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if (body.len() + chunk.len()) as u64 > max {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The first [`ERROR_BODY_MAX`] bytes of an error answer (whatever could be read).
async fn read_error_body(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_MAX {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = ERROR_BODY_MAX - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    body
}

/// The error of an answer other than 200, as oci-client makes it: an OCI error envelope
/// when the body is one, else the status and body.
fn answer_error(status: StatusCode, body: &[u8], url: &str) -> OciDistributionError {
    if status == StatusCode::UNAUTHORIZED {
        return OciDistributionError::UnauthorizedError {
            url: url.to_string(),
        };
    }
    if status.is_client_error()
        && let Ok(envelope) = serde_json::from_slice::<OciEnvelope>(body)
    {
        return OciDistributionError::RegistryError {
            envelope,
            url: url.to_string(),
        };
    }
    OciDistributionError::ServerError {
        code: status.as_u16(),
        url: url.to_string(),
        message: String::from_utf8_lossy(body).into_owned(),
    }
}

/// What a CRI client can do about a registry client error.
enum RegistryFailure {
    Unauthorized,
    NotFound,
    Unavailable,
    Digest,
    Unsupported,
    Other,
}

/// Sorts a registry client error into what a CRI client can act on.
pub(super) fn registry_error(name: &str, host: &str, error: OciDistributionError) -> ImageError {
    let registry = host.to_string();
    let reference = name.to_string();
    let failure = classify(&error);
    let source = Arc::new(error);
    match failure {
        RegistryFailure::Unauthorized => ImageError::Unauthorized {
            reference,
            registry,
            source,
        },
        RegistryFailure::NotFound => ImageError::NotInRegistry {
            reference,
            registry,
            source,
        },
        RegistryFailure::Unavailable => ImageError::Unavailable { registry, source },
        RegistryFailure::Digest => ImageError::DigestMismatch {
            what: format!("{reference} from {registry}"),
            expected: "the digest in the reference or header".into(),
            actual: error_chain(&*source),
        },
        RegistryFailure::Unsupported => ImageError::Unsupported {
            reference,
            what: format!("manifest ({})", error_chain(&*source)),
        },
        RegistryFailure::Other => ImageError::Registry { registry, source },
    }
}

/// The [`RegistryFailure`] of a registry client error: by its kind, its HTTP status, or
/// the OCI error codes of its answer.
fn classify(error: &OciDistributionError) -> RegistryFailure {
    match error {
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => {
            RegistryFailure::Unavailable
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => RegistryFailure::Unauthorized,
        OciDistributionError::ImageManifestNotFoundError(_) => RegistryFailure::NotFound,
        OciDistributionError::ServerError { code, .. } => match code {
            401 | 403 => RegistryFailure::Unauthorized,
            404 => RegistryFailure::NotFound,
            429 | 500.. => RegistryFailure::Unavailable,
            _ => RegistryFailure::Other,
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                RegistryFailure::Unauthorized
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                RegistryFailure::NotFound
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Toomanyrequests))
            {
                RegistryFailure::Unavailable
            } else {
                RegistryFailure::Other
            }
        }
        OciDistributionError::DigestError(_) => RegistryFailure::Digest,
        OciDistributionError::UnsupportedMediaTypeError(_)
        | OciDistributionError::UnsupportedSchemaVersionError(_)
        | OciDistributionError::ManifestParsingError(_)
        | OciDistributionError::VersionedParsingError(_) => RegistryFailure::Unsupported,
        _ => RegistryFailure::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    /// What the hostile registry answers to a GET other than `/v2/`.
    #[derive(Clone, Copy)]
    struct Answer {
        status: u16,
        /// A `Content-Length` header, true or not.
        content_length: Option<u64>,
        /// The body: this many bytes of `{`, or `None` for an endless one.
        body: Option<usize>,
    }

    /// Bytes a hostile answer sends at most, so that a failing test ends.
    const SERVER_MAX: u64 = 256 << 20;

    /// A registry on 127.0.0.1 that answers `/v2/` with 200 and every other GET with
    /// `answer`, one request per connection. Returns its host and the body bytes it sent.
    async fn hostile(answer: Answer) -> (String, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, answer, Arc::clone(&counter)));
            }
        });
        (host, sent)
    }

    async fn serve(stream: tokio::net::TcpStream, answer: Answer, sent: Arc<AtomicU64>) {
        let mut stream = BufReader::new(stream);
        let mut request = String::new();
        if stream.read_line(&mut request).await.is_err() {
            return;
        }
        let mut line = String::new();
        while stream.read_line(&mut line).await.is_ok_and(|n| n > 2) {
            line.clear();
        }
        let stream = stream.get_mut();
        if request.starts_with("GET /v2/ ") {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                .await;
            return;
        }
        let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", answer.status);
        if let Some(len) = answer.content_length {
            head.push_str(&format!("Content-Length: {len}\r\n"));
        }
        head.push_str("Content-Type: application/vnd.oci.image.manifest.v1+json\r\n\r\n");
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b'{'; 64 << 10];
        let mut left = answer.body.map_or(SERVER_MAX, |n| n as u64);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if stream.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            sent.fetch_add(n as u64, Ordering::Relaxed);
            left -= n as u64;
        }
    }

    async fn session(host: &str) -> Session {
        let name = ImageName::parse(&format!("{host}/test/hostile:1")).expect("name");
        let endpoint = Endpoint {
            host: host.to_string(),
            plain_http: true,
            mirror: false,
        };
        let remote = Remote::new(std::slice::from_ref(&endpoint)).expect("remote");
        remote
            .session(
                &name,
                &endpoint,
                name.at_host(host),
                RegistryAuth::Anonymous,
            )
            .await
            .expect("session")
    }

    /// Waits until the server stops sending, and returns what it sent.
    async fn settled(sent: &AtomicU64) -> u64 {
        let mut last = u64::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = sent.load(Ordering::Relaxed);
            if now == last {
                return now;
            }
            last = now;
        }
    }

    /// A manifest fetch with cap `max` from a server giving `answer`, which must fail; and
    /// what tells how much the server sent.
    async fn refused_manifest(answer: Answer, max: u64) -> (ImageError, Arc<AtomicU64>) {
        let (host, sent) = hostile(answer).await;
        let err = session(&host)
            .await
            .manifest(max)
            .await
            .err()
            .expect("refused");
        (err, sent)
    }

    #[tokio::test]
    async fn an_endless_manifest_is_read_up_to_the_cap() {
        let (err, sent) = refused_manifest(
            Answer {
                status: 200,
                content_length: None,
                body: None,
            },
            64 << 10,
        )
        .await;
        assert!(
            matches!(err, ImageError::LimitExceeded { limit: Limit::ManifestBytes, max, .. } if max == 64 << 10),
            "{err}"
        );
        assert!(err.to_string().contains("more than 65536 bytes"), "{err}");
        // The connection is dropped at the cap: what the server got out is the cap plus
        // what the sockets buffer, nowhere near its 256 MiB.
        let sent = settled(&sent).await;
        assert!(sent < 32 << 20, "the server sent {sent} bytes");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_cap_is_refused_unread() {
        let (err, _) = refused_manifest(
            Answer {
                status: 200,
                content_length: Some(10_000_000_000),
                body: Some(10),
            },
            4 << 20,
        )
        .await;
        assert!(
            matches!(
                err,
                ImageError::LimitExceeded {
                    limit: Limit::ManifestBytes,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_endless_error_answer_is_read_for_its_first_64_kib() {
        let (host, sent) = hostile(Answer {
            status: 500,
            content_length: None,
            body: None,
        })
        .await;
        let err = session(&host)
            .await
            .manifest(4 << 20)
            .await
            .err()
            .expect("refused");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        let chain = error_chain(&err);
        assert!(chain.contains("code: 500"), "{}", &chain[..200]);
        assert!(chain.len() < ERROR_BODY_MAX + 1024, "{} bytes", chain.len());
        let sent = settled(&sent).await;
        assert!(sent < 32 << 20, "the server sent {sent} bytes");

        // A blob's error answer alike.
        let err = session(&host)
            .await
            .blob("sha256:00")
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    }
}
