//! The HTTP side: `GET /metrics` on hyper's HTTP/1 server, with bounds a scraper or a
//! stray client cannot get past: a cap on open connections (the next waits in the
//! listen backlog), a header read timeout, a small request buffer and a whole-connection
//! time limit. Scrapes are served from one cache (see [`Exporter`]), so however many
//! clients ask, bulkheadd is read at most once per interval.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};

use crate::render::{self, ExporterFigures};
use crate::snapshot::{Collector, Snapshot};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// The longest a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one connection lives (keep-alive included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// The request buffer (hyper's smallest): a longer request line or header is refused.
const MAX_REQUEST: usize = 8192;
/// The longest one read of bulkheadd may take, all calls together.
const SCRAPE_LIMIT: Duration = Duration::from_secs(10);

/// The exporter: the collector and the last exposition, shared by every connection.
pub struct Exporter {
    inner: Mutex<Inner>,
    min_interval: Duration,
}

struct Inner {
    collector: Collector,
    /// The last exposition; `Bytes` so that every answer shares it without a copy.
    last: Option<(Instant, Bytes)>,
    failed_calls_total: u64,
}

impl Exporter {
    /// `min_interval`: scrapes closer together than this get the last exposition.
    pub fn new(collector: Collector, min_interval: Duration) -> Exporter {
        Exporter {
            inner: Mutex::new(Inner {
                collector,
                last: None,
                failed_calls_total: 0,
            }),
            min_interval,
        }
    }

    /// The exposition: read now, or the last one if it is recent. Concurrent callers
    /// wait for one read instead of each starting their own.
    pub async fn scrape(&self) -> Bytes {
        let mut g = self.inner.lock().await;
        if let Some((at, text)) = &g.last {
            if at.elapsed() < self.min_interval {
                return text.clone();
            }
        }
        let t0 = Instant::now();
        let snap = tokio::time::timeout(SCRAPE_LIMIT, g.collector.collect())
            .await
            .unwrap_or_else(|_| {
                tracing::warn!("reading bulkheadd took over {SCRAPE_LIMIT:?}");
                Snapshot {
                    manager: None,
                    failed_calls: 1,
                }
            });
        g.failed_calls_total += snap.failed_calls;
        let figures = ExporterFigures {
            scrape_duration: t0.elapsed(),
            failed_calls_total: g.failed_calls_total,
        };
        let text = Bytes::from(render::render(&snap, figures));
        g.last = Some((Instant::now(), text.clone()));
        text
    }
}

/// Serve until the process ends.
pub async fn serve(listener: TcpListener, exporter: Arc<Exporter>) {
    let gate = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: wait instead of spinning on the error.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ex = exporter.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| handle(ex.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST)
                .serve_connection(TokioIo::new(stream), svc);
            // Past its lifetime the connection is dropped, closing it.
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                tracing::debug!("connection: {e}");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        content_type.parse().expect("a valid header value"),
    );
    r
}

async fn handle(
    ex: Arc<Exporter>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    Ok(match req.uri().path() {
        "/metrics" if read => {
            let text = ex.scrape().await;
            reply(StatusCode::OK, render::CONTENT_TYPE, text)
        }
        "/" if read => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "bulkhead-metrics: Prometheus metrics of bulkhead's sandboxes at /metrics\n",
        ),
        "/metrics" | "/" => {
            let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n");
            r.headers_mut()
                .insert(ALLOW, "GET, HEAD".parse().expect("valid"));
            r
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n",
        ),
    })
}
