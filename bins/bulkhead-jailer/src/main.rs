//! Thin entry point: read the jail from the arguments and run it. On success this
//! process becomes the component's parent and exits with the component's status.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") && !args.iter().any(|a| a == "--") {
        println!("{}", jailer::USAGE);
        return;
    }
    let jail = match jailer::Jail::parse(&args) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("bulkhead-jailer: {e}\n{}", jailer::USAGE);
            std::process::exit(2);
        }
    };
    let name = jail.name.clone();
    let Err(e) = jail.run();
    eprintln!("bulkhead-jailer: {name}: {e}");
    std::process::exit(125);
}
