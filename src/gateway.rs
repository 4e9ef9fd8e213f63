//! The running gateway's shared state: tenancy and keys from the config, the limiter, the
//! upstream client, the settings each layer reads, metrics and the shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Backend, Config, ServerConfig};
use crate::keys::KeyStore;
use crate::limiter::memory::MemoryLimiter;
use crate::limiter::redis::{RedisLimiter, SharedRedis};
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::proxy::UpstreamClient;
use crate::shutdown::Shutdown;
use crate::tenancy::Tenants;

/// What the layers read of `[server]`, in the types they use.
#[derive(Debug, Clone)]
pub struct Settings {
    pub body_limit: u64,
    pub header_limit: u64,
    pub require_content_length: bool,
    pub upstream_timeout: Duration,
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
            max_in_flight: s.max_in_flight,
            shutdown_grace: s.shutdown_grace.0,
            trusted_proxies: s.trusted_proxies,
            unauthenticated_per_ip: l.unauthenticated_per_ip,
        }
    }
}

pub struct Gateway {
    pub tenants: Tenants,
    pub keys: KeyStore,
    pub limiter: Arc<dyn Limiter>,
    pub upstream: UpstreamClient,
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
            tenants: Tenants::from_config(cfg)?,
            keys: KeyStore::from_config(&cfg.keys)?,
            limiter,
            upstream: UpstreamClient::new(cfg.server.upstream_connect_timeout.0),
            settings: Settings::from_config(&cfg.server, &cfg.limiter),
            metrics,
            shutdown: Shutdown::default(),
        })
    }
}
