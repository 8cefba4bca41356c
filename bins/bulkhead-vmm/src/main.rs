//! Thin entry point: parse the configuration, run the VM, map the outcome to an exit
//! status (see [`bulkhead_vmm::exit::ExitReason::status`]).

use bulkhead_vmm::config::VmConfig;
use bulkhead_vmm::exit::ExitReason;

fn main() {
    bulkhead_vmm::startup::mark_exec();
    bulkhead_host::threads::small_thread_stacks();
    bulkhead_host::logging::init_stderr("warn");
    bulkhead_vmm::exit::abort_on_panic();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{}", bulkhead_vmm::config::USAGE);
        return;
    }
    let cfg = match VmConfig::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulkhead-vmm: {e}");
            std::process::exit(2);
        }
    };
    match bulkhead_vmm::vmm::run(&cfg) {
        Ok(reason) => {
            match &reason {
                ExitReason::Crash(msg) => eprintln!("bulkhead-vmm: guest crashed: {msg}"),
                ExitReason::Halted => eprintln!(
                    "bulkhead-vmm: the guest halted every vCPU with interrupts off; it can never run again"
                ),
                _ => {}
            }
            std::process::exit(reason.status());
        }
        Err(e) => {
            eprintln!("bulkhead-vmm: {e}");
            std::process::exit(1);
        }
    }
}
