//! The lean path for the gateway's own unary methods: one length-prefixed protobuf message in,
//! the service method called directly, one message and the `grpc-status` trailer out. No router,
//! codec stream or encoder body sits between: those cost a unary call about as much as the
//! method itself. tonic still serves everything else (the two streaming methods, health,
//! reflection, gRPC-Web and the pass-through services), and the same service implementations
//! answer on both paths.
//!
//! What a malformed call gets is tonic's answer: a frame cut short or a message that does not
//! decode is INTERNAL, a length over the limit is OUT_OF_RANGE before the message is read, a
//! compressed frame (no compression is offered) is INTERNAL, a `grpc-encoding` other than
//! identity is UNIMPLEMENTED.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::Status;

use crate::gateway::Gateway;
use crate::grpc::deployments::DeploymentsService;
use crate::grpc::flow_runs::FlowRunsService;
use crate::grpc::flows::FlowsService;
use crate::grpc::logs::LogsService;
use crate::grpc::rest::RestService;
use crate::grpc::task_runs::TaskRunsService;
use crate::grpc::work_pools::WorkPoolsService;
use crate::grpc::{names, pb};
use crate::{Body, Request, Response};

const HEADER: usize = 5;

/// Whether `path` is one of the unary methods served here.
pub fn serves(path: &str) -> bool {
    UNARY.contains(&path)
}

const UNARY: [&str; 19] = [
    "/tollgate.prefect.v1.Flows/Create",
    "/tollgate.prefect.v1.Flows/Read",
    "/tollgate.prefect.v1.Flows/Filter",
    "/tollgate.prefect.v1.Deployments/Read",
    "/tollgate.prefect.v1.Deployments/ReadByName",
    "/tollgate.prefect.v1.Deployments/Filter",
    "/tollgate.prefect.v1.Deployments/CreateFlowRun",
    "/tollgate.prefect.v1.Deployments/Pause",
    "/tollgate.prefect.v1.Deployments/Resume",
    "/tollgate.prefect.v1.FlowRuns/Read",
    "/tollgate.prefect.v1.FlowRuns/Filter",
    "/tollgate.prefect.v1.FlowRuns/SetState",
    "/tollgate.prefect.v1.FlowRuns/Cancel",
    "/tollgate.prefect.v1.TaskRuns/Read",
    "/tollgate.prefect.v1.TaskRuns/Filter",
    "/tollgate.prefect.v1.Logs/Create",
    "/tollgate.prefect.v1.WorkPools/List",
    "/tollgate.prefect.v1.WorkPools/ScheduledRuns",
    "/tollgate.prefect.v1.Rest/Call",
];

/// Calls `$method` of `$service` (a `$trait` implementation over the gateway).
macro_rules! call {
    ($req:ident, $gw:ident, $limit:ident, $service:ident, $trait:path, $method:ident) => {
        run($req, $limit, |r| async move {
            let service = $service($gw.clone());
            <$service as $trait>::$method(&service, r).await
        })
        .await
    };
}

/// Serves a unary call of `serves(path)`; `limit` bounds the request message.
pub async fn serve(gw: &Arc<Gateway>, req: Request, limit: usize) -> Response {
    use pb::deployments_server::Deployments;
    use pb::flow_runs_server::FlowRuns;
    use pb::flows_server::Flows;
    use pb::logs_server::Logs;
    use pb::rest_server::Rest;
    use pb::task_runs_server::TaskRuns;
    use pb::work_pools_server::WorkPools;
    let path = req.uri().path().strip_prefix("/tollgate.prefect.v1.");
    match path.unwrap_or("") {
        "Flows/Create" => call!(req, gw, limit, FlowsService, Flows, create),
        "Flows/Read" => call!(req, gw, limit, FlowsService, Flows, read),
        "Flows/Filter" => call!(req, gw, limit, FlowsService, Flows, filter),
        "Deployments/Read" => call!(req, gw, limit, DeploymentsService, Deployments, read),
        "Deployments/ReadByName" => {
            call!(
                req,
                gw,
                limit,
                DeploymentsService,
                Deployments,
                read_by_name
            )
        }
        "Deployments/Filter" => call!(req, gw, limit, DeploymentsService, Deployments, filter),
        "Deployments/CreateFlowRun" => {
            call!(
                req,
                gw,
                limit,
                DeploymentsService,
                Deployments,
                create_flow_run
            )
        }
        "Deployments/Pause" => call!(req, gw, limit, DeploymentsService, Deployments, pause),
        "Deployments/Resume" => call!(req, gw, limit, DeploymentsService, Deployments, resume),
        "FlowRuns/Read" => call!(req, gw, limit, FlowRunsService, FlowRuns, read),
        "FlowRuns/Filter" => call!(req, gw, limit, FlowRunsService, FlowRuns, filter),
        "FlowRuns/SetState" => call!(req, gw, limit, FlowRunsService, FlowRuns, set_state),
        "FlowRuns/Cancel" => call!(req, gw, limit, FlowRunsService, FlowRuns, cancel),
        "TaskRuns/Read" => call!(req, gw, limit, TaskRunsService, TaskRuns, read),
        "TaskRuns/Filter" => call!(req, gw, limit, TaskRunsService, TaskRuns, filter),
        "Logs/Create" => call!(req, gw, limit, LogsService, Logs, create),
        "WorkPools/List" => call!(req, gw, limit, WorkPoolsService, WorkPools, list),
        "WorkPools/ScheduledRuns" => {
            call!(req, gw, limit, WorkPoolsService, WorkPools, scheduled_runs)
        }
        "Rest/Call" => call!(req, gw, limit, RestService, Rest, call),
        _ => Status::unimplemented("no such method").into_http(),
    }
}

/// Decodes the request message, calls `method`, encodes its answer.
async fn run<Req, Resp, F, Fut>(req: Request, limit: usize, method: F) -> Response
where
    Req: Message + Default,
    Resp: Message,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let (parts, body) = req.into_parts();
    let answer = async {
        if let Some(encoding) = parts.headers.get(&names::GRPC_ENCODING) {
            if encoding.as_bytes() != b"identity" {
                let mut status = Status::unimplemented(format!(
                    "content is compressed with {encoding:?}, which this server does not accept"
                ));
                status.metadata_mut().insert(
                    "grpc-accept-encoding",
                    MetadataValue::from_static("identity"),
                );
                return Err(status);
            }
        }
        let bytes = read_message(body, limit).await?;
        let message = Req::decode(bytes)
            .map_err(|e| Status::internal(format!("the request message does not decode: {e}")))?;
        let request = tonic::Request::from_parts(
            MetadataMap::from_headers(parts.headers),
            parts.extensions,
            message,
        );
        method(request).await
    };
    match answer.await {
        Ok(resp) => respond(resp),
        Err(status) => status.into_http(),
    }
}

/// Reads exactly one length-prefixed message from a unary call's body. A call's message mostly
/// comes in one DATA frame: that frame is kept as it came, and only a message split over
/// frames is copied together.
async fn read_message(mut body: Body, limit: usize) -> Result<Bytes, Status> {
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut want: Option<usize> = None;
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if first.is_none() && buf.is_empty() {
                    first = Some(data);
                } else {
                    if let Some(first) = first.take() {
                        buf.reserve(want.unwrap_or(0).max(first.len() + data.len()));
                        buf.extend_from_slice(&first);
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                return Err(Status::internal(format!(
                    "could not read the request body: {e}"
                )))
            }
            None => break,
        }
        let seen: &[u8] = first.as_deref().unwrap_or(&buf);
        if want.is_none() {
            want = frame_length(seen, limit)?;
        }
        if want.is_some_and(|w| seen.len() > w) {
            return Err(Status::internal(
                "protocol error: more than one message in a unary call",
            ));
        }
    }
    let seen = match first {
        Some(first) => first,
        None => buf.freeze(),
    };
    match want {
        None if seen.is_empty() => Err(Status::internal("Missing request message.")),
        Some(w) if seen.len() == w => Ok(seen.slice(HEADER..)),
        _ => Err(Status::internal(
            "protocol error: the request ended inside a message frame",
        )),
    }
}

/// The whole frame's length (header included) once its header is in `buf`; a header that
/// announces a compressed or oversized message is refused before the message is read.
fn frame_length(buf: &[u8], limit: usize) -> Result<Option<usize>, Status> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    match buf[0] {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding \
                 was specified",
            ))
        }
        f => {
            return Err(Status::internal(format!(
                "protocol error: invalid compression flag {f} (valid flags are 0 and 1)"
            )))
        }
    }
    let len = (&buf[1..HEADER]).get_u32() as usize;
    if len > limit {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {limit} \
             bytes"
        )));
    }
    Ok(Some(HEADER + len))
}

fn respond<Resp: Message>(resp: tonic::Response<Resp>) -> Response {
    let (metadata, message, extensions) = resp.into_parts();
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(HEADER + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    if message.encode(&mut buf).is_err() {
        return Status::internal("the answer could not be encoded").into_http();
    }
    let mut headers = metadata.into_headers();
    // A method's answer rarely carries metadata: six lookups in an empty map cost more than
    // the check.
    if !headers.is_empty() {
        for reserved in [
            names::GRPC_STATUS,
            names::GRPC_MESSAGE,
            names::GRPC_STATUS_DETAILS,
            names::GRPC_MESSAGE_TYPE,
            header::TE,
            header::CONTENT_LENGTH,
        ] {
            headers.remove(reserved);
        }
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(names::GRPC_STATUS, HeaderValue::from_static("0"));
    let mut out = Response::new(Body::new(OneMessage {
        data: Some(buf.freeze()),
        trailers: Some(trailers),
    }));
    *out.headers_mut() = headers;
    *out.extensions_mut() = extensions;
    out
}

/// A unary answer's body: the message, then the trailers.
struct OneMessage {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for OneMessage {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that arrives in the given pieces, each its own DATA frame.
    fn pieces(parts: &[&[u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::copy_from_slice(p))))
            .collect();
        Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&(message.len() as u32).to_be_bytes());
        f.extend_from_slice(message);
        f
    }

    fn read(parts: &[&[u8]]) -> Result<Bytes, Status> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(read_message(pieces(parts), 1024))
    }

    #[test]
    fn a_message_is_read_whole_however_its_frames_cut_it() {
        let f = framed(b"hello, gateway");
        assert_eq!(read(&[&f]).unwrap(), &b"hello, gateway"[..]);
        // Cut inside the header, inside the message, and with empty frames between.
        for cut in [1, 3, 5, 9, f.len() - 1] {
            let (a, b) = f.split_at(cut);
            assert_eq!(
                read(&[a, b]).unwrap(),
                &b"hello, gateway"[..],
                "cut at {cut}"
            );
            assert_eq!(read(&[b"", a, b"", b]).unwrap(), &b"hello, gateway"[..]);
        }
        let bytes: Vec<&[u8]> = f.chunks(1).collect();
        assert_eq!(read(&bytes).unwrap(), &b"hello, gateway"[..]);
        // An empty message is a message.
        assert_eq!(read(&[&framed(b"")]).unwrap(), &b""[..]);
    }

    #[test]
    fn a_body_that_is_not_one_message_is_refused() {
        let f = framed(b"hello");
        let message = |r: Result<Bytes, Status>| r.unwrap_err().message().to_string();
        assert!(message(read(&[])).contains("Missing request message"));
        assert!(message(read(&[&f[..3]])).contains("inside a message frame"));
        assert!(message(read(&[&f[..f.len() - 1]])).contains("inside a message frame"));
        let two = [f.clone(), f.clone()].concat();
        assert!(message(read(&[&two])).contains("more than one message"));
        assert!(message(read(&[&f, &f[..2]])).contains("more than one message"));
        let mut big = framed(&[0; 2000]);
        big.truncate(100);
        let refused = read(&[&big]).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::OutOfRange);
    }

    #[test]
    fn every_unary_method_of_the_protos_is_listed() {
        // The descriptor set names every method; all but the two streaming ones are unary.
        let set = <prost_types::FileDescriptorSet as Message>::decode(pb::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut unary = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for m in &service.method {
                    if !m.server_streaming() && !m.client_streaming() {
                        unary.push(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            m.name()
                        ));
                    }
                }
            }
        }
        unary.sort();
        let mut listed: Vec<String> = UNARY.iter().map(|s| s.to_string()).collect();
        listed.sort();
        assert_eq!(unary, listed);
    }
}
