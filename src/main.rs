//! The `tollgate` command line. Only parsing lives here; each subcommand is in `commands`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// jemalloc: a request allocates blocks of several KiB (its future, hyper's buffers), which
/// glibc's allocator serves on its slow path (and consolidates its free lists for).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start. A C string, as jemalloc declares `malloc_conf`.
/// - Its per-thread cache keeps at least 20 blocks of a size (its default); a request's blocks
///   of a few KiB came in more than that, so one request in five refilled the cache from the
///   arena and another flushed it back: 6% of a proxied request's instructions (callgrind).
///   64 to 400 blocks a size end that.
/// - `background_thread` (one): what a spike frees goes back to the system within
///   `dirty_decay_ms` (10 s) even if the gateway then goes idle, as Redis configures its
///   jemalloc; jemalloc otherwise purges only as it allocates. (A config parse, the largest
///   such free, is also purged at once: `purge_freed_pages`.)
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &u8 =
    &b"tcache_nslots_small_min:64,tcache_nslots_small_max:400,background_thread:true,max_background_threads:1\0"[0];

use tollgate::commands;
use tollgate::config::KeyKind;

/// Returns every arena's freed pages to the system at once (`arena.<all>.purge`); the gateway
/// calls it once a config is built (`tollgate::allocator`).
#[allow(unsafe_code)]
fn purge_freed_pages() {
    // MALLCTL_ARENAS_ALL is 4096; purge takes no value, read or written.
    // SAFETY: a NUL-terminated name, and null old/new pointers as this control expects.
    let status = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if status != 0 {
        tracing::debug!(status, "jemalloc purge failed");
    }
}

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A multi-tenant, Prefect-Cloud-style gateway for Prefect servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. Without --config: the embedded dev setup on 127.0.0.1:4280.
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Runtime worker threads; default: the CPUs this process may run on. With 1, the
        /// gateway runs on a single-threaded runtime (no work-stealing overhead).
        #[arg(long, env = "TOLLGATE_WORKERS")]
        workers: Option<usize>,
    },
    /// Check a config file and report every problem with its location.
    CheckConfig { file: PathBuf },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a key: prints it once, then the [[keys]] config entry holding its hash.
    New {
        #[arg(long)]
        account: uuid::Uuid,
        #[arg(long, value_enum, default_value = "user")]
        kind: Kind,
        /// Restrict the key to these workspaces (repeatable); default: all of the account.
        #[arg(long = "workspace")]
        workspaces: Vec<uuid::Uuid>,
        /// RFC 3339 expiry, e.g. 2027-01-01T00:00:00Z.
        #[arg(long)]
        expires: Option<String>,
        /// A name for the key in logs and metrics.
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    User,
    Service,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, workers } => {
            tollgate::allocator::set_release(purge_freed_pages);
            let workers = workers
                .filter(|n| *n > 0)
                .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
                .unwrap_or(1);
            let mut builder = if workers == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(workers);
                b
            };
            let rt = match builder.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tollgate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(commands::serve::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { file } => ExitCode::from(commands::check_config::run(&file) as u8),
        Command::Keys {
            command:
                KeysCommand::New {
                    account,
                    kind,
                    workspaces,
                    expires,
                    id,
                },
        } => {
            let kind = match kind {
                Kind::User => KeyKind::User,
                Kind::Service => KeyKind::Service,
            };
            match commands::keys::new_key(commands::keys::NewKey {
                account,
                kind,
                workspaces,
                expires,
                id,
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
