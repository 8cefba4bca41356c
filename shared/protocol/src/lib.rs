//! Wire protocol between the bulkhead host and `bulkhead-agent` (guest PID 1).
//!
//! Every message is one frame: a little-endian `u32` payload length followed by a
//! postcard-encoded payload. Frames larger than [`MAX_FRAME`] are refused on both ends
//! before any allocation happens, so a hostile peer cannot make the reader allocate.
//!
//! A connection starts with a version handshake: the host sends [`Hello`], the agent
//! answers [`HelloReply`]. Only then are [`Request`]s accepted, each answered by exactly
//! one [`Response`]. A connection serves one request at a time; a long wait
//! ([`Request::Wait`], [`Request::WaitOom`]) holds only its own connection, so callers open
//! one connection per long wait and keep control calls on another.
//!
//! A connection can also become a raw byte stream: after [`Request::AttachStdio`] is
//! answered with [`Response::Ok`], the connection carries one stdio stream of one process
//! (no frames) until either side closes it. Each stream has its own connection, so a slow
//! reader of one process's output never blocks control calls or other streams.
//!
//! The full API, with the semantics of every call, is in `docs/agent-api.md`.

pub mod client;
pub mod frame;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod net;

use serde::{Deserialize, Serialize};

pub use frame::{payload_len, read_frame, write_frame, FrameError, MAX_FRAME};

/// Protocol version spoken by this build. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 3;

/// Oldest protocol version this build still accepts from a peer.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// vsock port the agent listens on, unless `bulkhead.agent_port=` on the kernel command
/// line says otherwise.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Host vsock port the agent connects to, once, as soon as it listens on its own port:
/// the host's word that the guest's vsock device is up and the agent is there. The host
/// connects to the agent only after it (on hybrid vsock: a listener at
/// `<socket>_<port>`). A host connection that reaches vhost-device-vsock while QEMU is
/// still starting the device (memory table sent, queues not yet ready) stops that back
/// end's worker thread for good, so polling from the first moment is not safe.
pub const AGENT_READY_VSOCK_PORT: u32 = 1025;

/// The boot timer: the agent writes [`BOOT_TIMER_MAGIC`] to this x86 I/O port as the
/// first thing it does as init, and bulkhead-vmm records the moment (exec to init
/// without vsock). Other VMMs ignore the write.
pub const BOOT_TIMER_PORT: u16 = 0x440;
pub const BOOT_TIMER_MAGIC: u8 = 0xb0;

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

/// Longest container or exec id the agent accepts.
pub const MAX_ID_LEN: usize = 128;

/// Host to agent. New variants are only ever appended, so the encoding of older ones
/// stays stable across protocol versions.
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

    // ---- protocol 2: sandbox and containers ----
    /// Set up the pod: its shared IPC and UTS namespaces (and PID namespace when
    /// `share_pid`), its hostname. At most one sandbox per agent.
    CreateSandbox(SandboxConfig),
    /// Kill and delete every container, then tear the sandbox namespaces down.
    DestroySandbox,
    /// Create a container from an OCI runtime spec (config.json text). Its process is
    /// created but not started; its stdio pipes exist from now on, so output written
    /// before anyone attaches waits in the pipe (and then blocks the writer).
    CreateContainer(CreateContainer),
    /// Start a created container's process.
    StartContainer { id: String },
    /// Run an extra process in a running container.
    Exec(ExecProcess),
    /// Send `signal` to the container's init (or `exec_id`'s process); with `all`, to
    /// every process in the container.
    Signal {
        id: String,
        exec_id: Option<String>,
        signal: i32,
        all: bool,
    },
    /// Block until the process exits; answered with [`Response::Exited`]. Holds its
    /// connection only.
    Wait { id: String, exec_id: Option<String> },
    /// Delete a stopped (or created) container; `force` kills a running one first.
    DeleteContainer { id: String, force: bool },
    /// Freeze every process of the container (cgroup freezer).
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Change the container's cgroup limits: OCI `linux.resources` JSON.
    Update { id: String, resources_json: String },
    /// The container's processes (guest pids).
    ListProcesses { id: String },
    /// cpu, memory, io and pids figures from the container's guest cgroup.
    Stats { id: String },
    /// Block until a container has a process killed by the OOM killer; answered with
    /// [`Response::Oom`]. Every OOM kill is reported once, to one waiter, in order.
    WaitOom,
    /// Turn this connection into one stdio stream of a process (see the crate docs).
    AttachStdio {
        id: String,
        exec_id: Option<String>,
        stream: StdioStream,
    },
    /// Set the window size of a process's terminal.
    ResizePty {
        id: String,
        exec_id: Option<String>,
        rows: u16,
        cols: u16,
    },
    /// Close the process's stdin (the process reads end-of-file).
    CloseStdin { id: String, exec_id: Option<String> },
    /// Set the guest's wall clock (nanoseconds since the Unix epoch). Refused outside a
    /// guest, where it would set the host's clock.
    SetTime { unix_nanos: u64 },
    /// Every container the agent knows, with its state.
    ListContainers,

    // ---- protocol 3: the pod's network ----
    /// Set the guest's network up: each interface (found by MAC) renamed, given its MTU
    /// and addresses and brought up, then the routes added. Checked first by
    /// [`net::validate`]; nothing is changed when the check fails. Refused outside a guest.
    UpdateNetwork {
        interfaces: Vec<net::NetInterface>,
        routes: Vec<net::NetRoute>,
    },
    /// The guest's interfaces (loopback aside) with their addresses.
    ListInterfaces,
    /// The guest's routes, those the kernel makes for an address's subnet aside.
    ListRoutes,
}

/// What [`Request::CreateSandbox`] sets up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxConfig {
    pub hostname: Option<String>,
    /// Containers whose spec joins a PID namespace by path share the sandbox's one.
    pub share_pid: bool,
}

/// Where a container's root file system comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rootfs {
    /// A directory already visible to the agent (in a guest: under a virtio-fs share).
    Path(String),
    /// A block device holding a file system (ext4, erofs), mounted by the agent.
    Block {
        device: String,
        fstype: String,
        readonly: bool,
    },
}

/// What [`Request::CreateContainer`] carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateContainer {
    pub id: String,
    /// The OCI runtime spec, as config.json text. `root.path` is replaced by `rootfs`;
    /// namespaces that name a path join the sandbox's namespaces of that type; the
    /// network namespace is always the sandbox's (the VM is the network boundary).
    pub spec_json: String,
    pub rootfs: Rootfs,
    /// Give the process a stdin pipe (otherwise it reads /dev/null).
    pub stdin: bool,
}

/// What [`Request::Exec`] carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecProcess {
    pub id: String,
    pub exec_id: String,
    /// An OCI `process` object as JSON.
    pub process_json: String,
    pub stdin: bool,
}

/// Which stdio stream [`Request::AttachStdio`] asks for. In terminal mode `Stdout`
/// carries the terminal's output and `Stderr` is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StdioStream {
    Stdin,
    Stdout,
    Stderr,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, or 128 + the signal number when a signal killed it (as shells and
    /// containerd report it).
    pub code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
}

/// A container's state as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Created,
    Running,
    Paused,
    Stopped,
}

/// One row of [`Response::Containers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    pub state: ContainerState,
    pub pid: Option<u32>,
}

/// Figures from a container's cgroup (v2). A figure the guest's cgroups do not provide
/// (controller not enabled) is `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    pub cpu_usage_usec: Option<u64>,
    pub cpu_user_usec: Option<u64>,
    pub cpu_system_usec: Option<u64>,
    pub memory_current: Option<u64>,
    pub memory_limit: Option<u64>,
    pub memory_oom_kills: Option<u64>,
    pub pids_current: Option<u64>,
    pub pids_limit: Option<u64>,
    pub io_read_bytes: Option<u64>,
    pub io_write_bytes: Option<u64>,
}

/// Agent to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Health(HealthInfo),
    GuestDetails(GuestDetails),
    Ok,
    Data(Vec<u8>),
    Error(AgentError),
    // ---- protocol 2 ----
    /// A process was created (container init or exec); its guest pid.
    Created {
        pid: u32,
    },
    Exited(ExitStatus),
    Processes(Vec<u32>),
    Stats(ContainerStats),
    /// A process in this container was killed by the OOM killer.
    Oom {
        id: String,
    },
    Containers(Vec<ContainerInfo>),
    // ---- protocol 3 ----
    Interfaces(Vec<net::NetInterface>),
    Routes(Vec<net::NetRoute>),
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
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The object exists but is in the wrong state for the call (exec into a stopped
    /// container, start twice, delete a running one without force).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The container runtime refused or failed (bad spec, missing rootfs, ...).
    #[error("container runtime: {0}")]
    Runtime(String),
}

impl AgentError {
    /// The same error with `f` applied to its message.
    pub fn map_text(self, f: impl FnOnce(String) -> String) -> Self {
        use AgentError::*;
        match self {
            Malformed(s) => Malformed(f(s)),
            InvalidArgument(s) => InvalidArgument(f(s)),
            NotFound(s) => NotFound(f(s)),
            Io(s) => Io(f(s)),
            Unsupported(s) => Unsupported(f(s)),
            AlreadyExists(s) => AlreadyExists(f(s)),
            FailedPrecondition(s) => FailedPrecondition(f(s)),
            Runtime(s) => Runtime(f(s)),
        }
    }
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
    fn round_trip_container_calls_and_answers() {
        let reqs = [
            Request::CreateSandbox(SandboxConfig {
                hostname: Some("pod".into()),
                share_pid: true,
            }),
            Request::CreateContainer(CreateContainer {
                id: "c1".into(),
                spec_json: "{}".into(),
                rootfs: Rootfs::Block {
                    device: "/dev/vdb".into(),
                    fstype: "erofs".into(),
                    readonly: true,
                },
                stdin: true,
            }),
            Request::Signal {
                id: "c1".into(),
                exec_id: Some("e".into()),
                signal: 15,
                all: false,
            },
            Request::AttachStdio {
                id: "c1".into(),
                exec_id: None,
                stream: StdioStream::Stderr,
            },
            Request::SetTime {
                unix_nanos: u64::MAX,
            },
            Request::ListContainers,
        ];
        for r in reqs {
            assert_eq!(decode::<Request>(&encode(&r).unwrap()).unwrap(), r);
        }
        let resps = [
            Response::Exited(ExitStatus {
                code: 137,
                signal: Some(9),
            }),
            Response::Stats(ContainerStats {
                memory_current: Some(1),
                ..Default::default()
            }),
            Response::Containers(vec![ContainerInfo {
                id: "c1".into(),
                state: ContainerState::Paused,
                pid: Some(7),
            }]),
        ];
        for r in resps {
            assert_eq!(decode::<Response>(&encode(&r).unwrap()).unwrap(), r);
        }
    }

    #[test]
    fn protocol_1_encodings_are_unchanged() {
        // Variant indices of protocol 1 requests must never move.
        assert_eq!(encode(&Request::Health).unwrap(), [0]);
        assert_eq!(encode(&Request::Shutdown).unwrap(), [3]);
        assert_eq!(encode(&Request::GuestDetails).unwrap(), [4]);
        assert_eq!(encode(&Response::Ok).unwrap(), [2]);
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
        // Every answer that carries a list, declaring u32::MAX elements with none behind
        // them: an error, not a 4 GiB allocation. The tag is taken from a real encoding,
        // so the test cannot drift onto another variant.
        for sample in [
            Response::Data(vec![]),
            Response::Processes(vec![]),
            Response::Containers(vec![]),
            Response::Interfaces(vec![]),
            Response::Routes(vec![]),
        ] {
            let mut payload = encode(&sample).unwrap();
            assert_eq!(
                payload.pop(),
                Some(0),
                "{sample:?} ends in its empty length"
            );
            payload.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
            assert!(decode::<Response>(&payload).is_err(), "{sample:?}");
        }
    }
}
