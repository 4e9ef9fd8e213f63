//! The running gateway's shared state: tenancy and keys from the config, the limiter, the
//! upstream client, the settings each layer reads, metrics and the shutdown signal.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{Backend, Config, ServerConfig};
use crate::grpc::passthrough::PassthroughServices;
use crate::keys::KeyStore;
use crate::limiter::memory::MemoryLimiter;
use crate::limiter::redis::{RedisLimiter, SharedRedis};
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::tenancy::Tenants;
use crate::upstream::UpstreamClient;

/// What the layers read of `[server]`, in the types they use.
#[derive(Debug, Clone)]
pub struct Settings {
    pub body_limit: u64,
    pub header_limit: u64,
    pub require_content_length: bool,
    pub upstream_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub max_in_flight: usize,
    pub shutdown_grace: Duration,
    pub trusted_proxies: usize,
    pub unauthenticated_per_ip: Option<crate::config::Limit>,
}

impl Settings {
    pub fn from_config(s: &ServerConfig, l: &crate::config::LimiterConfig) -> Settings {
        Settings {
            body_limit: s.body_limit.0,
            header_limit: s.header_limit.0,
            require_content_length: s.require_content_length,
            upstream_timeout: s.upstream_timeout.0,
            upstream_connect_timeout: s.upstream_connect_timeout.0,
            max_in_flight: s.max_in_flight,
            shutdown_grace: s.shutdown_grace.0,
            trusted_proxies: s.trusted_proxies,
            unauthenticated_per_ip: l.unauthenticated_per_ip,
        }
    }
}

/// What a config reload replaces: accounts (with their policies), workspaces and keys.
pub struct Tenancy {
    pub tenants: Tenants,
    pub keys: KeyStore,
}

impl Tenancy {
    pub fn from_config(cfg: &Config) -> Result<Tenancy, String> {
        Ok(Tenancy {
            tenants: Tenants::from_config(cfg)?,
            keys: KeyStore::from_config(&cfg.keys)?,
        })
    }
}

pub struct Gateway {
    tenancy: ArcSwap<Tenancy>,
    /// The file to re-read on SIGHUP (none for the embedded dev setup).
    pub config_path: Option<PathBuf>,
    pub limiter: Arc<dyn Limiter>,
    pub upstream: UpstreamClient,
    /// `[[grpc_passthrough]]`: gRPC services forwarded as they are (a restart changes them).
    pub grpc_passthrough: PassthroughServices,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
}

impl Gateway {
    /// Builds from a config that `Config::problems` found clean.
    pub fn from_config(cfg: &Config) -> Result<Gateway, String> {
        let metrics = Arc::new(Metrics::default());
        let limiter: Arc<dyn Limiter> = match cfg.limiter.backend {
            Backend::Memory => Arc::new(MemoryLimiter::default()),
            Backend::Redis => Arc::new(SharedRedis(RedisLimiter::new(
                &cfg.limiter,
                metrics.clone(),
            )?)),
        };
        Ok(Gateway {
            tenancy: ArcSwap::from_pointee(Tenancy::from_config(cfg)?),
            config_path: None,
            limiter,
            grpc_passthrough: PassthroughServices::from_config(&cfg.grpc_passthrough)?,
            upstream: UpstreamClient::new(cfg.server.upstream_connect_timeout.0),
            settings: Settings::from_config(&cfg.server, &cfg.limiter),
            metrics,
            shutdown: Shutdown::default(),
        })
    }

    /// The current accounts, workspaces and keys.
    pub fn tenancy(&self) -> Arc<Tenancy> {
        self.tenancy.load_full()
    }

    /// The tenancy for a look-up that ends before the next await: no reference count taken.
    pub fn tenancy_now(&self) -> arc_swap::Guard<Arc<Tenancy>> {
        self.tenancy.load()
    }

    /// Re-reads the config file and swaps in its accounts, plans, workspaces and keys. A file
    /// with problems changes nothing. Listen addresses and the limiter backend need a restart.
    pub fn reload(&self) -> Result<(), String> {
        let Some(path) = &self.config_path else {
            return Err("the embedded dev setup has no file to reload".into());
        };
        let origin = path.display().to_string();
        let mut cfg = Config::load(path).map_err(|p| p.to_string())?;
        cfg.apply_env();
        let problems = cfg.problems(&origin);
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            return Err(list.join("; "));
        }
        self.tenancy.store(Arc::new(Tenancy::from_config(&cfg)?));
        Ok(())
    }
}
