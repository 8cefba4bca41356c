//! Wire protocol between the bulkhead host and `bulkhead-agent` (guest PID 1).
//!
//! Every message is one frame: a little-endian `u32` payload length followed by a
//! postcard-encoded payload. Frames larger than [`MAX_FRAME`] are refused on both ends
//! before any allocation happens, so a hostile peer cannot make the reader allocate.
//!
//! A connection starts with a version handshake: the host sends [`Hello`], the agent
//! answers [`HelloReply`]. Only then are [`Request`]s accepted, each answered by exactly
//! one [`Response`].

pub mod client;
pub mod frame;

use serde::{Deserialize, Serialize};

pub use frame::{read_frame, write_frame, FrameError, MAX_FRAME};

/// Protocol version spoken by this build. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Oldest protocol version this build still accepts from a peer.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// vsock port the agent listens on, unless `bulkhead.agent_port=` on the kernel command
/// line says otherwise.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Largest file read a single [`Request::ReadFile`] may ask for.
pub const MAX_READ: u32 = 512 * 1024;

/// First message on every connection, host to agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub version: u32,
}

impl Hello {
    pub const MAGIC: [u8; 4] = *b"BHv1";

    pub fn current() -> Self {
        Hello {
            magic: Self::MAGIC,
            version: PROTOCOL_VERSION,
        }
    }
}

/// The agent's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Accepted; the version both sides now speak.
    Accepted { version: u32, agent_version: String },
    /// Refused; the connection is closed after this frame.
    Refused { reason: String },
}

/// Host to agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Is the agent alive, and what is it running on?
    Health,
    /// Mount a virtio-fs share by tag at `target` (created if missing).
    MountVirtiofs { tag: String, target: String },
    /// Read at most `len` bytes (capped at [`MAX_READ`]) at `offset` from a guest path
    /// (a file or a block device). Diagnostic; used by the test node.
    ReadFile { path: String, offset: u64, len: u32 },
    /// Flush file systems and power the guest off. Answered before the power-off.
    Shutdown,
    /// What the guest sees: kernel, online CPUs, memory.
    GuestDetails,
}

/// Agent to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Health(HealthInfo),
    GuestDetails(GuestDetails),
    Ok,
    Data(Vec<u8>),
    Error(AgentError),
}

/// What [`Request::Health`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthInfo {
    pub agent_version: String,
    pub protocol_version: u32,
    pub kernel_release: String,
    /// Guest uptime when the request was served, in milliseconds.
    pub uptime_ms: u64,
    /// Kernel modules the agent loaded at boot, and how many failed.
    pub modules_loaded: u32,
    pub modules_failed: u32,
}

/// What [`Request::GuestDetails`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDetails {
    pub kernel_release: String,
    pub cpus_online: u32,
    pub mem_total_kib: u64,
}

/// A typed error from the agent. The agent keeps serving after sending one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AgentError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("i/o error: {0}")]
    Io(String),
    #[error("unsupported by this agent: {0}")]
    Unsupported(String),
}

/// Encode a message into a payload (no length prefix).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    postcard::to_stdvec(msg).map_err(|e| FrameError::Encode(e.to_string()))
}

/// Decode a payload. Trailing bytes are an error: a frame holds exactly one message.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes::<T>(payload) {
        Ok((msg, [])) => Ok(msg),
        Ok((_, rest)) => Err(FrameError::Decode(format!(
            "{} trailing bytes after message",
            rest.len()
        ))),
        Err(e) => Err(FrameError::Decode(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_request() {
        let reqs = [
            Request::Health,
            Request::MountVirtiofs {
                tag: "share".into(),
                target: "/mnt".into(),
            },
            Request::ReadFile {
                path: "/dev/vda".into(),
                offset: 4096,
                len: 512,
            },
            Request::Shutdown,
            Request::GuestDetails,
        ];
        for r in reqs {
            let bytes = encode(&r).unwrap();
            assert_eq!(decode::<Request>(&bytes).unwrap(), r);
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&Request::Health).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<Request>(&bytes),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for seed in 0u32..2000 {
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i as u32 * 97) >> 7) as u8)
                .collect();
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
            let _ = decode::<Hello>(&bytes);
        }
    }

    #[test]
    fn huge_declared_vec_length_does_not_allocate() {
        // Response::Data with a varint length of u32::MAX and no bytes behind it.
        let payload = [2u8, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(decode::<Response>(&payload).is_err());
    }
}
