//! Who is calling, and how often a caller who is not root may make the calls open to
//! everyone: a token bucket per caller uid (not per connection: a local user can open
//! as many connections as it likes). What it bounds is work a call makes bulkheadd do
//! (an agent call, `/proc` reads, a peer call), so that a local user looping on one
//! holds up nobody else.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use bulkhead_dbus::Error;
use bulkhead_host::config::ApiConfig;
use zbus::message::Header;
use zbus::Connection;

/// Most callers (bus names, uids) remembered; past it the tables start again, which
/// at worst forgets a bucket's debt.
const MAX_REMEMBERED: usize = 4096;

/// One caller's allowance: `tokens` left as of `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct CallerLimit {
    per_s: f64,
    burst: f64,
    unlimited: Vec<u32>,
    /// bulkheadd's own uid, never counted (as root).
    me: u32,
    buckets: Mutex<HashMap<u32, Bucket>>,
    /// A bus's unique names are never reused while it runs: a name's uid stays true.
    uids: Mutex<HashMap<String, u32>>,
}

impl CallerLimit {
    pub fn new(cfg: &ApiConfig) -> Self {
        CallerLimit {
            per_s: f64::from(cfg.open_calls_per_s),
            burst: f64::from(cfg.open_calls_burst),
            unlimited: cfg.unlimited_uids.clone(),
            // SAFETY: geteuid has no preconditions.
            me: unsafe { libc::geteuid() },
            buckets: Mutex::new(HashMap::new()),
            uids: Mutex::new(HashMap::new()),
        }
    }

    /// Is `uid` one of the administrators: root or bulkheadd's own uid?
    pub fn is_admin(&self, uid: u32) -> bool {
        uid == 0 || uid == self.me
    }

    /// The uid behind the call in `hdr`, asked of the bus once per connection.
    pub async fn caller(&self, conn: &Connection, hdr: &Header<'_>) -> Result<u32, Error> {
        let sender = hdr
            .sender()
            .ok_or_else(|| Error::AccessDenied("the call has no sender".into()))?;
        if let Some(uid) = lock(&self.uids).get(sender.as_str()) {
            return Ok(*uid);
        }
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        let uid = dbus
            .get_connection_unix_user(sender.clone().into())
            .await
            .map_err(|e| Error::AccessDenied(format!("cannot tell who {sender} is: {e}")))?;
        let mut uids = lock(&self.uids);
        if uids.len() >= MAX_REMEMBERED {
            uids.clear();
        }
        uids.insert(sender.to_string(), uid);
        Ok(uid)
    }

    /// Calls that change something, or hand out a process's stdio: administrators only.
    pub async fn require_admin(&self, conn: &Connection, hdr: &Header<'_>) -> Result<(), Error> {
        let uid = self.caller(conn, hdr).await?;
        if self.is_admin(uid) {
            Ok(())
        } else {
            Err(Error::AccessDenied(format!(
                "uid {uid} may not change sandboxes (root only)"
            )))
        }
    }

    /// An open call: counted against its caller's bucket unless the caller is an
    /// administrator or unlimited; refused at once when the bucket is empty.
    pub async fn open_call(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        what: &str,
    ) -> Result<(), Error> {
        let uid = self.caller(conn, hdr).await?;
        self.take(uid, what, Instant::now())
    }

    fn take(&self, uid: u32, what: &str, now: Instant) -> Result<(), Error> {
        if self.is_admin(uid) || self.unlimited.contains(&uid) {
            return Ok(());
        }
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= MAX_REMEMBERED && !buckets.contains_key(&uid) {
            buckets.retain(|_, b| b.tokens < self.burst);
        }
        let b = buckets.entry(uid).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let earned = now.saturating_duration_since(b.at).as_secs_f64() * self.per_s;
        b.tokens = (b.tokens + earned).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        tracing::debug!(uid, call = what, "open call refused: over its rate");
        Err(Error::LimitsExceeded(format!(
            "uid {uid} made more than {} open calls at once or {} a second ({what}); \
             try again later",
            self.burst, self.per_s
        )))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limit(per_s: u32, burst: u32, unlimited: Vec<u32>) -> CallerLimit {
        CallerLimit::new(&ApiConfig {
            open_calls_per_s: per_s,
            open_calls_burst: burst,
            unlimited_uids: unlimited,
        })
    }

    #[test]
    fn a_caller_gets_its_burst_then_its_rate() {
        let l = limit(10, 5, vec![]);
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(l.take(1000, "Stats", t0).is_ok(), "call {i} of the burst");
        }
        let e = l.take(1000, "Stats", t0).unwrap_err();
        assert!(
            matches!(&e, Error::LimitsExceeded(m) if m.contains("uid 1000") && m.contains("Stats")),
            "{e:?}"
        );
        // Another uid has a bucket of its own.
        assert!(l.take(1001, "Stats", t0).is_ok());
        // 10 a second: one more after 100 ms, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.take(1000, "Stats", t1).is_ok());
        assert!(l.take(1000, "Stats", t1).is_err());
        // A long rest refills no more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        let got = (0..20)
            .filter(|_| l.take(1000, "Stats", t2).is_ok())
            .count();
        assert_eq!(got, 5);
    }

    #[test]
    fn administrators_and_listed_uids_are_not_counted() {
        let l = limit(1, 1, vec![4242]);
        let t = Instant::now();
        for uid in [0, l.me, 4242] {
            for _ in 0..100 {
                assert!(l.take(uid, "Security", t).is_ok(), "uid {uid}");
            }
        }
        assert!(l.take(7, "Security", t).is_ok());
        assert!(l.take(7, "Security", t).is_err());
    }
}
