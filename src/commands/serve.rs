//! `tollgate serve [--config FILE]`: checks the config (or builds the embedded dev setup),
//! binds both ports, prints the dev `export` lines, and serves until a shutdown signal.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{dev, Config};
use crate::gateway::Gateway;
use crate::server;

pub fn init_logging() {
    let filter = std::env::var("TOLLGATE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_current_span(true)
        .with_span_list(false)
        .try_init();
}

pub async fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    init_logging();
    let (mut cfg, dev_key, origin) = match &config {
        Some(path) => {
            let cfg = Config::load(path).map_err(|p| anyhow::anyhow!("invalid config:\n{p}"))?;
            (cfg, None, path.display().to_string())
        }
        None => {
            let (cfg, key) = dev::dev_config();
            (cfg, Some(key), "embedded dev config".to_string())
        }
    };
    cfg.apply_env();
    let problems = cfg.problems(&origin);
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        anyhow::bail!(
            "invalid config ({} problems):\n{}",
            list.len(),
            list.join("\n")
        );
    }
    let mut gw = Gateway::from_config(&cfg).map_err(|e| anyhow::anyhow!(e))?;
    gw.config_path = config;
    let gw = Arc::new(gw);
    let (main, main_addr) = server::bind(&cfg.server.listen, "server.listen").await?;
    let (admin, admin_addr) = server::bind(&cfg.server.admin_listen, "server.admin_listen").await?;
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(listen = %main_addr, admin = %admin_addr, config = %origin, workers, "tollgate listening");
    // The parsed file is not needed while serving (a reload reads it again); with many keys it
    // is most of the resident memory.
    drop(cfg);
    crate::allocator::release_freed();
    if let Some(key) = dev_key {
        println!("export PREFECT_CLOUD_API_URL=http://{main_addr}/api");
        println!(
            "export PREFECT_API_URL=http://{main_addr}/api/accounts/{}/workspaces/{}",
            dev::DEV_ACCOUNT_ID,
            dev::DEV_WORKSPACE_ID
        );
        println!("export PREFECT_API_KEY={key}");
    }
    server::run(gw, main, admin).await
}
