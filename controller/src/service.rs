//! The controller's logic: registration and liveness, volume lifecycle, attachments with
//! epoch fencing, and the reconciler that pushes the recorded state to the storage servers.
//!
//! Ordering rules (see docs/controller.md):
//! 1. A change is first committed to the metadata store (one compare-and-swap of one
//!    record, or one transaction over every record the decision read: a volume's name key,
//!    the reservation fences of the servers it takes room on), then pushed to the storage
//!    servers. A push that fails is retried by the
//!    reconciler until the server reports the recorded state.
//! 2. A read-write attach (and a forced detach) bumps the volume's epoch. The API answers only
//!    after the push of the new epoch to the copies was tried; once a copy has it, it refuses
//!    every request carrying an older epoch — the old writer is fenced even if its node never
//!    hears about the change.
//! 3. Nodes learn their attachments by long-polling; they act on the recorded state only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_api::types::{BLOCK_SIZES, DEFAULT_BLOCK_SIZE};
use keel_api::{
    AttachVolume, AttachmentInfo, CopyInfo, CreateVolume, DeleteResult, DetachVolume, Health,
    NodeAttachment, NodeAttachments, NodeHeartbeat, NodeInfo, NodeRegistration, ResizeVolume,
    ServerHeartbeat, ServerInfo, ServerRegistration, VolumeInfo, VolumeState,
};
use keel_proto::human_size;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;
use crate::membership::{self, Change, Promotion};
use crate::model::*;
use crate::placement::{place, Candidate};
use crate::push::{Membership, Pusher};
use crate::store::{MetaStore, StoreError};

mod ready;

/// Largest volume the API accepts (64 TiB).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// Most copies a volume may ask for.
pub const MAX_REPLICAS: u32 = 3;
/// Copies of a volume created without `replicas`: a primary and one mirror.
pub const DEFAULT_REPLICAS: u32 = 2;

/// Who is calling, from its client certificate or bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An operator (`admin` certificate or bearer token): may do everything.
    Admin(String),
    /// A storage server: may register and heartbeat as itself.
    Storage(String),
    /// A node manager: may register, heartbeat and watch as itself.
    Node(String),
}

impl Caller {
    /// An admin may register anything; a daemon (`kind`: "storage server" or "node") only
    /// itself, under the id in its certificate.
    fn may_register(&self, kind: &str, id: &str) -> Result<(), ApiError> {
        let (caller_kind, caller_id) = match self {
            Caller::Admin(_) => return Ok(()),
            Caller::Storage(c) => ("storage server", c),
            Caller::Node(c) => ("node", c),
        };
        if caller_kind != kind {
            return Err(ApiError::forbidden(format!(
                "a {caller_kind} cannot register a {kind}"
            )));
        }
        if caller_id != id {
            return Err(ApiError::forbidden(format!(
                "certificate is for {kind} {caller_id}, not {id}"
            )));
        }
        Ok(())
    }
}

/// Timing knobs.
#[derive(Debug, Clone)]
pub struct Config {
    /// A server or node without a heartbeat for this long is `down`.
    pub failure_timeout: Duration,
    /// How often the reconciler runs.
    pub reconcile_interval: Duration,
    /// How long the controller's own probe of a primary a node reported unreachable may take
    /// (R6): no answer within it confirms the report.
    pub probe_timeout: Duration,
    /// A probe's result answers further reports of the same primary for this long (one
    /// probe per volume at a time, at most one per interval).
    pub report_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            failure_timeout: Duration::from_secs(3),
            reconcile_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(500),
            report_interval: Duration::from_secs(1),
        }
    }
}

struct ServerLive {
    last_seen: Instant,
    hb: ServerHeartbeat,
}

struct NodeLive {
    last_seen: Instant,
    hb: NodeHeartbeat,
    /// `hb` is a heartbeat received since this controller started (not the empty placeholder
    /// of a registration): only then does it tell whether guests are connected.
    reported: bool,
}

#[derive(Default)]
struct Live {
    servers: HashMap<String, ServerLive>,
    nodes: HashMap<String, NodeLive>,
    /// (volume, server) -> when that server's copy was dropped or demoted: a rebuild waits
    /// for a heartbeat from the server after that moment (it was failing then).
    dropped: HashMap<(String, String), Instant>,
    /// (volume, server) -> since when that server, up, has not reported the copy the volume's
    /// record places there (R10; rebuilding mirrors excepted: the controller creates those).
    missing: HashMap<(String, String), Instant>,
}

/// The system manager.
pub struct Controller {
    store: Arc<dyn MetaStore>,
    push: Pusher,
    live: Mutex<Live>,
    cfg: Config,
    /// When this controller started: it knows nothing of liveness before one failure timeout.
    started: Instant,
    /// Per volume: the last probe of its primary after a node's report (R6). Its lock is held
    /// while probing, so concurrent reports wait for and share one probe.
    probes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<LastProbe>>>>>,
}

/// The result of the controller's probe of a reported primary.
#[derive(Debug, Clone)]
struct LastProbe {
    /// The probed server's id.
    server: String,
    at: Instant,
    answered: bool,
}

impl LastProbe {
    /// Whether this probe answers a report about `primary` whose oldest request has waited
    /// `waited`: a failed probe within `interval`; a successful one only if it is also newer
    /// than the node's wait (the report then holds no news). So concurrent and repeated reports
    /// share one probe, and a report of a primary that hung after the last probe is probed
    /// again. `Some(answered)` when it does.
    fn reusable(&self, primary: &str, interval: Duration, waited: Duration) -> Option<bool> {
        let age = self.at.elapsed();
        (self.server == primary && age < interval && (!self.answered || age < waited))
            .then_some(self.answered)
    }
}

/// The access digest of a new copy (an empty list): the reconciler then pushes its list.
fn empty_access() -> Option<u32> {
    Some(keel_proto::members::MemberList::default().access_digest())
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// A volume as its user knows it: `name (id)`, or the id of an unnamed one.
fn label(v: &VolumeRecord) -> String {
    match &v.name {
        Some(n) => format!("{n} ({})", v.id),
        None => v.id.clone(),
    }
}

/// Why a volume does not fit, and advice that can work: the largest size that fits now with
/// that many copies, and `--replicas` (the CLI's flag; `replicas` in the API) only where fewer
/// copies would fit.
fn placement_advice(
    e: &crate::placement::PlacementError,
    candidates: &[Candidate],
    copies: usize,
    replicas_defaulted: bool,
) -> String {
    let mut free: Vec<u64> = candidates
        .iter()
        .filter(|c| c.up)
        .map(|c| c.capacity_bytes.saturating_sub(c.allocated_bytes))
        .collect();
    free.sort_unstable_by(|a, b| b.cmp(a));
    let size = match e {
        crate::placement::PlacementError::NotEnough { size, .. } => *size,
    };
    let mut advice = vec![e.to_string()];
    let copies_word = if copies == 1 { "copy" } else { "copies" };
    // The largest volume with `copies` copies: the copies-th largest free space, in 512s.
    match free.get(copies.saturating_sub(1)) {
        Some(&f) if f >= 512 => advice.push(format!(
            "the largest volume with {copies} {copies_word} that fits now is {} ({} bytes)",
            human_size(f / 512 * 512),
            f / 512 * 512
        )),
        _ => advice.push(format!(
            "no volume with {copies} {copies_word} fits now: {} storage servers are up",
            free.len()
        )),
    }
    let fewer = (1..copies)
        .rev()
        .find(|&n| free.get(n - 1).is_some_and(|&f| f >= size));
    if let Some(n) = fewer {
        let given = if replicas_defaulted {
            format!("volumes get {DEFAULT_REPLICAS} copies unless --replicas says otherwise; ")
        } else {
            String::new()
        };
        advice.push(format!("{given}--replicas {n} would fit"));
    }
    advice.join("; ")
}

/// Parses a size given in an API body.
pub fn check_size(size: &keel_api::SizeInput) -> Result<u64, ApiError> {
    let bytes = size.bytes().map_err(ApiError::bad_request)?;
    if bytes == 0 {
        return Err(ApiError::bad_request("size must be greater than 0"));
    }
    let asked = size.as_typed();
    if bytes > MAX_VOLUME_SIZE {
        return Err(ApiError::bad_request(format!(
            "size {asked} exceeds the largest volume, {}",
            human_size(MAX_VOLUME_SIZE)
        )));
    }
    if bytes % 512 != 0 {
        let exact = match size {
            keel_api::SizeInput::Human(_) => format!(" ({bytes} bytes)"),
            keel_api::SizeInput::Bytes(_) => String::new(),
        };
        return Err(ApiError::bad_request(format!(
            "size {asked}{exact} is not a multiple of 512 bytes; round it, e.g. to {} bytes",
            bytes.div_ceil(512) * 512
        )));
    }
    Ok(bytes)
}

fn check_name(what: &str, s: &str) -> Result<(), ApiError> {
    if valid_name(s) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{what} {s:?} is invalid: use 1 to 64 letters, digits, '.', '_' or '-'"
        )))
    }
}

/// Refuses what cannot be a volume name (id shapes included: ids and names never collide).
fn check_volume_name(s: &str) -> Result<(), ApiError> {
    match volume_name_problem(s) {
        None => Ok(()),
        Some(why) => Err(ApiError::bad_request(format!(
            "volume name {s:?} is refused: {why}"
        ))),
    }
}

fn to_json<T: Serialize>(t: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(t).map_err(|e| ApiError::internal(format!("encoding a record: {e}")))
}

/// How often a transaction that lost a race is re-read and retried before the API answers 503.
const TXN_ATTEMPTS: usize = 64;

fn new_volume_id() -> String {
    let mut b = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    let mut v = u64::from_le_bytes(b);
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        v ^= t.rotate_left(17) ^ u64::from(std::process::id());
    }
    // The top bit set: always 16 hex digits, which is also the guest's disk serial.
    format!("{:016x}", v | (1 << 63))
}

impl Controller {
    pub fn new(store: Arc<dyn MetaStore>, push: Pusher, cfg: Config) -> Arc<Controller> {
        let c = Arc::new(Controller {
            store,
            push,
            live: Mutex::new(Live::default()),
            cfg,
            started: Instant::now(),
            probes: Mutex::new(HashMap::new()),
        });
        if let Err(e) = c.index_names() {
            tracing::warn!(error = %e, "indexing volume names failed; names resolve by scanning");
        }
        c
    }

    /// Builds the `name/` keys of volumes created before the name index existed (and repairs
    /// markers of names held by several such volumes once one is left). A name several of
    /// them share gets the marker `""`: it is refused for new volumes, and resolving it is
    /// refused while more than one holds it.
    fn index_names(&self) -> Result<(), ApiError> {
        let mut by_name: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (v, _) in self.list::<VolumeRecord>(VOLUME_PREFIX)? {
            if let Some(n) = v.name {
                by_name.entry(n).or_default().push(v.id);
            }
        }
        for (key, v) in blocking(|| self.store.list(NAME_PREFIX))? {
            let name = &key[NAME_PREFIX.len()..];
            if !by_name.contains_key(name) && v.value == b"\"\"" {
                let _ = self.txn(&[(key.clone(), v.version)], &[], std::slice::from_ref(&key))?;
            }
        }
        for (name, ids) in by_name {
            let key = name_key(&name);
            let want = if ids.len() == 1 {
                ids[0].clone()
            } else {
                String::new()
            };
            let (expected, put) = match self.load::<String>(&key)? {
                None => (0, true),
                Some((cur, ver)) => (ver, cur.is_empty() && !want.is_empty()),
            };
            if put {
                if ids.len() > 1 {
                    tracing::warn!(name = %name, ids = ?ids, "volumes created before names were unique share a name: resolve them by id");
                }
                self.txn(&[(key.clone(), expected)], &[(key, to_json(&want)?)], &[])?;
            }
        }
        Ok(())
    }

    /// One store transaction (see [`MetaStore::txn`]): `Ok(true)` when applied.
    fn txn(
        &self,
        compares: &[(String, u64)],
        puts: &[(String, Vec<u8>)],
        deletes: &[String],
    ) -> Result<bool, ApiError> {
        let compares: Vec<(&str, u64)> = compares.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let puts: Vec<(&str, &[u8])> = puts
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let deletes: Vec<&str> = deletes.iter().map(String::as_str).collect();
        Ok(blocking(|| self.store.txn(&compares, &puts, &deletes))?.is_some())
    }

    /// The versions of the servers' reservation fences (`alloc/<server>`; 0: none yet). Read
    /// before counting allocations: a reservation compares them.
    fn fences(&self) -> Result<HashMap<String, u64>, ApiError> {
        Ok(blocking(|| self.store.list(ALLOC_PREFIX))?
            .into_iter()
            .map(|(k, v)| (k[ALLOC_PREFIX.len()..].to_string(), v.version))
            .collect())
    }

    /// Like [`Controller::update_volume`] for changes that take room on servers: `f` sees the
    /// record and the current allocations and returns the servers it adds bytes to (`None`:
    /// nothing to change). The record and those servers' fences are written in one
    /// transaction comparing the versions read before the allocations were counted, so two
    /// reservations can never both count the same free space. Returns the record and whether
    /// it changed.
    fn update_volume_reserving(
        &self,
        id: &str,
        mut f: impl FnMut(
            &mut VolumeRecord,
            &HashMap<String, (u64, u64)>,
        ) -> Result<Option<Vec<String>>, ApiError>,
    ) -> Result<(VolumeRecord, bool), ApiError> {
        let key = volume_key(id);
        for _ in 0..TXN_ATTEMPTS {
            let fences = self.fences()?;
            let alloc = self.allocations()?;
            let (mut vol, version) = self
                .load::<VolumeRecord>(&key)?
                .ok_or_else(|| ApiError::not_found(format!("volume {id} not found")))?;
            let Some(servers) = f(&mut vol, &alloc)? else {
                return Ok((vol, false));
            };
            let mut compares = vec![(key.clone(), version)];
            let mut puts = vec![(key.clone(), to_json(&vol)?)];
            for s in &servers {
                compares.push((alloc_key(s), fences.get(s).copied().unwrap_or(0)));
                puts.push((alloc_key(s), to_json(&id)?));
            }
            if self.txn(&compares, &puts, &[])? {
                return Ok((vol, true));
            }
        }
        Err(ApiError::unavailable(format!(
            "volume {id} keeps changing concurrently; retry"
        )))
    }

    /// Removes a volume's record, and its name key if it names this volume, in one
    /// transaction — if the record still satisfies `only_if`.
    fn remove_volume(
        &self,
        id: &str,
        only_if: impl Fn(&VolumeRecord) -> bool,
    ) -> Result<(), ApiError> {
        let key = volume_key(id);
        for _ in 0..TXN_ATTEMPTS {
            let Some((cur, ver)) = self.load::<VolumeRecord>(&key)? else {
                return Ok(());
            };
            if !only_if(&cur) {
                return Ok(());
            }
            let mut compares = vec![(key.clone(), ver)];
            let mut deletes = vec![key.clone()];
            if let Some(n) = &cur.name {
                let nk = name_key(n);
                if let Some((holder, nver)) = self.load::<String>(&nk)? {
                    if holder == id {
                        compares.push((nk.clone(), nver));
                        deletes.push(nk);
                    }
                }
            }
            if self.txn(&compares, &[], &deletes)? {
                return Ok(());
            }
        }
        Err(ApiError::unavailable(format!(
            "volume {id} keeps changing concurrently; retry"
        )))
    }

    /// The volume named `name`: through its `name/` key; for names indexed as shared by
    /// volumes older than the index (or, defensively, an index that does not match), by a
    /// scan that refuses ambiguity.
    fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRecord>, ApiError> {
        let Some((id, _)) = self.load::<String>(&name_key(name))? else {
            return Ok(None);
        };
        if !id.is_empty() {
            if let Some((v, _)) = self.load::<VolumeRecord>(&volume_key(&id))? {
                if v.name.as_deref() == Some(name) {
                    return Ok(Some(v));
                }
            }
        }
        let mut found: Vec<VolumeRecord> = self
            .list::<VolumeRecord>(VOLUME_PREFIX)?
            .into_iter()
            .map(|(v, _)| v)
            .filter(|v| v.name.as_deref() == Some(name))
            .collect();
        if found.len() > 1 {
            let ids: Vec<&str> = found.iter().map(|v| v.id.as_str()).collect();
            return Err(ApiError::conflict(format!(
                "several volumes created before names were unique are named {name}: {}; use the id",
                ids.join(", ")
            )));
        }
        Ok(found.pop())
    }

    pub fn store(&self) -> &Arc<dyn MetaStore> {
        &self.store
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>, ApiError> {
        let Some(v) = blocking(|| self.store.get(key))? else {
            return Ok(None);
        };
        let t = serde_json::from_slice(&v.value)
            .map_err(|e| ApiError::internal(format!("record {key} is corrupt: {e}")))?;
        Ok(Some((t, v.version)))
    }

    fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(T, u64)>, ApiError> {
        let rows = blocking(|| self.store.list(prefix))?;
        rows.into_iter()
            .map(|(k, v)| {
                serde_json::from_slice(&v.value)
                    .map(|t| (t, v.version))
                    .map_err(|e| ApiError::internal(format!("record {k} is corrupt: {e}")))
            })
            .collect()
    }

    fn cas<T: Serialize>(
        &self,
        key: &str,
        expected: u64,
        value: Option<&T>,
    ) -> Result<u64, StoreError> {
        let bytes = value
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        blocking(|| self.store.cas(key, expected, bytes.as_deref()))
    }

    /// Writes the record `make` builds from the current one (if any), unless it is unchanged;
    /// retries on concurrent changes.
    fn upsert<R>(&self, key: &str, make: impl Fn(Option<&R>) -> R) -> Result<(), ApiError>
    where
        R: Serialize + DeserializeOwned + PartialEq,
    {
        loop {
            let existing = self.load::<R>(key)?;
            let rec = make(existing.as_ref().map(|(r, _)| r));
            if existing.as_ref().is_some_and(|(r, _)| *r == rec) {
                return Ok(());
            }
            match self.cas(key, existing.map(|(_, v)| v).unwrap_or(0), Some(&rec)) {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// `not_found` unless `key` holds a registration.
    fn require_registered<R: DeserializeOwned>(
        &self,
        key: &str,
        what: &str,
    ) -> Result<(), ApiError> {
        match self.load::<R>(key)? {
            Some(_) => Ok(()),
            None => Err(ApiError::not_found(format!(
                "{what} is not registered; register first"
            ))),
        }
    }

    /// Applies `f` to a volume record and commits it with compare-and-swap, retrying on
    /// concurrent changes. `f` returning `Ok(None)` means "nothing to change".
    fn update_volume(
        &self,
        id: &str,
        mut f: impl FnMut(&mut VolumeRecord) -> Result<bool, ApiError>,
    ) -> Result<VolumeRecord, ApiError> {
        for _ in 0..64 {
            let (mut vol, version) = self
                .load::<VolumeRecord>(&volume_key(id))?
                .ok_or_else(|| ApiError::not_found(format!("volume {id} not found")))?;
            if !f(&mut vol)? {
                return Ok(vol);
            }
            match self.cas(&volume_key(id), version, Some(&vol)) {
                Ok(_) => return Ok(vol),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::unavailable(format!(
            "volume {id} keeps changing concurrently; retry"
        )))
    }

    // ----- servers -----

    pub fn register_server(
        &self,
        caller: &Caller,
        reg: ServerRegistration,
    ) -> Result<ServerInfo, ApiError> {
        caller.may_register("storage server", &reg.id)?;
        check_name("server id", &reg.id)?;
        let address: SocketAddr = reg.address.parse().map_err(|_| {
            ApiError::bad_request(format!("address {:?} is not IP:PORT", reg.address))
        })?;
        if address.port() == 0 || address.ip().is_unspecified() {
            return Err(ApiError::bad_request(format!(
                "address {address} is not reachable: give the IP and port clients connect to"
            )));
        }
        if reg.capacity_bytes == 0 {
            return Err(ApiError::bad_request(
                "capacity_bytes must be greater than 0",
            ));
        }
        if !reg.zone.is_empty() {
            check_name("zone", &reg.zone)?;
        }
        self.upsert(&server_key(&reg.id), |old: Option<&ServerRecord>| {
            ServerRecord {
                id: reg.id.clone(),
                address: address.to_string(),
                zone: reg.zone.clone(),
                capacity_bytes: reg.capacity_bytes,
                registered_at_unix: old.map(|r| r.registered_at_unix).unwrap_or_else(now_unix),
            }
        })?;
        tracing::info!(server = %reg.id, address = %reg.address, zone = %reg.zone, "storage server registered");
        // A server may come back smaller than what is placed on it (its operator's choice):
        // placement puts nothing more there, and the operator should hear it.
        if let Some((allocated, _)) = self
            .allocations()
            .ok()
            .and_then(|a| a.get(&reg.id).copied())
        {
            if allocated > reg.capacity_bytes {
                tracing::warn!(server = %reg.id, capacity = reg.capacity_bytes, allocated, "storage server registered with less capacity than its copies take: nothing more is placed there; move or delete volumes, or give it more space");
            }
        }
        self.live().servers.insert(
            reg.id.clone(),
            ServerLive {
                last_seen: Instant::now(),
                hb: ServerHeartbeat::default(),
            },
        );
        self.server_info(&reg.id)
    }

    pub fn server_heartbeat(
        &self,
        caller: &Caller,
        id: &str,
        hb: ServerHeartbeat,
    ) -> Result<(), ApiError> {
        if !matches!(caller, Caller::Storage(c) if c == id) {
            return Err(ApiError::forbidden(format!(
                "only storage server {id} may heartbeat as itself"
            )));
        }
        self.require_registered::<ServerRecord>(&server_key(id), &format!("storage server {id}"))?;
        self.live().servers.insert(
            id.to_string(),
            ServerLive {
                last_seen: Instant::now(),
                hb,
            },
        );
        Ok(())
    }

    fn server_up(&self, id: &str) -> bool {
        self.live()
            .servers
            .get(id)
            .is_some_and(|s| s.last_seen.elapsed() < self.cfg.failure_timeout)
    }

    /// Why the copy of `volume` on `server` is lost (docs/replication.md, R10), if it is: its
    /// server is up and reports the copy with a fault, or has not reported it for the failure
    /// timeout although the volume's record places it there (see [`Controller::note_missing`]).
    /// A copy on a server that is down is not lost by this rule (R6 and re-replication handle
    /// servers that are down).
    fn copy_lost(&self, volume: &str, server: &str) -> Option<String> {
        let live = self.live();
        let l = live
            .servers
            .get(server)
            .filter(|l| l.last_seen.elapsed() < self.cfg.failure_timeout)?;
        if let Some(r) = l.hb.copies.iter().find(|r| r.volume == volume) {
            return r.fault.clone();
        }
        let since = live
            .missing
            .get(&(volume.to_string(), server.to_string()))?;
        (since.elapsed() >= self.cfg.failure_timeout).then(|| {
            format!(
                "the server has not reported the copy for {} s",
                since.elapsed().as_secs()
            )
        })
    }

    /// Whether the copy of `volume` on `server` may serve: its server is up and the copy is
    /// not lost.
    fn copy_usable(&self, volume: &str, server: &str) -> bool {
        self.server_up(server) && self.copy_lost(volume, server).is_none()
    }

    /// Positive evidence that the copy of `volume` on `server` exists and is sound: its server
    /// is up and its latest heartbeat (or a push it acknowledged since) lists the copy without
    /// a fault. What a mirror must show to be promoted, and a primary before a lost mirror is
    /// dropped or deleted (R10): the absence of a fault report is not enough (a server
    /// restarted with an empty data directory has not reported its copies missing yet).
    fn copy_reported_healthy(&self, volume: &str, server: &str) -> bool {
        let live = self.live();
        live.servers.get(server).is_some_and(|l| {
            l.last_seen.elapsed() < self.cfg.failure_timeout
                && l.hb
                    .copies
                    .iter()
                    .any(|r| r.volume == volume && r.fault.is_none())
        })
    }

    /// Whether `v`'s primary can stand alone while lost mirrors are dropped or replaced: its
    /// copy is reported healthy, and this controller has had one failure timeout since its
    /// start to hear every server.
    fn primary_reported_healthy(&self, v: &VolumeRecord) -> bool {
        self.started.elapsed() >= self.cfg.failure_timeout
            && v.primary()
                .is_some_and(|p| self.copy_reported_healthy(&v.id, &p.server))
    }

    /// Updates, for a ready volume, since when each of its copies has been missing from its
    /// live server's heartbeats (R10).
    fn note_missing(&self, v: &VolumeRecord) {
        let now = Instant::now();
        let mut live = self.live();
        let Live {
            servers, missing, ..
        } = &mut *live;
        for c in &v.copies {
            let key = (v.id.clone(), c.server.clone());
            let reported = servers.get(&c.server).and_then(|l| {
                (l.last_seen.elapsed() < self.cfg.failure_timeout)
                    .then(|| l.hb.copies.iter().any(|r| r.volume == v.id))
            });
            let expected = !(c.role == CopyRole::Mirror && c.rebuilding);
            match reported {
                Some(false) if expected && v.state == VolumeRecordState::Ready => {
                    missing.entry(key).or_insert(now);
                }
                _ => {
                    missing.remove(&key);
                }
            }
        }
    }

    /// Records a push the server acknowledged, so `describe` need not wait for its next
    /// heartbeat to show the copy current.
    fn note_copy(
        &self,
        server: &str,
        volume: &str,
        size: u64,
        epoch: u64,
        role: CopyRole,
        access: Option<u32>,
    ) {
        let mut live = self.live();
        let Some(l) = live.servers.get_mut(server) else {
            return;
        };
        let mut report = keel_api::CopyReport {
            volume: volume.to_string(),
            size,
            epoch,
            role: role.as_str().into(),
            access_crc32c: access,
            fault: None,
        };
        match l.hb.copies.iter_mut().find(|c| c.volume == volume) {
            Some(c) => {
                // A push taken does not mend a lost copy (R10): only its next heartbeat says.
                report.fault = c.fault.take();
                *c = report;
            }
            None => l.hb.copies.push(report),
        }
    }

    fn allocations(&self) -> Result<HashMap<String, (u64, u64)>, ApiError> {
        let mut out: HashMap<String, (u64, u64)> = HashMap::new();
        for (v, _) in self.list::<VolumeRecord>(VOLUME_PREFIX)? {
            for c in &v.copies {
                let e = out.entry(c.server.clone()).or_default();
                e.0 += v.size;
                e.1 += 1;
            }
        }
        Ok(out)
    }

    fn server_info_from(
        &self,
        r: &ServerRecord,
        alloc: &HashMap<String, (u64, u64)>,
    ) -> ServerInfo {
        let live = self.live();
        let l = live.servers.get(&r.id);
        let (allocated, copies) = alloc.get(&r.id).copied().unwrap_or((0, 0));
        let ago = l.map(|l| l.last_seen.elapsed());
        ServerInfo {
            id: r.id.clone(),
            address: r.address.clone(),
            zone: r.zone.clone(),
            capacity_bytes: r.capacity_bytes,
            allocated_bytes: allocated,
            used_bytes: l.map(|l| l.hb.used_bytes).unwrap_or(0),
            copies,
            health: if ago.is_some_and(|a| a < self.cfg.failure_timeout) {
                Health::Up
            } else {
                Health::Down
            },
            last_seen_ms_ago: ago.map(|a| a.as_millis() as u64).unwrap_or(u64::MAX),
            counters: l.map(|l| l.hb.counters.clone()).unwrap_or_default(),
        }
    }

    fn server_info(&self, id: &str) -> Result<ServerInfo, ApiError> {
        let (r, _) = self
            .load::<ServerRecord>(&server_key(id))?
            .ok_or_else(|| ApiError::not_found(format!("storage server {id} not found")))?;
        Ok(self.server_info_from(&r, &self.allocations()?))
    }

    pub fn list_servers(&self) -> Result<Vec<ServerInfo>, ApiError> {
        let alloc = self.allocations()?;
        Ok(self
            .list::<ServerRecord>(SERVER_PREFIX)?
            .iter()
            .map(|(r, _)| self.server_info_from(r, &alloc))
            .collect())
    }

    // ----- nodes -----

    pub fn register_node(
        &self,
        caller: &Caller,
        reg: NodeRegistration,
    ) -> Result<NodeInfo, ApiError> {
        caller.may_register("node", &reg.id)?;
        check_name("node id", &reg.id)?;
        if !reg.socket_dir.starts_with('/') {
            return Err(ApiError::bad_request(format!(
                "socket_dir {:?} must be an absolute path",
                reg.socket_dir
            )));
        }
        self.upsert(&node_key(&reg.id), |old: Option<&NodeRecord>| NodeRecord {
            id: reg.id.clone(),
            socket_dir: reg.socket_dir.clone(),
            registered_at_unix: old.map(|r| r.registered_at_unix).unwrap_or_else(now_unix),
        })?;
        tracing::info!(node = %reg.id, socket_dir = %reg.socket_dir, "node registered");
        self.live().nodes.insert(
            reg.id.clone(),
            NodeLive {
                last_seen: Instant::now(),
                hb: NodeHeartbeat::default(),
                reported: false,
            },
        );
        self.list_nodes()?
            .into_iter()
            .find(|n| n.id == reg.id)
            .ok_or_else(|| ApiError::internal("node vanished after registering"))
    }

    pub fn node_heartbeat(
        &self,
        caller: &Caller,
        id: &str,
        hb: NodeHeartbeat,
    ) -> Result<(), ApiError> {
        if !matches!(caller, Caller::Node(c) if c == id) {
            return Err(ApiError::forbidden(format!(
                "only node {id} may heartbeat as itself"
            )));
        }
        self.require_registered::<NodeRecord>(&node_key(id), &format!("node {id}"))?;
        self.live().nodes.insert(
            id.to_string(),
            NodeLive {
                last_seen: Instant::now(),
                hb,
                reported: true,
            },
        );
        Ok(())
    }

    pub fn list_nodes(&self) -> Result<Vec<NodeInfo>, ApiError> {
        let vols = self.list::<VolumeRecord>(VOLUME_PREFIX)?;
        let nodes = self.list::<NodeRecord>(NODE_PREFIX)?;
        let live = self.live();
        Ok(nodes
            .into_iter()
            .map(|(n, _)| {
                let ago = live.nodes.get(&n.id).map(|l| l.last_seen.elapsed());
                NodeInfo {
                    attachments: vols
                        .iter()
                        .flat_map(|(v, _)| &v.attachments)
                        .filter(|a| a.node == n.id)
                        .count() as u64,
                    id: n.id,
                    socket_dir: n.socket_dir,
                    health: if ago.is_some_and(|a| a < self.cfg.failure_timeout) {
                        Health::Up
                    } else {
                        Health::Down
                    },
                    last_seen_ms_ago: ago.map(|a| a.as_millis() as u64).unwrap_or(u64::MAX),
                }
            })
            .collect())
    }

    /// Whether the node last reported a guest connected to this attachment; `None` when the
    /// node has not reported since this controller started (a restarted controller knows
    /// nothing yet).
    fn guest_connected(&self, node: &str, volume: &str, instance: &str) -> Option<bool> {
        self.live().nodes.get(node).filter(|n| n.reported).map(|n| {
            n.hb.attachments
                .iter()
                .any(|a| a.volume == volume && a.instance == instance && a.connected)
        })
    }

    /// A node's attachments, waiting up to `wait` for the store to move past `after`.
    pub async fn node_attachments(
        &self,
        caller: &Caller,
        node: &str,
        after: u64,
        wait: Duration,
    ) -> Result<NodeAttachments, ApiError> {
        match caller {
            Caller::Node(c) if c == node => {}
            Caller::Admin(_) => {}
            _ => {
                return Err(ApiError::forbidden(format!(
                    "only node {node} may watch its attachments"
                )))
            }
        }
        self.require_registered::<NodeRecord>(&node_key(node), &format!("node {node}"))?;
        let mut rx = self.store.watch();
        if *rx.borrow_and_update() <= after {
            let _ = tokio::time::timeout(wait.min(Duration::from_secs(60)), rx.changed()).await;
        }
        let version = self.store.revision();
        let servers: HashMap<String, ServerRecord> = self
            .list::<ServerRecord>(SERVER_PREFIX)?
            .into_iter()
            .map(|(s, _)| (s.id.clone(), s))
            .collect();
        let mut attachments = Vec::new();
        for (v, _) in self.list::<VolumeRecord>(VOLUME_PREFIX)? {
            if v.state != VolumeRecordState::Ready {
                continue;
            }
            let server = v
                .primary()
                .and_then(|p| servers.get(&p.server))
                .map(|s| s.address.clone())
                .unwrap_or_default();
            for a in v.attachments.iter().filter(|a| a.node == node) {
                attachments.push(NodeAttachment {
                    volume: v.id.clone(),
                    instance: a.instance.clone(),
                    socket: a.socket.clone(),
                    read_only: a.mode == Mode::ReadOnly,
                    epoch: v.writer_floor(),
                    size: v.size,
                    server: server.clone(),
                    block_size: v.block_size,
                });
            }
        }
        Ok(NodeAttachments {
            version,
            attachments,
        })
    }

    // ----- volumes -----

    /// Finds a volume by id or by name. An argument of id shape (1 to 32 hex digits,
    /// optionally after `vol-`) is looked up as an id only, anything else as a name only:
    /// names never have an id's shape, so one can never reach another volume.
    pub fn resolve(&self, id_or_name: &str) -> Result<VolumeRecord, ApiError> {
        if let Some(id) = id_shape(id_or_name) {
            return match self.load::<VolumeRecord>(&volume_key(&id))? {
                Some((v, _)) => Ok(v),
                None => Err(ApiError::not_found(format!(
                    "no volume has the id {id} (an argument of hex digits, optionally after vol-, is always an id, never a name; `keelctl volume list` shows the volumes)"
                ))),
            };
        }
        if !valid_name(id_or_name) {
            return Err(ApiError::bad_request(format!(
                "{id_or_name:?} is neither a volume id (hex digits, optionally after vol-) nor a volume name (1 to 64 letters, digits, '.', '_' or '-')"
            )));
        }
        self.volume_by_name(id_or_name)?.ok_or_else(|| {
            ApiError::not_found(format!(
                "no volume is named {id_or_name} (`keelctl volume list` shows the volumes)"
            ))
        })
    }

    fn volume_info(&self, v: &VolumeRecord) -> Result<VolumeInfo, ApiError> {
        let servers: HashMap<String, ServerRecord> = self
            .list::<ServerRecord>(SERVER_PREFIX)?
            .into_iter()
            .map(|(s, _)| (s.id.clone(), s))
            .collect();
        let live = self.live();
        let copies = v
            .copies
            .iter()
            .map(|c| {
                let l = live.servers.get(&c.server);
                let up = l.is_some_and(|l| l.last_seen.elapsed() < self.cfg.failure_timeout);
                let reported = l.and_then(|l| l.hb.copies.iter().find(|r| r.volume == v.id));
                let state = if c.role == CopyRole::Mirror && c.rebuilding {
                    "rebuilding"
                } else if c.role == CopyRole::Mirror && !c.in_sync {
                    // Whatever its server does, a dropped mirror holds no guarantee.
                    "stale"
                } else if !up {
                    "server_down"
                } else if reported.is_some_and(|r| r.fault.is_some()) {
                    "lost"
                } else {
                    match reported {
                        None if v.state == VolumeRecordState::Creating => "pending",
                        None => "missing",
                        Some(r) if r.size < v.size || r.epoch < v.epoch => "pending",
                        Some(_) if c.role == CopyRole::Mirror => "in_sync",
                        Some(_) => "ok",
                    }
                };
                let rebuild_percent = (state == "rebuilding")
                    .then(|| {
                        let primary = v.primary()?;
                        let addr = servers.get(&c.server)?.address.clone();
                        let r = live
                            .servers
                            .get(&primary.server)?
                            .hb
                            .rebuilds
                            .iter()
                            .find(|r| r.volume == v.id && r.mirror == addr)?;
                        Some((r.copied.min(r.total) * 100 / r.total.max(1)) as u8)
                    })
                    .flatten();
                CopyInfo {
                    rebuild_percent,
                    server: c.server.clone(),
                    address: servers
                        .get(&c.server)
                        .map(|s| s.address.clone())
                        .unwrap_or_default(),
                    role: c.role.as_str().into(),
                    state: state.into(),
                    fault: reported.and_then(|r| r.fault.clone()),
                }
            })
            .collect();
        let attachments = v
            .attachments
            .iter()
            .map(|a| AttachmentInfo {
                node: a.node.clone(),
                instance: a.instance.clone(),
                mode: a.mode.as_str().into(),
                socket: a.socket.clone(),
                epoch: v.writer_floor(),
                connected: live.nodes.get(&a.node).is_some_and(|n| {
                    n.hb.attachments
                        .iter()
                        .any(|r| r.volume == v.id && r.instance == a.instance && r.connected)
                }),
                ready: ready::listening(&live, &a.node, &v.id, &a.instance),
                attached_at_unix: a.attached_at_unix,
            })
            .collect();
        Ok(VolumeInfo {
            id: v.id.clone(),
            name: v.name.clone(),
            size: v.size,
            replicas: v.replicas,
            block_size: v.block_size,
            state: match v.state {
                VolumeRecordState::Creating => VolumeState::Creating,
                VolumeRecordState::Deleting => VolumeState::Deleting,
                VolumeRecordState::Ready if v.attachments.is_empty() => VolumeState::Available,
                VolumeRecordState::Ready => VolumeState::Attached,
            },
            epoch: v.epoch,
            copies,
            attachments,
            created_at_unix: v.created_at_unix,
        })
    }

    pub fn describe(&self, id_or_name: &str) -> Result<VolumeInfo, ApiError> {
        let v = self.resolve(id_or_name)?;
        self.volume_info(&v)
    }

    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>, ApiError> {
        self.list::<VolumeRecord>(VOLUME_PREFIX)?
            .iter()
            .map(|(v, _)| self.volume_info(v))
            .collect()
    }

    fn server_addresses(&self) -> Result<HashMap<String, SocketAddr>, ApiError> {
        Ok(self
            .list::<ServerRecord>(SERVER_PREFIX)?
            .into_iter()
            .filter_map(|(s, _)| s.address.parse().ok().map(|a| (s.id, a)))
            .collect())
    }

    pub async fn create_volume(&self, req: CreateVolume) -> Result<VolumeInfo, ApiError> {
        let size = check_size(&req.size)?;
        let replicas = req.replicas.unwrap_or(DEFAULT_REPLICAS);
        if replicas == 0 || replicas > MAX_REPLICAS {
            return Err(ApiError::bad_request(format!(
                "replicas must be between 1 and {MAX_REPLICAS}, not {replicas}"
            )));
        }
        if let Some(n) = &req.name {
            check_volume_name(n)?;
        }
        let block_size = req.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        if !BLOCK_SIZES.contains(&block_size) {
            return Err(ApiError::bad_request(format!(
                "block_size must be 512 or 4096 (bytes), not {block_size}"
            )));
        }
        if !size.is_multiple_of(u64::from(block_size)) {
            return Err(ApiError::bad_request(format!(
                "a volume of {block_size}-byte blocks needs a size that is a multiple of {block_size}, not {size}"
            )));
        }
        // One transaction: the record, its name key (only if absent) and the fences of the
        // servers it takes room on (only if no other reservation came since the allocations
        // were counted). A lost race re-reads and decides again.
        let mut committed = None;
        for _ in 0..TXN_ATTEMPTS {
            let mut compares = Vec::new();
            let mut puts = Vec::new();
            if let Some(n) = &req.name {
                if let Some((holder, _)) = self.load::<String>(&name_key(n))? {
                    return Err(ApiError::conflict(if holder.is_empty() {
                        format!("the name {n} is taken by several volumes created before names were unique")
                    } else {
                        format!("a volume named {n} exists already: {holder}")
                    }));
                }
                compares.push((name_key(n), 0));
            }
            let fences = self.fences()?;
            let alloc = self.allocations()?;
            let candidates: Vec<Candidate> = self
                .list::<ServerRecord>(SERVER_PREFIX)?
                .into_iter()
                .map(|(s, _)| Candidate {
                    up: self.server_up(&s.id),
                    allocated_bytes: alloc.get(&s.id).map(|a| a.0).unwrap_or(0),
                    id: s.id,
                    zone: s.zone,
                    capacity_bytes: s.capacity_bytes,
                })
                .collect();
            let chosen = place(&candidates, size, replicas as usize).map_err(|e| {
                ApiError::insufficient(placement_advice(
                    &e,
                    &candidates,
                    replicas as usize,
                    req.replicas.is_none(),
                ))
            })?;
            let id = new_volume_id();
            let rec = VolumeRecord {
                id: id.clone(),
                name: req.name.clone(),
                size,
                replicas,
                block_size,
                state: VolumeRecordState::Creating,
                epoch: 1,
                writer_epoch: 1,
                copies: chosen
                    .iter()
                    .enumerate()
                    .map(|(i, s)| CopyRecord {
                        server: s.clone(),
                        in_sync: true,
                        rebuilding: false,
                        role: if i == 0 {
                            CopyRole::Primary
                        } else {
                            CopyRole::Mirror
                        },
                    })
                    .collect(),
                attachments: vec![],
                created_at_unix: now_unix(),
            };
            compares.push((volume_key(&id), 0));
            puts.push((volume_key(&id), to_json(&rec)?));
            if let Some(n) = &req.name {
                puts.push((name_key(n), to_json(&id)?));
            }
            for s in &chosen {
                compares.push((alloc_key(s), fences.get(s).copied().unwrap_or(0)));
                puts.push((alloc_key(s), to_json(&id)?));
            }
            if self.txn(&compares, &puts, &[])? {
                committed = Some((id, rec, chosen));
                break;
            }
        }
        let Some((id, rec, chosen)) = committed else {
            return Err(ApiError::unavailable(
                "volume not created: other creates kept taking the same servers; retry",
            ));
        };
        let addrs = self.server_addresses()?;
        let mut failed = None;
        for c in &rec.copies {
            let Some(addr) = addrs.get(&c.server) else {
                failed = Some(format!("server {} has no address", c.server));
                break;
            };
            if let Err(e) = self
                .push
                .create_copy(*addr, &rec.id, rec.size, c.role, rec.epoch)
                .await
            {
                failed = Some(format!("creating the copy on server {}: {e}", c.server));
                break;
            }
            self.note_copy(
                &c.server,
                &rec.id,
                rec.size,
                rec.epoch,
                c.role,
                empty_access(),
            );
        }
        if let Some(why) = failed {
            // Undo: remove what was made, then the record.
            for c in &rec.copies {
                if let Some(addr) = addrs.get(&c.server) {
                    let _ = self.push.delete_copy(*addr, &rec.id).await;
                }
            }
            if let Err(e) = self.remove_volume(&id, |_| true) {
                tracing::warn!(volume = %id, error = %e, "removing the record of a failed create");
            }
            return Err(ApiError::unavailable(format!(
                "volume not created: {why}; check the storage servers (`keelctl server list`) and retry"
            )));
        }
        let rec = self.update_volume(&id, |v| {
            v.state = VolumeRecordState::Ready;
            Ok(true)
        })?;
        tracing::info!(volume = %id, size, servers = ?chosen, "volume created");
        self.volume_info(&rec)
    }

    pub async fn delete_volume(&self, id_or_name: &str) -> Result<DeleteResult, ApiError> {
        let v = self.resolve(id_or_name)?;
        let id = v.id.clone();
        let v = self.update_volume(&id, |v| {
            if let Some(a) = v.attachments.first() {
                return Err(ApiError::conflict(format!(
                    "volume {} is attached to instance {} on node {}; detach it first",
                    v.id, a.instance, a.node
                )));
            }
            if v.state == VolumeRecordState::Deleting {
                return Ok(false);
            }
            v.state = VolumeRecordState::Deleting;
            Ok(true)
        })?;
        let complete = self.finish_delete(&v).await?;
        tracing::info!(volume = %id, complete, "volume deleted");
        Ok(DeleteResult { id, complete })
    }

    /// Deletes a `Deleting` volume's copies; removes the record once all are gone.
    async fn finish_delete(&self, v: &VolumeRecord) -> Result<bool, ApiError> {
        let addrs = self.server_addresses()?;
        let mut all = true;
        for c in &v.copies {
            let ok = match addrs.get(&c.server) {
                Some(addr) => self.push.delete_copy(*addr, &v.id).await.is_ok(),
                None => true,
            };
            all &= ok;
        }
        if all {
            self.probes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&v.id);
            self.remove_volume(&v.id, |cur| cur.state == VolumeRecordState::Deleting)?;
        }
        Ok(all)
    }

    fn ready(v: &VolumeRecord) -> Result<(), ApiError> {
        match v.state {
            VolumeRecordState::Ready => Ok(()),
            VolumeRecordState::Creating => Err(ApiError::conflict(format!(
                "volume {} is still being created; retry shortly",
                label(v)
            ))),
            VolumeRecordState::Deleting => Err(ApiError::conflict(format!(
                "volume {} is being deleted",
                label(v)
            ))),
        }
    }

    pub async fn resize_volume(
        &self,
        id_or_name: &str,
        req: ResizeVolume,
    ) -> Result<VolumeInfo, ApiError> {
        let size = check_size(&req.size)?;
        let v = self.resolve(id_or_name)?;
        Self::ready(&v)?;
        if !size.is_multiple_of(u64::from(v.block_size)) {
            return Err(ApiError::bad_request(format!(
                "volume {} has {}-byte blocks: its size must be a multiple of that, not {} ({size} bytes)",
                label(&v),
                v.block_size,
                req.size.as_typed()
            )));
        }
        if size < v.size {
            return Err(ApiError::bad_request(format!(
                "volume {} is {}; volumes only grow (asked for {})",
                label(&v),
                human_size(v.size),
                req.size.as_typed()
            )));
        }
        let id = v.id.clone();
        let servers: HashMap<String, ServerRecord> = self
            .list::<ServerRecord>(SERVER_PREFIX)?
            .into_iter()
            .map(|(s, _)| (s.id.clone(), s))
            .collect();
        // The growth is reserved on every copy's server in one transaction with the record.
        let (v, _) = self.update_volume_reserving(&id, |v, alloc| {
            Self::ready(v)?;
            if size < v.size {
                return Err(ApiError::bad_request(format!(
                    "volume {} is {}; volumes only grow",
                    label(v),
                    human_size(v.size)
                )));
            }
            if size == v.size {
                return Ok(None);
            }
            let grow = size - v.size;
            for c in &v.copies {
                let rec = servers
                    .get(&c.server)
                    .ok_or_else(|| ApiError::internal(format!("server {} vanished", c.server)))?;
                let free = rec
                    .capacity_bytes
                    .saturating_sub(alloc.get(&c.server).map(|a| a.0).unwrap_or(0));
                if free < grow {
                    return Err(ApiError::insufficient(format!(
                        "growing volume {} by {} needs that much free on server {}, which has {}; free space there or grow it less",
                        label(v),
                        human_size(grow),
                        c.server,
                        human_size(free)
                    )));
                }
            }
            v.size = size;
            Ok(Some(v.copies.iter().map(|c| c.server.clone()).collect()))
        })?;
        let _ = self.push_membership(&v, true).await;
        tracing::info!(volume = %id, size, "volume resized");
        self.volume_info(&v)
    }

    /// Pushes the record's membership (epoch, writer epoch, roles, the primary's in-sync
    /// mirrors; and size, with `resize`) to every copy: mirrors first, then the primary
    /// (docs/replication.md, R2). Returns whether the primary took it; other failures are left
    /// to the reconciler.
    async fn push_membership(&self, v: &VolumeRecord, resize: bool) -> bool {
        self.push_membership_except(v, resize, None).await
    }

    /// [`Controller::push_membership`], skipping server `skip` (one the controller's own probe
    /// just found not answering: the reconciler pushes to it once it heartbeats again).
    async fn push_membership_except(
        &self,
        v: &VolumeRecord,
        resize: bool,
        skip: Option<&str>,
    ) -> bool {
        let Ok(addrs) = self.server_addresses() else {
            return false;
        };
        let mirrors: Vec<SocketAddr> = v
            .copies
            .iter()
            .filter(|c| c.role == CopyRole::Mirror && c.in_sync)
            .filter_map(|c| addrs.get(&c.server).copied())
            .collect();
        // In-sync mirrors first, so they refuse an older primary before the new membership
        // exists anywhere (R2); then the primary; stale mirrors last (they are in no one's
        // in-sync set). Servers that are down are left to the reconciler: a push to them would
        // only wait out its timeout while the primary waits for its membership.
        let rebuilding: Vec<SocketAddr> = v
            .copies
            .iter()
            .filter(|c| c.role == CopyRole::Mirror && !c.in_sync && c.rebuilding)
            .filter_map(|c| addrs.get(&c.server).copied())
            .collect();
        let mut order: Vec<&CopyRecord> = v
            .copies
            .iter()
            .filter(|c| c.role == CopyRole::Mirror && (c.in_sync || c.rebuilding))
            .collect();
        order.extend(v.copies.iter().filter(|c| c.role == CopyRole::Primary));
        order.extend(
            v.copies
                .iter()
                .filter(|c| c.role == CopyRole::Mirror && !c.in_sync && !c.rebuilding),
        );
        order.retain(|c| {
            (c.role == CopyRole::Primary || self.server_up(&c.server))
                && Some(c.server.as_str()) != skip
        });
        let (primary, grants) = membership::access_list(v);
        let digest = membership::access_digest(v);
        let mut primary_ok = false;
        for c in order {
            let Some(addr) = addrs.get(&c.server) else {
                continue;
            };
            if resize {
                if let Err(e) = self.push.resize(*addr, &v.id, v.size).await {
                    tracing::warn!(volume = %v.id, server = %c.server, error = %e, "resize push failed; the reconciler retries");
                    continue;
                }
            }
            let (list, rebuild) = if c.role == CopyRole::Primary {
                (mirrors.clone(), rebuilding.clone())
            } else {
                (Vec::new(), Vec::new())
            };
            let m = Membership {
                role: c.role,
                epoch: v.epoch,
                writer_epoch: v.writer_floor(),
                mirrors: list,
                rebuilding: rebuild,
                primary: primary.clone(),
                grants: grants.clone(),
            };
            match self.push.set_membership(*addr, &v.id, m).await {
                Ok(()) => {
                    self.note_copy(&c.server, &v.id, v.size, v.epoch, c.role, Some(digest));
                    primary_ok |= c.role == CopyRole::Primary;
                }
                Err(e) => {
                    tracing::warn!(volume = %v.id, server = %c.server, error = %e, "membership push failed; the reconciler retries")
                }
            }
        }
        primary_ok
    }

    /// Pushes an attachment change (a new access list: docs/security.md, A2) before the API
    /// call answers; a primary that did not take it is asked again twice (after 200 ms and
    /// 1 s) with the newest record, then left to the reconciler (which also compares the
    /// access digests the servers report).
    async fn push_access_change(&self, v: &VolumeRecord) {
        if self.push_membership(v, false).await {
            return;
        }
        for wait in [Duration::from_millis(200), Duration::from_secs(1)] {
            tokio::time::sleep(wait).await;
            let latest = match self.load::<VolumeRecord>(&volume_key(&v.id)) {
                Ok(Some((r, _))) if r.epoch >= v.epoch => r,
                _ => return,
            };
            if self.push_membership(&latest, false).await {
                return;
            }
        }
        tracing::warn!(volume = %v.id, epoch = v.epoch, "the primary has not taken the new access list; the reconciler keeps pushing it");
    }

    /// The id of the server whose data-path address is `addr` (`IP:PORT`), if any.
    fn server_at<'a>(addrs: &'a HashMap<String, SocketAddr>, addr: &str) -> Option<&'a str> {
        addrs
            .iter()
            .find(|(_, a)| a.to_string() == addr)
            .map(|(s, _)| s.as_str())
    }

    /// A primary could not replicate to one of its in-sync mirrors (docs/replication.md, R5):
    /// drop that mirror at a new epoch and push the new membership, so the primary may
    /// acknowledge without it. Refused when the caller is not the volume's primary or names an
    /// old epoch (it was replaced).
    pub async fn mirror_failed(
        &self,
        caller: &Caller,
        volume: &str,
        req: keel_api::MirrorFailed,
    ) -> Result<keel_api::MembershipInfo, ApiError> {
        let Caller::Storage(server) = caller else {
            return Err(ApiError::forbidden(
                "only a volume's primary storage server may report a failed mirror",
            ));
        };
        let addrs = self.server_addresses()?;
        let v = self.resolve(volume)?;
        let id = v.id.clone();
        let mirror = Self::server_at(&addrs, &req.mirror);
        let mut dropped = None;
        let v = self.update_volume(&id, |v| {
            dropped = None;
            match membership::drop_mirror(v, server, req.epoch, mirror, &req.mirror)? {
                Change::Unchanged => Ok(false),
                Change::Changed(m) => {
                    dropped = Some(m);
                    Ok(true)
                }
            }
        })?;
        if let Some(m) = dropped {
            tracing::warn!(volume = %id, mirror = %req.mirror, epoch = v.epoch, "mirror dropped from the in-sync set");
            self.note_dropped(&id, &m);
        }
        if !self.push_membership(&v, false).await {
            return Err(ApiError::unavailable(format!(
                "volume {id}: the new membership (epoch {}) did not reach the primary; retry",
                v.epoch
            )));
        }
        Ok(keel_api::MembershipInfo { epoch: v.epoch })
    }

    /// A rebuilding mirror caught up with its primary (docs/replication.md, R7): it joins the
    /// in-sync set at a new epoch, pushed before the answer. Same checks as `mirror_failed`.
    pub async fn mirror_synced(
        &self,
        caller: &Caller,
        volume: &str,
        req: keel_api::MirrorFailed,
    ) -> Result<keel_api::MembershipInfo, ApiError> {
        let Caller::Storage(server) = caller else {
            return Err(ApiError::forbidden(
                "only a volume's primary storage server may report a rebuilt mirror",
            ));
        };
        let addrs = self.server_addresses()?;
        let v = self.resolve(volume)?;
        let id = v.id.clone();
        let mirror = Self::server_at(&addrs, &req.mirror);
        let v = self.update_volume(&id, |v| {
            Ok(matches!(
                membership::mirror_synced(v, server, req.epoch, mirror, &req.mirror)?,
                Change::Changed(_)
            ))
        })?;
        tracing::info!(volume = %id, mirror = %req.mirror, epoch = v.epoch, "rebuilt mirror joined the in-sync set");
        if !self.push_membership(&v, false).await {
            return Err(ApiError::unavailable(format!(
                "volume {id}: the new membership (epoch {}) did not reach the primary; retry",
                v.epoch
            )));
        }
        Ok(keel_api::MembershipInfo { epoch: v.epoch })
    }

    /// A node reports that keel-vhost got no answer from the volume's primary (R6). The
    /// controller checks its own view first: a report naming another server than the primary
    /// is `already_moved`; otherwise it probes the primary itself (one probe per volume at a
    /// time, reused for `report_interval`) and only when that fails promotes an in-sync mirror
    /// whose server is up, pushing the new membership (R2) before answering `promoted`. One
    /// node's broken link cannot flap the volume.
    pub async fn primary_unreachable(
        &self,
        caller: &Caller,
        volume: &str,
        req: keel_api::PrimaryUnreachable,
    ) -> Result<keel_api::PrimaryReport, ApiError> {
        let reported: SocketAddr = req.server.parse().map_err(|_| {
            ApiError::bad_request(format!("server {:?} is not IP:PORT", req.server))
        })?;
        let v = self.resolve(volume)?;
        let id = v.id.clone();
        match caller {
            Caller::Admin(_) => {}
            Caller::Node(n) if v.attachments.iter().any(|a| &a.node == n) => {}
            Caller::Node(n) => {
                return Err(ApiError::forbidden(format!(
                    "node {n} holds no attachment of volume {id}; only a node the volume is attached to (or an admin) may report its primary unreachable"
                )))
            }
            Caller::Storage(s) => {
                return Err(ApiError::forbidden(format!(
                    "storage server {s} may not report a primary unreachable; nodes with an attachment of the volume do"
                )))
            }
        }
        Self::ready(&v)?;
        let slot = {
            let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
            probes.entry(id.clone()).or_default().clone()
        };
        let mut last = slot.lock().await;
        // The record as it is now (a report waiting for another's probe sees its outcome).
        let v = self.resolve(&id)?;
        let addrs = self.server_addresses()?;
        let answer = |v: &VolumeRecord, outcome: &str| keel_api::PrimaryReport {
            outcome: outcome.into(),
            epoch: v.epoch,
            primary: v
                .primary()
                .and_then(|p| addrs.get(&p.server))
                .map(|a| a.to_string()),
        };
        let Some(primary) = v
            .primary()
            .map(|p| p.server.clone())
            .filter(|p| addrs.get(p) == Some(&reported))
        else {
            tracing::info!(volume = %id, server = %req.server, epoch = req.epoch, "primary reported unreachable, but it is no longer the primary");
            return Ok(answer(&v, "already_moved"));
        };
        let reuse = last.as_ref().and_then(|l| {
            l.reusable(
                &primary,
                self.cfg.report_interval,
                Duration::from_millis(req.unanswered_ms),
            )
        });
        let answered = match reuse {
            Some(answered) => answered,
            None => {
                let answered = self
                    .push
                    .ping(reported, &id, self.cfg.probe_timeout)
                    .await
                    .inspect_err(|e| {
                        tracing::warn!(volume = %id, server = %primary, error = %e, "probe of a reported primary failed")
                    })
                    .is_ok();
                *last = Some(LastProbe {
                    server: primary.clone(),
                    at: Instant::now(),
                    answered,
                });
                answered
            }
        };
        if answered {
            tracing::info!(volume = %id, server = %primary, unanswered_ms = req.unanswered_ms, epoch = v.epoch, "primary reported unreachable, but it answers the controller: nothing changes");
            return Ok(answer(&v, "primary_answers"));
        }
        let mut promoted = None;
        let mut moved = false;
        let rec = self.update_volume(&id, |r| {
            promoted = None;
            moved = r.primary().map(|p| p.server.as_str()) != Some(primary.as_str());
            if moved {
                return Ok(false);
            }
            let id = r.id.clone();
            promoted =
                membership::promote(r, |s| s != primary && self.copy_reported_healthy(&id, s)).ok();
            Ok(promoted.is_some())
        })?;
        if moved {
            return Ok(answer(&rec, "already_moved"));
        }
        let Some(Promotion { old, new }) = promoted else {
            tracing::warn!(volume = %id, server = %primary, epoch = rec.epoch, "primary unreachable and no in-sync mirror is up: nothing to promote");
            return Ok(answer(&rec, "no_in_sync_mirror"));
        };
        tracing::warn!(volume = %id, %old, %new, epoch = rec.epoch, unanswered_ms = req.unanswered_ms, "primary reported unreachable and unanswered to the controller's probe: mirror promoted");
        self.note_dropped(&id, &old);
        if !self.push_membership_except(&rec, false, Some(&old)).await {
            tracing::warn!(volume = %id, %new, epoch = rec.epoch, "the promoted primary did not take its membership yet; the reconciler retries");
        }
        Ok(answer(&rec, "promoted"))
    }

    fn note_dropped(&self, volume: &str, server: &str) {
        self.live()
            .dropped
            .insert((volume.to_string(), server.to_string()), Instant::now());
    }

    /// A server may hold a rebuilt copy of `volume`: it is up and, if its copy was dropped
    /// while this controller ran, it has heartbeated since.
    fn rebuild_target(&self, volume: &str, server: &str) -> bool {
        let live = self.live();
        let Some(l) = live.servers.get(server) else {
            return false;
        };
        let up = l.last_seen.elapsed() < self.cfg.failure_timeout;
        // A lost copy is deleted before anything is rebuilt there (R10).
        let faulty =
            l.hb.copies
                .iter()
                .any(|r| r.volume == volume && r.fault.is_some());
        if faulty {
            return false;
        }
        let after_drop = live
            .dropped
            .get(&(volume.to_string(), server.to_string()))
            .is_none_or(|t| l.last_seen > *t);
        up && after_drop
    }

    /// Creates, at the volume's epoch, the copies the record places on live servers that do not
    /// report them (a re-placed mirror's new home; the rebuild then fills it).
    async fn create_missing_copies(&self, v: &VolumeRecord, addrs: &HashMap<String, SocketAddr>) {
        for c in v
            .copies
            .iter()
            .filter(|c| c.role == CopyRole::Mirror && !c.in_sync)
        {
            // `None`: nothing to do; `Some(None)`: the server holds no copy; `Some(Some(why))`:
            // it holds a lost one (R10), which is deleted first (a stale mirror's only that:
            // its rebuild then starts on a server without the copy, and creates it).
            let missing = {
                let live = self.live();
                live.servers
                    .get(&c.server)
                    .filter(|l| l.last_seen.elapsed() < self.cfg.failure_timeout)
                    .and_then(|l| match l.hb.copies.iter().find(|r| r.volume == v.id) {
                        None => Some(None),
                        Some(r) => r.fault.clone().map(Some),
                    })
            };
            let Some(fault) = missing else {
                continue;
            };
            if fault.is_none() && !c.rebuilding {
                continue;
            }
            let Some(addr) = addrs.get(&c.server) else {
                continue;
            };
            if let Some(why) = fault {
                // A lost copy (R10) is replaced by a new one: the rebuild fills it. Never while
                // the primary is not known sound (the lost copy may be all that is left: R9),
                // and only while the record, as it is now, keeps this mirror out of the in-sync
                // set.
                if !self.primary_reported_healthy(v) {
                    continue;
                }
                let out_of_sync = self.resolve(&v.id).ok().is_some_and(|r| {
                    r.copies
                        .iter()
                        .any(|x| x.server == c.server && x.role == CopyRole::Mirror && !x.in_sync)
                });
                if !out_of_sync {
                    continue;
                }
                match self.push.delete_copy(*addr, &v.id).await {
                    Ok(()) => {
                        tracing::info!(volume = %v.id, server = %c.server, fault = %why, "deleted a lost copy, to be created again and rebuilt");
                        let mut live = self.live();
                        if let Some(l) = live.servers.get_mut(&c.server) {
                            l.hb.copies.retain(|r| r.volume != v.id);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v.id, server = %c.server, error = %e, fault = %why, "deleting a lost copy failed; retrying");
                        continue;
                    }
                }
                if !c.rebuilding {
                    continue;
                }
            }
            // Created at the writer epoch W (a copy's writer epoch starts at its creation epoch
            // and never goes down); the membership push that follows raises its epoch to E with
            // W unchanged, so the current writer is not fenced by its new copy.
            let w = v.writer_floor();
            match self.push.create_copy(*addr, &v.id, v.size, c.role, w).await {
                Ok(()) => self.note_copy(&c.server, &v.id, v.size, w, c.role, empty_access()),
                Err(e) => {
                    tracing::warn!(volume = %v.id, server = %c.server, error = %e, "creating the re-placed copy failed; retrying")
                }
            }
        }
    }

    /// Deletes copies live servers report for ready volumes whose record does not place a
    /// copy there any more (a mirror re-placed while its server was away).
    async fn delete_orphans(&self, vols: &[VolumeRecord], addrs: &HashMap<String, SocketAddr>) {
        let reported: Vec<(String, String)> = {
            let live = self.live();
            live.servers
                .iter()
                .filter(|(_, l)| l.last_seen.elapsed() < self.cfg.failure_timeout)
                .flat_map(|(s, l)| {
                    l.hb.copies
                        .iter()
                        .map(move |r| (s.clone(), r.volume.clone()))
                })
                .collect()
        };
        for (server, volume) in reported {
            let Some(v) = vols.iter().find(|v| v.id == volume) else {
                continue;
            };
            if v.state != VolumeRecordState::Ready || v.copies.iter().any(|c| c.server == server) {
                continue;
            }
            let Some(addr) = addrs.get(&server) else {
                continue;
            };
            match self.push.delete_copy(*addr, &volume).await {
                Ok(()) => {
                    tracing::info!(volume = %volume, server = %server, "deleted a copy the volume no longer places there");
                    let mut live = self.live();
                    if let Some(l) = live.servers.get_mut(&server) {
                        l.hb.copies.retain(|r| r.volume != volume);
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = %volume, server = %server, error = %e, "deleting an orphan copy failed")
                }
            }
        }
    }

    /// R7: a stale mirror whose server is up, on a volume whose primary is up, starts being
    /// rebuilt (one membership change; the primary does the copying).
    fn start_rebuild_if_possible(
        &self,
        v: &VolumeRecord,
    ) -> Result<Option<VolumeRecord>, ApiError> {
        let wanted = v
            .primary()
            .is_some_and(|p| self.copy_usable(&v.id, &p.server))
            && v.copies.iter().any(|c| {
                c.role == CopyRole::Mirror
                    && !c.in_sync
                    && !c.rebuilding
                    && self.rebuild_target(&v.id, &c.server)
            });
        if !wanted {
            return Ok(None);
        }
        let mut started = None;
        let rec = self.update_volume(&v.id, |r| {
            let id = r.id.clone();
            started = membership::start_rebuild(
                r,
                |s| self.copy_usable(&id, s),
                |s| self.rebuild_target(&id, s),
            )
            .ok();
            Ok(started.is_some())
        })?;
        Ok(started.map(|m| {
            tracing::info!(volume = %rec.id, mirror = %m, epoch = rec.epoch, "rebuilding a stale mirror");
            rec
        }))
    }

    pub async fn attach(
        &self,
        id_or_name: &str,
        req: AttachVolume,
    ) -> Result<VolumeInfo, ApiError> {
        check_name("node", &req.node)?;
        check_name("instance", &req.instance)?;
        let (node, _) = self
            .load::<NodeRecord>(&node_key(&req.node))?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "node {} not found; `keelctl node list` shows the registered nodes",
                    req.node
                ))
            })?;
        let v = self.resolve(id_or_name)?;
        let id = v.id.clone();
        let mode = if req.read_only {
            Mode::ReadOnly
        } else {
            Mode::ReadWrite
        };
        let socket = format!(
            "{}/{}-{}.sock",
            node.socket_dir.trim_end_matches('/'),
            req.instance,
            id
        );
        let mut bumped = false;
        let mut fenced: Option<AttachmentRecord> = None;
        let v = self.update_volume(&id, |v| {
            bumped = false;
            fenced = None;
            Self::ready(v)?;
            let a = AttachmentRecord {
                node: req.node.clone(),
                instance: req.instance.clone(),
                mode,
                socket: socket.clone(),
                attached_at_unix: now_unix(),
            };
            match membership::attach(v, a, req.force)? {
                Change::Unchanged => Ok(false),
                Change::Changed(x) => {
                    bumped = x.bumped;
                    fenced = x.fenced;
                    Ok(true)
                }
            }
        })?;
        if bumped {
            self.push_access_change(&v).await;
        }
        if let Some(w) = fenced {
            tracing::warn!(volume = %id, old_node = %w.node, old_instance = %w.instance, epoch = v.epoch, "forced takeover: old writer fenced");
        }
        tracing::info!(volume = %id, node = %req.node, instance = %req.instance, mode = mode.as_str(), epoch = v.epoch, "attached");
        self.volume_info(&v)
    }

    pub async fn detach(
        &self,
        id_or_name: &str,
        req: DetachVolume,
    ) -> Result<VolumeInfo, ApiError> {
        let v = self.resolve(id_or_name)?;
        let id = v.id.clone();
        let connected = self.guest_connected(&req.node, &id, &req.instance);
        let mut bumped = false;
        let v = self.update_volume(&id, |v| {
            bumped = false;
            let a = membership::find_attachment(v, &req.node, &req.instance)?;
            match connected {
                _ if req.force => {}
                Some(true) => {
                    return Err(ApiError::conflict(format!(
                        "a guest is still connected to volume {} on node {} (instance {}); shut the VM down or detach with --force (its I/O then fails)",
                        v.id, req.node, req.instance
                    )))
                }
                Some(false) => {}
                None => {
                    return Err(ApiError::unavailable(format!(
                        "node {} has not reported whether a guest is connected to volume {} (instance {}) since the controller started; retry in a few seconds, or detach with --force (a connected guest's I/O then fails)",
                        req.node, v.id, req.instance
                    )))
                }
            }
            bumped = membership::detach(v, &a, req.force);
            Ok(true)
        })?;
        if bumped {
            self.push_access_change(&v).await;
        }
        tracing::info!(volume = %id, node = %req.node, instance = %req.instance, force = req.force, "detached");
        self.volume_info(&v)
    }

    /// A mirror whose server is down for longer than the failure timeout is re-placed on
    /// another server (up, room for the volume, not holding a copy of it; preferring a zone the
    /// volume does not use): the copy entry moves there as `rebuilding` at a new epoch and the
    /// primary fills it (R7). The old server's copy, if it ever returns, is deleted.
    fn replace_lost_mirror(&self, v: &VolumeRecord) -> Result<Option<VolumeRecord>, ApiError> {
        if self.started.elapsed() < self.cfg.failure_timeout {
            return Ok(None);
        }
        // The primary must be known sound: the mirror's old copy is deleted once it moves.
        if !self.primary_reported_healthy(v) {
            return Ok(None);
        }
        if !v
            .copies
            .iter()
            .any(|c| c.role == CopyRole::Mirror && !self.copy_usable(&v.id, &c.server))
        {
            return Ok(None);
        }
        let servers: HashMap<String, ServerRecord> = self
            .list::<ServerRecord>(SERVER_PREFIX)?
            .into_iter()
            .map(|(s, _)| (s.id.clone(), s))
            .collect();
        // Placement and the move commit in one transaction with the target's reservation
        // fence, so a concurrent create cannot count the same free space.
        let mut moved = None;
        let mut target = String::new();
        let (rec, _) = self.update_volume_reserving(&v.id, |r, alloc| {
            moved = None;
            let candidates: Vec<Candidate> = servers
                .values()
                .filter(|s| !r.copies.iter().any(|c| c.server == s.id))
                .map(|s| Candidate {
                    up: self.server_up(&s.id),
                    allocated_bytes: alloc.get(&s.id).map(|a| a.0).unwrap_or(0),
                    id: s.id.clone(),
                    zone: s.zone.clone(),
                    capacity_bytes: s.capacity_bytes,
                })
                .collect();
            let used_zones: Vec<String> = r
                .copies
                .iter()
                .filter(|c| self.server_up(&c.server))
                .filter_map(|c| servers.get(&c.server).map(|s| s.zone.clone()))
                .collect();
            // Prefer a zone the surviving copies do not use, else any server with room.
            let fresh: Vec<Candidate> = candidates
                .iter()
                .filter(|c| !used_zones.contains(&c.zone))
                .cloned()
                .collect();
            let Ok(chosen) = place(&fresh, r.size, 1).or_else(|_| place(&candidates, r.size, 1))
            else {
                return Ok(None);
            };
            let Some(t) = chosen.into_iter().next() else {
                return Ok(None);
            };
            let id = r.id.clone();
            moved = membership::replace_lost_mirror(r, |s| self.copy_usable(&id, s), &t).ok();
            target = t.clone();
            Ok(moved.is_some().then(|| vec![t]))
        })?;
        Ok(moved.map(|old| {
            tracing::warn!(volume = %rec.id, from = %old, to = %target, epoch = rec.epoch, "mirror's server or copy lost: copy re-placed, rebuilding");
            rec
        }))
    }

    /// R10: in-sync mirrors whose copies are lost on live servers leave the in-sync set
    /// (stale; E bumps), to be re-placed or rebuilt like any stale mirror.
    fn drop_lost_mirrors(&self, v: &VolumeRecord) -> Result<Option<VolumeRecord>, ApiError> {
        // Without a sound primary the in-sync set is left as it is (R9): a lost mirror may be
        // all that is left of the data.
        if !self.primary_reported_healthy(v) {
            return Ok(None);
        }
        let lost: Vec<(String, String)> = v
            .copies
            .iter()
            .filter(|c| c.role == CopyRole::Mirror && c.in_sync)
            .filter_map(|c| Some((c.server.clone(), self.copy_lost(&v.id, &c.server)?)))
            .collect();
        if lost.is_empty() {
            return Ok(None);
        }
        let mut dropped = Vec::new();
        let rec = self.update_volume(&v.id, |r| {
            dropped = membership::drop_lost(r, |s| lost.iter().any(|(l, _)| l == s));
            Ok(!dropped.is_empty())
        })?;
        if dropped.is_empty() {
            return Ok(None);
        }
        for (server, why) in lost.iter().filter(|(s, _)| dropped.contains(s)) {
            tracing::warn!(volume = %rec.id, %server, fault = %why, epoch = rec.epoch, "mirror's copy lost on a live server: dropped from the in-sync set");
            self.note_dropped(&rec.id, server);
        }
        Ok(Some(rec))
    }

    /// R6 (docs/replication.md): when the controller itself has not heard from a volume's
    /// primary server for the failure timeout, and an in-sync mirror's server is up, that
    /// mirror becomes the primary at a new epoch; the old primary becomes a stale mirror (it
    /// can never acknowledge again: its in-sync set holds the new primary, which refuses its
    /// epoch). Never within one failure timeout of this controller's start (it has not heard
    /// everyone yet), and never from a node's report alone.
    fn promote_if_primary_failed(
        &self,
        v: &VolumeRecord,
    ) -> Result<Option<VolumeRecord>, ApiError> {
        let Some(p) = v.primary() else {
            return Ok(None);
        };
        // A copy reported lost is evidence enough; a server's silence is not, until this
        // controller has had one failure timeout to hear from everyone.
        let lost = self.copy_lost(&v.id, &p.server);
        if lost.is_none() && self.started.elapsed() < self.cfg.failure_timeout {
            return Ok(None);
        }
        if self.server_up(&p.server) && lost.is_none() {
            return Ok(None);
        }
        let mut promoted = None;
        let id = v.id.clone();
        let rec = self.update_volume(&v.id, |r| {
            // The primary is judged by its failure (down, or lost); a mirror is promoted only on
            // positive evidence that its copy is there (R10).
            let primary = r.primary().map(|p| p.server.clone());
            promoted = membership::promote(r, |s| {
                if primary.as_deref() == Some(s) {
                    self.copy_usable(&id, s)
                } else {
                    self.copy_reported_healthy(&id, s)
                }
            })
            .ok();
            Ok(promoted.is_some())
        })?;
        Ok(promoted.map(|Promotion { old, new }| {
            match &lost {
                Some(why) => {
                    tracing::warn!(volume = %rec.id, %old, %new, epoch = rec.epoch, fault = %why, "primary's copy lost on a live server: mirror promoted")
                }
                None => {
                    tracing::warn!(volume = %rec.id, %old, %new, epoch = rec.epoch, "primary's server failed: mirror promoted")
                }
            }
            self.note_dropped(&rec.id, &old);
            rec
        }))
    }

    // ----- reconciler -----

    /// Pushes recorded state the servers do not report yet; finishes interrupted creates and
    /// deletes. Runs forever.
    pub async fn reconcile_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.cfg.reconcile_interval).await;
            if let Err(e) = self.reconcile_once().await {
                tracing::warn!(error = %e, "reconcile pass failed");
            }
        }
    }

    pub async fn reconcile_once(&self) -> Result<(), ApiError> {
        let addrs = self.server_addresses()?;
        let vols: Vec<VolumeRecord> = self
            .list::<VolumeRecord>(VOLUME_PREFIX)?
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        if self.started.elapsed() >= self.cfg.failure_timeout {
            self.delete_orphans(&vols, &addrs).await;
        }
        self.live()
            .missing
            .retain(|(volume, _), _| vols.iter().any(|v| &v.id == volume));
        for v in vols {
            match v.state {
                VolumeRecordState::Deleting => {
                    self.finish_delete(&v).await?;
                }
                VolumeRecordState::Creating => {
                    // A create the controller did not finish (it crashed mid-way): the copies
                    // are empty, so finishing it is safe and idempotent.
                    if now_unix().saturating_sub(v.created_at_unix) < 30 {
                        continue;
                    }
                    let mut ok = true;
                    for c in &v.copies {
                        match addrs.get(&c.server) {
                            Some(a) => {
                                ok &= self
                                    .push
                                    .create_copy(*a, &v.id, v.size, c.role, v.epoch)
                                    .await
                                    .is_ok()
                            }
                            None => ok = false,
                        }
                    }
                    if ok {
                        self.update_volume(&v.id, |r| {
                            if r.state != VolumeRecordState::Creating {
                                return Ok(false);
                            }
                            r.state = VolumeRecordState::Ready;
                            Ok(true)
                        })?;
                    }
                }
                VolumeRecordState::Ready => {
                    self.note_missing(&v);
                    if let Some(v) = self.promote_if_primary_failed(&v)? {
                        let _ = self.push_membership(&v, false).await;
                        continue;
                    }
                    if let Some(v) = self.drop_lost_mirrors(&v)? {
                        let _ = self.push_membership(&v, false).await;
                        continue;
                    }
                    if let Some(v) = self.replace_lost_mirror(&v)? {
                        self.create_missing_copies(&v, &addrs).await;
                        let _ = self.push_membership(&v, false).await;
                        continue;
                    }
                    if let Some(v) = self.start_rebuild_if_possible(&v)? {
                        let _ = self.push_membership(&v, false).await;
                        continue;
                    }
                    self.create_missing_copies(&v, &addrs).await;
                    // Any copy (on a live server) behind the record: push the whole membership
                    // again, in order (R2); the pushes are idempotent.
                    let (mut small, mut stale) = (false, false);
                    let digest = membership::access_digest(&v);
                    for c in &v.copies {
                        let live = self.live();
                        let Some(l) = live.servers.get(&c.server) else {
                            continue;
                        };
                        if l.last_seen.elapsed() >= self.cfg.failure_timeout {
                            continue;
                        }
                        // A lost copy takes no membership (R10): it is replaced.
                        let report =
                            l.hb.copies
                                .iter()
                                .find(|r| r.volume == v.id && r.fault.is_none());
                        if let Some(r) = report {
                            small |= r.size < v.size;
                            stale |= r.epoch < v.epoch || r.role != c.role.as_str();
                            // An access list that differs from the record's (a server upgraded
                            // from before access lists, a copy created after the last push, a
                            // lost push at the same epoch): push again (docs/security.md).
                            stale |= r.access_crc32c.is_some_and(|a| a != digest);
                        }
                    }
                    if small || stale {
                        let _ = self.push_membership(&v, small).await;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn legacy_volume(id: &str, name: &str) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            name: Some(name.into()),
            size: 1 << 20,
            replicas: 1,
            block_size: 4096,
            state: VolumeRecordState::Ready,
            epoch: 1,
            writer_epoch: 1,
            copies: vec![],
            attachments: vec![],
            created_at_unix: 1,
        }
    }

    /// Volumes written before the name index: their names get `name/` keys at start; a name
    /// several share resolves to none (409 listing them) until one is left; an old id-shaped
    /// name never shadows an id.
    #[test]
    fn names_of_volumes_older_than_the_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            Arc::new(crate::store::RedbStore::open(&dir.path().join("meta.redb")).expect("store"));
        let (a, b, c, d) = (
            "8000000000000001",
            "8000000000000002",
            "8000000000000003",
            "8000000000000004",
        );
        for v in [
            legacy_volume(a, "alpha"),
            legacy_volume(b, "dup"),
            legacy_volume(c, "dup"),
            legacy_volume(d, "8000000000000001"),
        ] {
            store
                .put(&volume_key(&v.id), &serde_json::to_vec(&v).expect("json"))
                .expect("put");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let ctl = Controller::new(
            store.clone(),
            Pusher::new(Arc::new(tls), Duration::from_millis(100)),
            Config::default(),
        );
        let key = |n: &str| {
            store
                .get(&name_key(n))
                .expect("get")
                .map(|v| serde_json::from_slice::<String>(&v.value).expect("json"))
        };
        assert_eq!(key("alpha").as_deref(), Some(a));
        assert_eq!(key("dup").as_deref(), Some(""), "a shared name is marked");
        assert_eq!(ctl.resolve("alpha").expect("alpha").id, a);
        let e = ctl.resolve("dup").expect_err("ambiguous");
        assert_eq!(e.code, "conflict");
        assert!(
            e.message.contains(b) && e.message.contains(c),
            "{}",
            e.message
        );
        // The id-shaped old name: its argument is the id of volume a, never volume d.
        assert_eq!(ctl.resolve("8000000000000001").expect("id").id, a);
        assert_eq!(ctl.resolve(d).expect("id").id, d);
        // One of the two goes: the other answers to the name, and the next start indexes it.
        ctl.remove_volume(b, |_| true).expect("remove");
        assert_eq!(ctl.resolve("dup").expect("one left").id, c);
        ctl.index_names().expect("index");
        assert_eq!(key("dup").as_deref(), Some(c));
        // Deleting a volume deletes its name key with it.
        ctl.remove_volume(c, |_| true).expect("remove");
        assert_eq!(key("dup"), None);
        assert_eq!(ctl.resolve("dup").expect_err("gone").code, "not_found");
        assert!(store.get(&volume_key(c)).expect("get").is_none());
    }

    fn candidate(id: &str, capacity: u64, allocated: u64) -> Candidate {
        Candidate {
            id: id.into(),
            zone: id.into(),
            capacity_bytes: capacity,
            allocated_bytes: allocated,
            up: true,
        }
    }

    /// Issue 17: advice that can work. `--replicas 1` is offered only where one copy fits, and
    /// the largest size that fits now is given in human units.
    #[test]
    fn placement_advice_names_what_fits() {
        const GB: u64 = 1_000_000_000;
        let c = [candidate("a", 68 * GB, 0), candidate("b", 12 * GB, 2 * GB)];
        let advise = |size: u64, copies: usize, defaulted: bool| {
            let e = place(&c, size, copies).expect_err("does not fit");
            placement_advice(&e, &c, copies, defaulted)
        };
        let tib = advise(1 << 40, 2, true);
        assert!(tib.contains("2 copies of 1 TiB"), "{tib}");
        assert!(tib.contains("a: up, 63.3 GiB free"), "{tib}");
        assert!(
            tib.contains("the largest volume with 2 copies that fits now is 9.3 GiB"),
            "{tib}"
        );
        assert!(!tib.contains("--replicas"), "one copy cannot help: {tib}");
        let fifty = advise(50 * GB, 2, true);
        assert!(fifty.contains("--replicas 1 would fit"), "{fifty}");
        assert!(
            fifty.contains("unless --replicas says otherwise"),
            "{fifty}"
        );
        let asked = advise(50 * GB, 2, false);
        assert!(asked.contains("--replicas 1 would fit"), "{asked}");
        assert!(!asked.contains("unless"), "{asked}");
        let none = place(&[], 1 << 30, 1).expect_err("nothing");
        let none = placement_advice(&none, &[], 1, true);
        assert!(none.contains("no volume with 1 copy fits now"), "{none}");
    }

    fn probe(server: &str, ago_ms: u64, answered: bool) -> LastProbe {
        LastProbe {
            server: server.into(),
            at: Instant::now()
                .checked_sub(Duration::from_millis(ago_ms))
                .expect("monotonic clock far enough from its origin"),
            answered,
        }
    }

    #[test]
    fn a_probe_is_reused_only_for_the_same_primary_within_the_interval() {
        let i = Duration::from_secs(1);
        let w = Duration::from_secs(1);
        assert_eq!(probe("s1", 100, true).reusable("s1", i, w), Some(true));
        assert_eq!(probe("s1", 100, false).reusable("s1", i, w), Some(false));
        assert_eq!(probe("s2", 100, true).reusable("s1", i, w), None);
        assert_eq!(probe("s1", 1500, true).reusable("s1", i, w), None);
        assert_eq!(probe("s1", 1500, false).reusable("s1", i, w), None);
    }

    #[test]
    fn a_successful_probe_older_than_the_nodes_wait_is_not_reused() {
        let i = Duration::from_secs(1);
        // The node has waited 300 ms; the primary answered 600 ms ago: it may have hung since.
        assert_eq!(
            probe("s1", 600, true).reusable("s1", i, Duration::from_millis(300)),
            None
        );
        // A failed probe is reused however long the node waited.
        assert_eq!(
            probe("s1", 600, false).reusable("s1", i, Duration::from_millis(300)),
            Some(false)
        );
    }
}
