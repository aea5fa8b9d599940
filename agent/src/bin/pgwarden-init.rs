//! `pgwarden-init [--grace SECONDS] -- COMMAND ARGS...`: the instance container's PID 1 (see
//! [`pgwarden::init`]). Its own small executable, as the fence guard: it stays resident.

fn main() {
    std::process::exit(pgwarden::init::run_init(
        std::env::args_os().skip(1).collect(),
    ));
}
