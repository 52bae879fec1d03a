//! The deployers an agent speaks to: one `--server`, or several replicas of one deployer. One
//! is in use at a time. A request that could not reach it goes to the next at once; one that
//! failed after it was sent (no answer in time, a 5xx) is not sent twice, but the next request
//! goes to the next replica.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::http::PostError;

#[derive(Clone)]
pub struct Servers {
    urls: Arc<[String]>,
    /// Index of the one in use, shared by the main loop and the job poller.
    current: Arc<AtomicUsize>,
}

impl Servers {
    /// `urls` is not empty: the command line requires a `--server`.
    pub fn new(urls: Vec<String>) -> Servers {
        assert!(!urls.is_empty(), "at least one --server");
        Servers {
            urls: urls.into(),
            current: Arc::default(),
        }
    }

    pub fn current(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    pub fn all(&self) -> &[String] {
        &self.urls
    }

    /// POSTs `body` to `path` on the server in use (see [`crate::http::post`]); when it could
    /// not be sent there, to each other one in turn, keeping the first that answers.
    pub fn post(
        &self,
        http: &ureq::Agent,
        path: &str,
        bearer: Option<&str>,
        body: &[u8],
        deadline: Duration,
        max: u64,
    ) -> Result<Vec<u8>, PostError> {
        let mut last = None;
        for _ in 0..self.urls.len() {
            let at = self.current.load(Ordering::Relaxed);
            let url = &self.urls[at % self.urls.len()];
            match crate::http::post(http, url, path, bearer, body, deadline, max) {
                Err(e) if e.is_passing() && self.urls.len() > 1 => {
                    // The other thread may have moved on already: move only from this one.
                    let next = at.wrapping_add(1);
                    let moved = self.current.compare_exchange(
                        at,
                        next,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    if moved.is_ok() {
                        let next = &self.urls[next % self.urls.len()];
                        say!("{url} failed ({e}); next: {next}");
                    }
                    if !e.is_unsent() {
                        return Err(e);
                    }
                    last = Some(e);
                }
                answer => return answer,
            }
        }
        Err(last.expect("at least one server was asked"))
    }
}
