//! `tollgate.prefect.v1.Logs`: write log batches (`POST /logs/`, each entry one `logs_events`)
//! and tail a flow run's logs (`POST /logs/filter`, polled while following).

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::stream::{self, BoxStream, StreamExt};
use http::Method;
use serde_json::{json, Value};
use tonic::{Request, Response, Status};

use crate::gateway::Gateway;
use crate::grpc::call::{self, Call};
use crate::grpc::flow_runs::{flow_run, is_final};
use crate::grpc::flows::list;
use crate::grpc::pb;
use crate::grpc::transcode::{self, Body, Fields};

pub struct LogsService(pub Arc<Gateway>);

/// Entries read from the upstream per page.
const PAGE: usize = 200;

pub fn log(v: Value) -> pb::Log {
    let mut f = Fields::new(v);
    pb::Log {
        id: f.string("id"),
        name: f.string("name"),
        level: i32::try_from(f.integer("level")).unwrap_or(0),
        message: f.string("message"),
        timestamp: f.time("timestamp"),
        flow_run_id: f.string("flow_run_id"),
        task_run_id: f.string("task_run_id"),
        extra: f.extra(),
    }
}

fn entry(l: pb::Log) -> Result<Value, Status> {
    let mut b = Body::default();
    b.set(
        "name",
        if l.name.is_empty() {
            "tollgate.grpc".to_string()
        } else {
            l.name
        },
    )
    .set("level", l.level)
    .set("message", l.message);
    match l.timestamp.as_ref().and_then(transcode::format_time) {
        Some(t) => b.set("timestamp", t),
        None => b.set("timestamp", transcode::now()),
    };
    for (field, value) in [
        ("flow_run_id", l.flow_run_id),
        ("task_run_id", l.task_run_id),
    ] {
        if value.is_empty() {
            b.set(field, Value::Null);
        } else {
            b.set(field, call::id(field, &value)?.to_string());
        }
    }
    Ok(b.into_value())
}

/// Where a tail stands: what it has sent, and from when to ask next.
struct Tail {
    call: Call,
    flow_run: uuid::Uuid,
    min_level: i32,
    follow: bool,
    period: std::time::Duration,
    after: Option<String>,
    seen: HashSet<String>,
    queue: std::collections::VecDeque<pb::Log>,
    /// The run was final when the last page was asked for: one more page ends the tail.
    finishing: bool,
    done: bool,
}

impl Tail {
    /// The next page of entries newer than what was sent (timestamps may repeat: ids dedupe).
    /// Returns how many entries came, and how many of them were new.
    async fn page(&mut self) -> Result<(usize, usize), Status> {
        let mut logs = json!({ "flow_run_id": { "any_": [self.flow_run.to_string()] } });
        if self.min_level > 0 {
            logs["level"] = json!({ "ge_": self.min_level });
        }
        if let Some(after) = &self.after {
            logs["timestamp"] = json!({ "after_": after });
        }
        let body = json!({ "logs": logs, "sort": "TIMESTAMP_ASC", "limit": PAGE });
        let v = self
            .call
            .clone()
            .json(Method::POST, "logs/filter", Some(&body))
            .await?;
        let raw = list(v, |v| v);
        let fetched = raw.len();
        let mut fresh = 0;
        for v in raw {
            if let Some(ts) = v["timestamp"].as_str() {
                self.after = Some(ts.to_string());
            }
            let l = log(v);
            if self.seen.insert(l.id.clone()) {
                self.queue.push_back(l);
                fresh += 1;
            }
        }
        Ok((fetched, fresh))
    }

    async fn next(&mut self) -> Option<Result<pb::Log, Status>> {
        loop {
            if let Some(l) = self.queue.pop_front() {
                return Some(Ok(l));
            }
            if self.done {
                return None;
            }
            let last = !self.follow || self.finishing;
            let run_final = !last && {
                match self
                    .call
                    .clone()
                    .json(
                        Method::GET,
                        &call::id_path("flow_runs/", self.flow_run, ""),
                        None,
                    )
                    .await
                {
                    Ok(v) => flow_run(v).state.is_some_and(|s| is_final(&s.r#type)),
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            };
            let (fetched, fresh) = match self.page().await {
                Ok(n) => n,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            if fetched >= PAGE && fresh > 0 {
                continue; // more to read at once
            }
            if last {
                self.done = true;
                continue;
            }
            // Logs may land just after the final state: one more page after a pause.
            self.finishing = run_final;
            if self.queue.is_empty() {
                if let Err(e) = self.call.pause(self.period).await {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[tonic::async_trait]
impl pb::logs_server::Logs for LogsService {
    async fn create(
        &self,
        req: Request<pb::CreateLogsRequest>,
    ) -> Result<Response<pb::CreateLogsResponse>, Status> {
        let call = Call::of(&self.0, &req)?;
        let entries = req
            .into_inner()
            .logs
            .into_iter()
            .map(entry)
            .collect::<Result<Vec<_>, _>>()?;
        let count = entries.len();
        call.charge(count as u64, None).await?;
        call.json(Method::POST, "logs/", Some(&Value::Array(entries)))
            .await?;
        Ok(Response::new(pb::CreateLogsResponse {
            count: u32::try_from(count).unwrap_or(u32::MAX),
        }))
    }

    type TailStream = BoxStream<'static, Result<pb::Log, Status>>;

    async fn tail(
        &self,
        req: Request<pb::TailLogsRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let call = Call::of(&self.0, &req)?;
        let r = req.into_inner();
        let id = call::id("flow_run_id", &r.flow_run_id)?;
        // An unknown run is NOT_FOUND before the stream opens.
        call.clone()
            .json(Method::GET, &call::id_path("flow_runs/", id, ""), None)
            .await?;
        let tail = Tail {
            call,
            flow_run: id,
            min_level: r.min_level,
            follow: r.follow,
            period: call::poll_interval(r.poll_interval_ms),
            after: None,
            seen: HashSet::new(),
            queue: Default::default(),
            finishing: false,
            done: false,
        };
        let s = stream::unfold(
            tail,
            |mut t| async move { t.next().await.map(|item| (item, t)) },
        );
        Ok(Response::new(s.boxed()))
    }
}
