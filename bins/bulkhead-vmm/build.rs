//! Compile the reviewed seccomp policy (seccomp/x86_64.json) into BPF at build time, one
//! program per thread class and mode, written to OUT_DIR and included by src/seccomp.rs.

use std::io::Write;
use std::path::PathBuf;

const POLICY: &str = "seccomp/x86_64.json";
const CLASSES: &[&str] = &["main", "vcpu", "worker"];

fn main() {
    println!("cargo:rerun-if-changed={POLICY}");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let text = std::fs::read_to_string(POLICY).expect("read the seccomp policy");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("target arch");
    let mut listing = String::new();
    // `kill`: as reviewed. `log`: the same lists, a call outside them logged by the
    // kernel instead of killing (for finding what a new code path needs).
    for (mode, action) in [("kill", "\"kill_process\""), ("log", "\"log\"")] {
        let policy = text.replace("\"kill_process\"", action);
        let target = arch.as_str().try_into().expect("a seccompiler target");
        let map = seccompiler::compile_from_json(policy.as_bytes(), target)
            .unwrap_or_else(|e| panic!("{POLICY}: {e}"));
        for class in CLASSES {
            let prog = map
                .get(*class)
                .unwrap_or_else(|| panic!("{POLICY} has no filter {class:?}"));
            let mut bytes = Vec::with_capacity(prog.len() * 8);
            for i in prog {
                bytes.extend(i.code.to_le_bytes());
                bytes.push(i.jt);
                bytes.push(i.jf);
                bytes.extend(i.k.to_le_bytes());
            }
            let file = out.join(format!("seccomp-{mode}-{class}.bpf"));
            std::fs::write(&file, bytes).expect("write a BPF program");
            listing.push_str(&format!(
                "(\"{mode}\", \"{class}\", include_bytes!({:?})),\n",
                file.display().to_string()
            ));
        }
    }
    let mut f = std::fs::File::create(out.join("seccomp_programs.rs")).expect("create");
    writeln!(f, "&[\n{listing}]").expect("write");
}
