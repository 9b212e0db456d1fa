//! Log lines people can attribute: `dlaunch[3] WARN: ...` names the rank that speaks.
//! `RUST_LOG` tunes it (default: warnings from libraries, info from dlaunch).

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};

static RANK: AtomicU32 = AtomicU32::new(u32::MAX);

pub fn init() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn,dlaunch=info"))
        .format(|out, record| {
            let rank = RANK.load(Ordering::Relaxed);
            let who = if rank == u32::MAX { "dlaunch".to_string() } else { format!("dlaunch[{rank}]") };
            writeln!(out, "{who} {}: {}", record.level(), record.args())
        })
        .init();
}

pub fn set_rank(rank: u32) {
    RANK.store(rank, Ordering::Relaxed);
}
