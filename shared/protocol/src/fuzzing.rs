//! The host side of the agent protocol against what a compromised guest may answer,
//! for libFuzzer (`shared/protocol/fuzz`) and, over fixed inputs, `cargo test`.

use std::io::{Read, Write};

use crate::client::{AgentClient, ClientError, GUEST_TEXT_MAX};
use crate::{encode, CreateContainer, ExecProcess, HelloReply, Rootfs, PROTOCOL_VERSION};

/// Everything the "agent" says, read in order; what the host writes goes nowhere.
struct Hostile<'a> {
    input: &'a [u8],
}

impl Read for Hostile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Hostile<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An error the host makes of a guest's answer keeps no more of the guest's text than
/// the bound, whatever the answer was.
fn check(e: &ClientError) {
    let n = e.to_string().len();
    assert!(n <= GUEST_TEXT_MAX + 256, "a {n}-byte error message");
}

/// A host client makes one call of each kind in turn and reads `data` as the agent's
/// answers. An even first byte puts a valid handshake answer first, so the search
/// spends its time on the calls. Returns how many calls got an answer they accepted.
pub fn agent_replies(data: &[u8]) -> usize {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    let mut input = Vec::with_capacity(rest.len() + 32);
    if mode & 1 == 0 {
        let hello = encode(&HelloReply::Accepted {
            version: PROTOCOL_VERSION,
            agent_version: "fuzz".into(),
        })
        .expect("a handshake answer encodes");
        input.extend_from_slice(&(hello.len() as u32).to_le_bytes());
        input.extend_from_slice(&hello);
    }
    input.extend_from_slice(rest);
    let mut c = match AgentClient::handshake(Hostile { input: &input }) {
        Ok(c) => c,
        Err(e) => {
            check(&e);
            return 0;
        }
    };
    let mut answered = 0;
    for call in 0..12 {
        let r: Result<(), ClientError> = match call {
            0 => c.health().map(drop),
            1 => c.guest_details().map(drop),
            2 => c.read_file("/proc/meminfo", 0, 4096).map(drop),
            3 => c.processes("c1").map(drop),
            4 => c.stats("c1").map(drop),
            5 => c.containers().map(drop),
            6 => c.wait("c1", Some("e1")).map(drop),
            7 => c.wait_oom().map(drop),
            8 => c.interfaces().map(drop),
            9 => c.routes().map(drop),
            10 => c
                .create_container(CreateContainer {
                    id: "c2".into(),
                    spec_json: "{}".into(),
                    rootfs: Rootfs::Path("/run/rootfs".into()),
                    stdin: false,
                })
                .map(drop),
            _ => c
                .exec(ExecProcess {
                    id: "c1".into(),
                    exec_id: "e2".into(),
                    process_json: "{}".into(),
                    stdin: false,
                })
                .map(drop),
        };
        match r {
            Ok(()) => answered += 1,
            Err(e) => check(&e),
        }
    }
    answered
}

/// `n` inputs of up to `max_len` bytes from a fixed xorshift stream: the same every run,
/// for running a fuzz body over in `cargo test`.
pub fn seeded_inputs(seed: u64, n: usize, max_len: usize) -> Vec<Vec<u8>> {
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let len = (next() as usize) % max_len;
            (0..len).map(|_| next() as u8).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentError, Response};

    fn frame(r: &Response) -> Vec<u8> {
        let p = encode(r).unwrap();
        let mut v = (p.len() as u32).to_le_bytes().to_vec();
        v.extend(p);
        v
    }

    #[test]
    fn hostile_answers_seeded() {
        for d in seeded_inputs(0xa9e7_0001, 3000, 300) {
            agent_replies(&d);
        }
    }

    #[test]
    fn well_formed_answers_are_accepted() {
        // Every call answered "not found": none accepted, the errors short.
        let mut d = vec![0u8];
        for _ in 0..12 {
            d.extend(frame(&Response::Error(AgentError::NotFound("c1".into()))));
        }
        assert_eq!(agent_replies(&d), 0);
        // Health answered properly is accepted.
        let mut d = vec![0u8];
        d.extend(frame(&Response::Health(crate::HealthInfo {
            agent_version: "1".into(),
            protocol_version: PROTOCOL_VERSION,
            kernel_release: "6.1".into(),
            uptime_ms: 5,
            modules_loaded: 0,
            modules_failed: 0,
        })));
        assert_eq!(agent_replies(&d), 1);
    }

    #[test]
    fn a_guest_error_message_is_cut_to_the_bound() {
        let mut d = vec![0u8];
        d.extend(frame(&Response::Error(AgentError::Runtime(
            "x".repeat(900_000),
        ))));
        // check() inside asserts the bound; before it the message was 900 kB.
        assert_eq!(agent_replies(&d), 0);
        let mut refused = Vec::new();
        let p = encode(&HelloReply::Refused {
            reason: "y".repeat(900_000),
        })
        .unwrap();
        refused.push(1);
        refused.extend((p.len() as u32).to_le_bytes());
        refused.extend(p);
        assert_eq!(agent_replies(&refused), 0);
    }
}
