//! bulkhead-net: the vhost-user-net back end of one pod. See `bulkhead_vhost_net`.

fn main() -> std::process::ExitCode {
    bulkhead_host::threads::small_thread_stacks();
    bulkhead_vhost_net::cli::main()
}
