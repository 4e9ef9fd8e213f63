//! The rate-limit policy of an account: its plan merged with its overrides, compiled into what
//! a request is charged. One function, `Policy::charges`, says which buckets a request draws on;
//! the limiter decides them together.
//!
//! Buckets (all hash-tagged by account, so Redis Cluster keeps them in one slot):
//! `api` and `logs_events` per account, `key` per API key, `workspace` per workspace, and one
//! per route class.

use std::sync::Arc;

use http::Method;
use uuid::Uuid;

use crate::config::{Limit, PlanConfig};
use crate::limiter::{BucketKey, Charge};

pub const API: &str = "api";
pub const LOGS_EVENTS: &str = "logs_events";

/// A route class: a method (or any) and a path template whose `{name}` segments match any one
/// segment, compared with the path after the workspace prefix.
#[derive(Debug, Clone)]
pub struct RouteClass {
    method: Option<Method>,
    segments: Vec<Option<String>>,
}

impl RouteClass {
    pub fn parse(text: &str) -> Result<RouteClass, String> {
        let hint = "write a route as \"METHOD /path/{param}/...\", e.g. \"POST /flow_runs/{id}/set_state\"";
        let (method, path) = text
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("{text:?}: {hint}"))?;
        let method = match method {
            "*" => None,
            m => Some(
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("{text:?}: unknown method {m:?}"))?,
            ),
        };
        let path = path.trim();
        if !path.starts_with('/') {
            return Err(format!("{text:?}: the path must start with '/'; {hint}"));
        }
        let segments = split(path)
            .map(|s| {
                if s.starts_with('{') && s.ends_with('}') && s.len() > 2 {
                    Ok(None)
                } else if s.contains(['{', '}']) {
                    Err(format!(
                        "{text:?}: a parameter is a whole segment, like {{id}}"
                    ))
                } else {
                    Ok(Some(s.to_string()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RouteClass { method, segments })
    }

    pub fn matches(&self, method: &Method, rest: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let mut it = split(rest);
        for seg in &self.segments {
            match (seg, it.next()) {
                (_, None) => return false,
                (Some(lit), Some(got)) if lit != got => return false,
                _ => {}
            }
        }
        it.next().is_none()
    }
}

/// Path segments, ignoring leading, trailing and doubled slashes (`flow_runs/` = `/flow_runs`).
fn split(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

#[derive(Debug, Clone)]
pub struct RouteLimit {
    pub name: Arc<str>,
    pub class: RouteClass,
    pub limit: Limit,
}

/// An account's compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub plan: String,
    pub api: Option<Limit>,
    pub logs_events: Option<Limit>,
    pub per_key: Option<Limit>,
    pub per_workspace: Option<Limit>,
    pub routes: Vec<RouteLimit>,
    pub concurrency: Option<u32>,
    api_key: BucketKey,
    logs_key: BucketKey,
    account: Uuid,
    names: Names,
}

/// The policy names clients see, made once rather than per request.
#[derive(Debug, Clone)]
struct Names {
    api: Arc<str>,
    logs_events: Arc<str>,
    key: Arc<str>,
    workspace: Arc<str>,
}

/// What one request uses, for `Policy::charges`.
#[derive(Debug, Default)]
pub struct Usage<'a> {
    /// `api` units: 1 for a request, 0 for an event on a websocket.
    pub api: u64,
    pub logs_events: u64,
    pub key: Option<&'a str>,
    pub workspace: Option<Uuid>,
    /// Method and the path after the workspace prefix, for route classes.
    pub route: Option<(&'a Method, &'a str)>,
}

impl Policy {
    /// Compiles a plan (already merged with the account's overrides) that `Config::problems`
    /// found clean.
    pub fn compile(account: Uuid, plan: &str, p: &PlanConfig) -> Result<Policy, String> {
        let routes = p
            .routes
            .iter()
            .map(|r| {
                Ok(RouteLimit {
                    name: r.name.clone().unwrap_or_else(|| r.route.clone()).into(),
                    class: RouteClass::parse(&r.route)?,
                    limit: r.limit,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Policy {
            plan: plan.to_string(),
            api: p.api,
            logs_events: p.logs_events,
            per_key: p.per_key,
            per_workspace: p.per_workspace,
            routes,
            concurrency: p.concurrency,
            api_key: bucket(&account, API, p.api.as_ref()),
            logs_key: bucket(&account, LOGS_EVENTS, p.logs_events.as_ref()),
            account,
            names: Names {
                api: API.into(),
                logs_events: LOGS_EVENTS.into(),
                key: "key".into(),
                workspace: "workspace".into(),
            },
        })
    }

    /// The buckets a request draws on, each with its cost.
    pub fn charges(&self, u: &Usage<'_>) -> Vec<Charge> {
        let mut out = Vec::with_capacity(2);
        let mut push = |key: BucketKey, name: Arc<str>, limit: &Limit, cost: u64| {
            if cost > 0 {
                out.push(Charge {
                    key,
                    name,
                    rate: limit.rate,
                    cost,
                    shadow: limit.shadow,
                });
            }
        };
        if let Some(l) = &self.api {
            push(self.api_key.clone(), self.names.api.clone(), l, u.api);
        }
        if let Some(l) = &self.logs_events {
            push(
                self.logs_key.clone(),
                self.names.logs_events.clone(),
                l,
                u.logs_events,
            );
        }
        if let (Some(l), Some(key)) = (&self.per_key, u.key) {
            push(
                BucketKey::new(&self.account, &format!("key:{key}")),
                self.names.key.clone(),
                l,
                u.api,
            );
        }
        if let (Some(l), Some(ws)) = (&self.per_workspace, u.workspace) {
            push(
                BucketKey::new(&self.account, &format!("ws:{ws}")),
                self.names.workspace.clone(),
                l,
                u.api,
            );
        }
        if let Some((method, rest)) = u.route {
            for r in self.routes.iter().filter(|r| r.class.matches(method, rest)) {
                push(
                    bucket(&self.account, &format!("route:{}", r.name), Some(&r.limit)),
                    r.name.clone(),
                    &r.limit,
                    u.api.max(1),
                );
            }
        }
        out
    }
}

/// A bucket's key names its rate too: when a limit changes (a config reload), the bucket starts
/// afresh under the new rate instead of carrying a debt measured in the old one, and nothing
/// remembered about the old bucket (the deny-cache) applies to the new.
fn bucket(account: &Uuid, scope: &str, limit: Option<&Limit>) -> BucketKey {
    match limit {
        Some(l) => BucketKey::new(
            account,
            &format!(
                "{scope}@{}/{}ms/{}",
                l.rate.count,
                l.rate.period.as_millis(),
                l.rate.burst
            ),
        ),
        None => BucketKey::new(account, scope),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_templates_match_by_method_and_segments() {
        let set_state = RouteClass::parse("POST /flow_runs/{id}/set_state").unwrap();
        assert!(set_state.matches(&Method::POST, "flow_runs/3f0c/set_state"));
        assert!(set_state.matches(&Method::POST, "flow_runs/3f0c/set_state/"));
        assert!(!set_state.matches(&Method::GET, "flow_runs/3f0c/set_state"));
        assert!(!set_state.matches(&Method::POST, "flow_runs/3f0c"));
        assert!(!set_state.matches(&Method::POST, "flow_runs/3f0c/set_state/x"));
        let create = RouteClass::parse("POST /flow_runs/").unwrap();
        assert!(create.matches(&Method::POST, "flow_runs/"));
        assert!(!create.matches(&Method::POST, "flow_runs/filter"));
        let any = RouteClass::parse("* /logs/").unwrap();
        assert!(any.matches(&Method::PUT, "logs"));
    }

    #[test]
    fn bad_templates_say_how_to_write_them() {
        assert!(RouteClass::parse("/flow_runs")
            .unwrap_err()
            .contains("METHOD"));
        assert!(RouteClass::parse("POST flow_runs").is_err());
        assert!(RouteClass::parse("POST /flow_runs/x{id}").is_err());
    }
}
