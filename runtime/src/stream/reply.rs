//! Plain HTTP answers of the streaming server (refusals with a reason).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

/// A plain answer with a text body.
pub(super) fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.into() + "\n")));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}
