//! An attach that answers once the volume's socket accepts connections.
//!
//! Recording an attachment is not serving it: the node learns of it by its long poll, starts
//! keel-vhost, and keel-vhost creates the socket, a fraction of a second (or, on a loaded
//! host, more) after the attach answered. So `attach && qemu ...` raced. With `?wait_ms=T`
//! the attach answers only when the node reports, in a heartbeat, that it has applied the
//! attachments version that includes the attachment (`NodeHeartbeat::version`) and that
//! keel-vhost listens on its socket (`AttachmentReport::listening`, from keel-vhost's status
//! file, written once its socket is bound and listening). Otherwise, after `T`, it answers
//! 504 `not_ready`; the attachment stays recorded.

use std::time::{Duration, Instant};

use keel_api::{AttachVolume, VolumeInfo};

use super::{Controller, Live};
use crate::error::ApiError;

/// How often a waiting attach looks at the node's last heartbeat.
const POLL: Duration = Duration::from_millis(20);

/// Whether `node` last reported keel-vhost listening for `instance`'s attachment of `volume`.
pub(super) fn listening(live: &Live, node: &str, volume: &str, instance: &str) -> bool {
    live.nodes.get(node).is_some_and(|n| {
        n.hb.attachments
            .iter()
            .any(|r| r.volume == volume && r.instance == instance && r.listening)
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Readiness {
    Ready,
    Waiting,
    /// The node manager does not report the version it applied (older than the field).
    OldNode,
}

impl Controller {
    /// Whether `node` has reported, since applying attachments `version` or a later one,
    /// keel-vhost listening for the attachment.
    fn readiness(&self, node: &str, volume: &str, instance: &str, version: u64) -> Readiness {
        let live = self.live();
        let Some(n) = live.nodes.get(node).filter(|n| n.reported) else {
            return Readiness::Waiting;
        };
        match n.hb.version {
            None => Readiness::OldNode,
            Some(applied) if applied >= version && listening(&live, node, volume, instance) => {
                Readiness::Ready
            }
            Some(_) => Readiness::Waiting,
        }
    }

    /// [`Controller::attach`], then, with `wait`, waits up to it for the node to serve the
    /// attachment's socket; the answer is the volume as it is then (`ready` set).
    pub async fn attach_waiting(
        &self,
        id_or_name: &str,
        req: AttachVolume,
        wait: Option<Duration>,
    ) -> Result<VolumeInfo, ApiError> {
        let (node, instance) = (req.node.clone(), req.instance.clone());
        let v = self.attach(id_or_name, req).await?;
        let Some(wait) = wait else {
            return Ok(v);
        };
        // The attachment is in the store at this revision or an earlier one; a node that
        // applied this version has seen it.
        let version = self.store.revision();
        let start = Instant::now();
        loop {
            match self.readiness(&node, &v.id, &instance, version) {
                Readiness::Ready => {
                    tracing::debug!(volume = %v.id, %node, %instance, waited_ms = start.elapsed().as_millis() as u64, "attachment's socket listening");
                    return self.describe(&v.id);
                }
                Readiness::OldNode => {
                    return Err(ApiError::not_ready(format!(
                        "volume {} is attached to {node}/{instance}, but node {node} runs a node manager that does not report when its sockets listen (older than this controller), so the attach cannot wait; upgrade the node, or attach without waiting (`keelctl volume attach --no-wait`) and wait for the socket yourself",
                        v.id
                    )))
                }
                Readiness::Waiting if start.elapsed() >= wait => {
                    return Err(ApiError::not_ready(format!(
                        "volume {} is attached to {node}/{instance} (the attachment stays recorded), but node {node} has not reported its socket listening within {} ms ({}); check `keelctl node list` and the node's log, then attach again to wait again, or detach",
                        v.id,
                        wait.as_millis(),
                        self.node_seen(&node)
                    )))
                }
                Readiness::Waiting => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// When the node was last heard of, for an error message.
    fn node_seen(&self, node: &str) -> String {
        match self.live().nodes.get(node) {
            Some(n) if n.reported => {
                let ago = n.last_seen.elapsed();
                let state = if ago < self.cfg.failure_timeout {
                    "up"
                } else {
                    "down"
                };
                format!("its last heartbeat {} ms ago: {state}", ago.as_millis())
            }
            _ => "no heartbeat from it since the controller started".into(),
        }
    }
}
