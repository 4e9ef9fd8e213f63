//! Tenancy: accounts, their plans and workspaces, and the upstream Prefect server of each
//! workspace. Built once from a checked config; looked up on every request.

use crate::FastMap;
use std::sync::Arc;

use base64::Engine;
use http::{HeaderValue, Uri};
use uuid::Uuid;

use crate::config::{resolve_secret, Config};
use crate::policy::Policy;

#[derive(Debug)]
pub struct Account {
    pub id: Uuid,
    pub handle: String,
    pub name: String,
    /// The plan merged with the account's overrides.
    pub policy: Policy,
}

/// Where a workspace's traffic goes: a Prefect server base URL and its own credentials.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// The base path without a trailing slash ("" or "/prefix").
    pub base_path: String,
    /// `Basic base64(auth string)` when the server has `PREFECT_SERVER_API_AUTH_STRING`.
    pub auth_header: Option<HeaderValue>,
    /// The auth string itself, for the websocket `auth` message.
    pub auth_token: Option<String>,
}

impl Upstream {
    pub fn parse(url: &str, auth: Option<String>) -> Result<Upstream, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("{url:?} needs a scheme (http://)"))?;
        if scheme != http::uri::Scheme::HTTP {
            return Err(format!("{url:?}: only http:// upstreams are supported"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("{url:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "{url:?}: credentials in the URL would reach the upstream in its Host header; \
                 put them in upstream_auth"
            ));
        }
        if uri.query().is_some() {
            return Err(format!("{url:?}: an upstream URL has no query string"));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        let base_path = base_path
            .strip_suffix("/api")
            .unwrap_or(&base_path)
            .to_string();
        let auth_header = match &auth {
            None => None,
            Some(a) => Some(
                HeaderValue::from_str(&format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(a)
                ))
                .map_err(|_| {
                    "the upstream auth string has characters a header cannot carry".to_string()
                })?,
            ),
        };
        Ok(Upstream {
            scheme,
            authority,
            base_path,
            auth_header,
            auth_token: auth,
        })
    }

    /// `{base}/api/{rest}` with the query string as the client wrote it, in origin form (what
    /// an HTTP/1.1 request line carries; the pool knows the host).
    pub fn origin_uri_for(&self, rest: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        Ok(Uri::from(http::uri::PathAndQuery::try_from(
            self.path_for(rest, query),
        )?))
    }

    fn path_for(&self, rest: &str, query: Option<&str>) -> String {
        let mut pq = String::with_capacity(self.base_path.len() + rest.len() + 8);
        pq.push_str(&self.base_path);
        pq.push_str("/api/");
        pq.push_str(rest);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        pq
    }
}

#[derive(Debug)]
pub struct Workspace {
    pub id: Uuid,
    pub account: Arc<Account>,
    pub handle: String,
    pub name: String,
    pub description: String,
    pub upstream: Upstream,
}

/// Every account and workspace, by id and by handle.
#[derive(Debug, Default)]
pub struct Tenants {
    accounts: FastMap<Uuid, Arc<Account>>,
    workspaces: FastMap<Uuid, Arc<Workspace>>,
    by_handle: FastMap<(String, String), Uuid>,
    /// Each account's workspaces by handle: a gRPC call without `x-prefect-workspace` and
    /// `GET /api/me/workspaces` look here instead of scanning every tenant's workspaces.
    by_account: FastMap<Uuid, Vec<Arc<Workspace>>>,
}

impl Tenants {
    /// Builds from a config that `Config::problems` found clean.
    pub fn from_config(cfg: &Config) -> Result<Tenants, String> {
        let mut t = Tenants::default();
        for a in &cfg.accounts {
            let id = Uuid::parse_str(&a.id).map_err(|e| e.to_string())?;
            let plan = cfg
                .plans
                .get(&a.plan)
                .ok_or_else(|| format!("unknown plan {}", a.plan))?;
            let merged = match &a.limits {
                Some(over) => plan.merged(over),
                None => plan.clone(),
            };
            t.accounts.insert(
                id,
                Arc::new(Account {
                    id,
                    handle: a.handle.clone(),
                    name: a.name.clone().unwrap_or_else(|| a.handle.clone()),
                    policy: Policy::compile(id, &a.plan, &merged)?,
                }),
            );
        }
        for w in &cfg.workspaces {
            let id = Uuid::parse_str(&w.id).map_err(|e| e.to_string())?;
            let account_id = Uuid::parse_str(&w.account).map_err(|e| e.to_string())?;
            let account = t
                .accounts
                .get(&account_id)
                .cloned()
                .ok_or_else(|| format!("unknown account {}", w.account))?;
            let auth = w.upstream_auth.as_deref().map(resolve_secret).transpose()?;
            let ws = Workspace {
                id,
                handle: w.handle.clone(),
                name: w.name.clone().unwrap_or_else(|| w.handle.clone()),
                description: w.description.clone().unwrap_or_default(),
                upstream: Upstream::parse(&w.upstream, auth)?,
                account,
            };
            t.by_handle
                .insert((ws.account.handle.clone(), ws.handle.clone()), id);
            let ws = Arc::new(ws);
            t.by_account.entry(account_id).or_default().push(ws.clone());
            t.workspaces.insert(id, ws);
        }
        for list in t.by_account.values_mut() {
            list.sort_by(|a, b| a.handle.cmp(&b.handle));
        }
        Ok(t)
    }

    pub fn account(&self, id: &Uuid) -> Option<&Arc<Account>> {
        self.accounts.get(id)
    }

    pub fn workspace(&self, id: &Uuid) -> Option<&Arc<Workspace>> {
        self.workspaces.get(id)
    }

    /// `account_handle/workspace_handle`, as `prefect cloud login --workspace` and gRPC metadata name it.
    pub fn workspace_by_handle(&self, account: &str, workspace: &str) -> Option<&Arc<Workspace>> {
        self.by_handle
            .get(&(account.to_string(), workspace.to_string()))
            .and_then(|id| self.workspaces.get(id))
    }

    /// Every workspace of every account.
    pub fn all_workspaces(&self) -> impl Iterator<Item = &Arc<Workspace>> {
        self.workspaces.values()
    }

    /// The workspaces of an account, in a stable order.
    pub fn workspaces_of(&self, account: &Uuid) -> &[Arc<Workspace>] {
        self.by_account.get(account).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_url_with_credentials_is_refused() {
        let e = Upstream::parse("http://user:pass@prefect:4200", None).unwrap_err();
        assert!(e.contains("upstream_auth"), "{e}");
        assert!(Upstream::parse("http://prefect:4200/api", None).is_ok());
    }

    #[test]
    fn an_accounts_workspaces_are_its_own_in_handle_order() {
        let a = "11111111-1111-4111-8111-111111111111";
        let b = "33333333-3333-4333-8333-333333333333";
        let mut toml = format!(
            "[plans.p]\napi = \"10/1m\"\n\
             [[accounts]]\nid = \"{a}\"\nhandle = \"a\"\nplan = \"p\"\n\
             [[accounts]]\nid = \"{b}\"\nhandle = \"b\"\nplan = \"p\"\n"
        );
        for (i, (account, handle)) in [(a, "zeta"), (b, "other"), (a, "alpha"), (a, "mid")]
            .iter()
            .enumerate()
        {
            toml.push_str(&format!(
                "[[workspaces]]\nid = \"22222222-2222-4222-8222-00000000000{i}\"\n\
                 account = \"{account}\"\nhandle = \"{handle}\"\nupstream = \"http://127.0.0.1:1\"\n"
            ));
        }
        let cfg = Config::parse(&toml, "test").expect("config");
        let t = Tenants::from_config(&cfg).expect("tenants");
        let handles = |id: &str| -> Vec<String> {
            t.workspaces_of(&Uuid::parse_str(id).unwrap())
                .iter()
                .map(|w| w.handle.clone())
                .collect()
        };
        assert_eq!(handles(a), ["alpha", "mid", "zeta"]);
        assert_eq!(handles(b), ["other"]);
        assert!(handles("44444444-4444-4444-8444-444444444444").is_empty());
    }
}
