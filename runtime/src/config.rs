//! One TOML file per node.
//!
//! ```toml
//! cluster_id = "demo"
//! node_id = 1
//! secret = "s3cret"          # or: secret_file = "/path" (exactly one of them)
//! [listen]
//! mesh = "127.0.0.1:7101"    # control-plane mesh
//! client = "127.0.0.1:6101"  # PostgreSQL wire protocol proxy
//! [postgres]
//! conninfo = "host=127.0.0.1 port=5501 user=postgres dbname=postgres"
//! [[nodes]]                  # every node of the cluster, this one included
//! id = 1
//! mesh = "127.0.0.1:7101"
//! [[nodes]]
//! id = 2
//! mesh = "127.0.0.1:7102"
//! [timeouts]                 # optional, milliseconds; defaults from mm_core::Config::new
//! heartbeat_interval_ms = 200
//! heartbeat_timeout_ms = 2000
//! [visibility]               # optional; see docs/protocol.md, "Visible everywhere"
//! wait_peer_commits = true   # COMMIT returns once every member shows it (default)
//! read_lease_ms = 1000       # reads stop on a node its peers have not vouched for within this
//! ```
//!
//! [`NodeConfig::load`] / [`NodeConfig::parse`] validate everything up front,
//! so a [`NodeConfig`] in hand is always usable: unknown keys, an impossible
//! cluster, a missing secret or a bad address are reported with the key and
//! value at fault.

use mm_core::{NodeId, Time};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Largest cluster `mm_core::Config::try_new` accepts (sizes `1..MAX_NODES`).
pub const MAX_CLUSTER_SIZE: usize = mm_core::ids::MAX_NODES - 1;

/// Every sequence steps by this on every node (node `i` hands out values
/// ≡ i mod it), as multimaster's `INCREMENT BY max_nodes`: a constant, so
/// adding or dropping a node never makes two nodes' values collide.
pub const SEQUENCE_STRIDE: usize = MAX_CLUSTER_SIZE;

/// Why a configuration file was rejected. Every message names the key or
/// value at fault.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax errors, unknown keys, missing keys, wrong types (from `toml`,
    /// whose message names the key and the line).
    #[error("invalid config: {0}")]
    Syntax(#[from] toml::de::Error),
    #[error("cluster_id must not be empty")]
    EmptyClusterId,
    #[error("the cluster has {count} [[nodes]]; mm supports 1 to {MAX_CLUSTER_SIZE}")]
    ClusterSize { count: usize },
    #[error("[[nodes]] lists id {id} more than once")]
    DuplicateNodeId { id: NodeId },
    #[error("[[nodes]] id {id} is outside 1..={MAX_CLUSTER_SIZE}")]
    NodeIdOutOfRange { id: NodeId },
    #[error("node_id = {node_id} is not among the [[nodes]] ids {ids:?}")]
    NodeIdNotListed { node_id: NodeId, ids: Vec<NodeId> },
    #[error("nodes {a} and {b} have the same mesh address {addr}")]
    DuplicateMeshAddress {
        a: NodeId,
        b: NodeId,
        addr: SocketAddr,
    },
    #[error("no secret: set exactly one of `secret` or `secret_file`")]
    MissingSecret,
    #[error("both `secret` and `secret_file` are set: set exactly one of them")]
    BothSecrets,
    #[error("`secret` is empty")]
    EmptySecret,
    #[error("secret_file {} is empty", path.display())]
    EmptySecretFile { path: PathBuf },
    #[error("cannot read secret_file {}: {source}", path.display())]
    SecretFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key} = {value:?} is not a socket address (expected ip:port, e.g. \"127.0.0.1:7101\"): {reason}")]
    BadAddress {
        key: String,
        value: String,
        reason: String,
    },
    #[error("timeouts.{key} must be greater than 0")]
    ZeroTimeout { key: &'static str },
    #[error("{key} must be greater than 0")]
    ZeroSetting { key: &'static str },
    #[error(
        "timeouts.heartbeat_timeout_ms ({timeout}) must be greater than \
         timeouts.heartbeat_interval_ms ({interval})"
    )]
    HeartbeatTimeout { interval: u64, timeout: u64 },
    #[error(
        "visibility.read_lease_ms ({lease}) must be greater than \
         timeouts.heartbeat_interval_ms ({interval}): peers renew the lease with heartbeats"
    )]
    ReadLease { interval: u64, lease: u64 },
    /// A mesh configuration built by hand is inconsistent.
    #[error("invalid mesh configuration: {0}")]
    Mesh(String),
}

/// A validated node configuration. `Debug` redacts the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub cluster_id: String,
    pub node_id: NodeId,
    /// The shared secret of the mesh handshake, from `secret` (UTF-8 bytes)
    /// or `secret_file` (file contents without trailing whitespace/newlines).
    pub secret: Vec<u8>,
    pub listen: ListenConfig,
    pub postgres: PostgresConfig,
    /// Every node of the cluster, this one included, by id (`1..=N`).
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    pub timeouts: Timeouts,
    pub data_plane: DataPlaneConfig,
    pub visibility: Visibility,
    /// Where the durable protocol state lives (`[state] dir`; default
    /// `mmd-state` beside the config file). Must outlive restarts, like
    /// the PostgreSQL data directory it belongs with.
    pub state_dir: PathBuf,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .field("secret", &"<redacted>")
            .field("listen", &self.listen)
            .field("postgres", &self.postgres)
            .field("nodes", &self.nodes)
            .field("timeouts", &self.timeouts)
            .field("data_plane", &self.data_plane)
            .field("visibility", &self.visibility)
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

impl std::fmt::Display for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cluster {:?}, node {} of {}, mesh {}, client {}",
            self.cluster_id,
            self.node_id,
            self.nodes.len(),
            self.listen.mesh,
            self.listen.client
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenConfig {
    /// Where this node's control-plane mesh listens.
    pub mesh: SocketAddr,
    /// Where this node's PostgreSQL wire protocol proxy listens.
    pub client: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresConfig {
    /// libpq-style connection string of the local PostgreSQL server.
    pub conninfo: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    pub id: NodeId,
    /// The node's mesh address as its peers dial it.
    pub mesh: SocketAddr,
    /// How peers reach this node's PostgreSQL for the data plane (a
    /// libpq-style conninfo; replication connections to `mm_slot_for_<peer>`).
    /// Optional for tools that only use the mesh; `mmd` needs it for every peer.
    pub postgres: Option<String>,
}

/// How remote transactions are applied here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataPlaneConfig {
    /// Applier sessions per peer, each bound to its own replication origin
    /// (`mm_node_<peer>_<k>`): PostgreSQL 15 lets one session hold an origin.
    pub appliers_per_peer: usize,
    /// `lock_timeout` of an applier: a remote transaction that waits longer
    /// for a row lock votes no (how crossing writes on two nodes end).
    pub lock_timeout_ms: u64,
    /// Sessions running `COMMIT PREPARED` / `ROLLBACK PREPARED`.
    pub finishers: usize,
    /// `logical_decoding_work_mem` of the peers' walsenders streaming to this
    /// node, set by its receivers (MB): a transaction larger than this is
    /// spilled to disk and read back while decoded. PostgreSQL's 64 MB spills
    /// a 1M-row COPY; 256 MB does not (docs/performance.md). The memory is
    /// only taken while a transaction that large is decoded, per peer.
    pub decoding_work_mem_mb: u64,
}

/// Also what `mmctl init`'s `max_replication_slots` check assumes by default.
pub const DEFAULT_APPLIERS_PER_PEER: usize = 4;

impl Default for DataPlaneConfig {
    fn default() -> DataPlaneConfig {
        DataPlaneConfig {
            appliers_per_peer: DEFAULT_APPLIERS_PER_PEER,
            lock_timeout_ms: 500,
            finishers: 4,
            decoding_work_mem_mb: 256,
        }
    }
}

/// The read-after-commit guarantee and what it costs (`[visibility]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Visibility {
    /// Sessions' default for `mm.wait_peer_commits`: `COMMIT` returns only
    /// once every online member shows the transaction. `false`: once the
    /// origin does (peers a few milliseconds later), one round trip less.
    pub wait_peer_commits: bool,
    /// See `mm_core::Config::read_lease`.
    pub read_lease_ms: u64,
}

impl Default for Visibility {
    fn default() -> Visibility {
        Visibility {
            wait_peer_commits: true,
            read_lease_ms: mm_core::Config::new(1, 1).read_lease.as_millis(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawVisibility {
    wait_peer_commits: Option<bool>,
    read_lease_ms: Option<u64>,
}

/// Protocol timeouts in milliseconds, defaults filled in from
/// `mm_core::Config::new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tick_interval_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub vote_timeout_ms: u64,
    pub resolve_after_ms: u64,
    pub retry_interval_ms: u64,
    pub catchup_timeout_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        let c = mm_core::Config::new(1, 1);
        Timeouts {
            tick_interval_ms: c.tick_interval.as_millis(),
            heartbeat_interval_ms: c.heartbeat_interval.as_millis(),
            heartbeat_timeout_ms: c.heartbeat_timeout.as_millis(),
            vote_timeout_ms: c.vote_timeout.as_millis(),
            resolve_after_ms: c.resolve_after.as_millis(),
            retry_interval_ms: c.retry_interval.as_millis(),
            catchup_timeout_ms: c.catchup_timeout.as_millis(),
        }
    }
}

// ---- the file as written ------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster_id: String,
    node_id: NodeId,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    listen: RawListen,
    postgres: RawPostgres,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    data_plane: RawDataPlane,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    visibility: RawVisibility,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDataPlane {
    appliers_per_peer: Option<usize>,
    lock_timeout_ms: Option<u64>,
    finishers: Option<usize>,
    decoding_work_mem_mb: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    mesh: String,
    client: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    conninfo: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: NodeId,
    mesh: String,
    postgres: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    tick_interval_ms: Option<u64>,
    heartbeat_interval_ms: Option<u64>,
    heartbeat_timeout_ms: Option<u64>,
    vote_timeout_ms: Option<u64>,
    resolve_after_ms: Option<u64>,
    retry_interval_ms: Option<u64>,
    catchup_timeout_ms: Option<u64>,
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .trim()
        .parse::<SocketAddr>()
        .map_err(|e| ConfigError::BadAddress {
            key: key.to_string(),
            value: value.to_string(),
            reason: e.to_string(),
        })
}

fn trim_trailing_whitespace(mut v: Vec<u8>) -> Vec<u8> {
    while v.last().is_some_and(|b| b.is_ascii_whitespace()) {
        v.pop();
    }
    v
}

impl NodeConfig {
    /// Reads and validates a config file. A relative `secret_file` is
    /// resolved against the config file's directory.
    pub fn load(path: impl AsRef<Path>) -> Result<NodeConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_in(&text, path.parent())
    }

    /// Parses and validates config text. A relative `secret_file` is
    /// resolved against the current directory.
    pub fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        Self::parse_in(text, None)
    }

    fn parse_in(text: &str, base: Option<&Path>) -> Result<NodeConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text)?;

        if raw.cluster_id.trim().is_empty() {
            return Err(ConfigError::EmptyClusterId);
        }

        // Cluster shape.
        let count = raw.nodes.len();
        if !(1..=MAX_CLUSTER_SIZE).contains(&count) {
            return Err(ConfigError::ClusterSize { count });
        }
        let mut nodes = BTreeMap::new();
        for n in &raw.nodes {
            let mesh = parse_addr(&format!("nodes[id = {}].mesh", n.id), &n.mesh)?;
            let entry = NodeEntry {
                id: n.id,
                mesh,
                postgres: n.postgres.clone(),
            };
            if nodes.insert(n.id, entry).is_some() {
                return Err(ConfigError::DuplicateNodeId { id: n.id });
            }
        }
        let ids: Vec<NodeId> = nodes.keys().copied().collect();
        // Gaps are fine: a dropped node's id is not reused.
        if let Some(&id) = ids
            .iter()
            .find(|&&id| id < 1 || id as usize > MAX_CLUSTER_SIZE)
        {
            return Err(ConfigError::NodeIdOutOfRange { id });
        }
        if !nodes.contains_key(&raw.node_id) {
            return Err(ConfigError::NodeIdNotListed {
                node_id: raw.node_id,
                ids,
            });
        }
        let mut seen: BTreeMap<SocketAddr, NodeId> = BTreeMap::new();
        for n in nodes.values() {
            if let Some(&a) = seen.get(&n.mesh) {
                return Err(ConfigError::DuplicateMeshAddress {
                    a,
                    b: n.id,
                    addr: n.mesh,
                });
            }
            seen.insert(n.mesh, n.id);
        }

        // Secret.
        let secret = match (raw.secret, raw.secret_file) {
            (None, None) => return Err(ConfigError::MissingSecret),
            (Some(_), Some(_)) => return Err(ConfigError::BothSecrets),
            (Some(s), None) => {
                if s.is_empty() {
                    return Err(ConfigError::EmptySecret);
                }
                s.into_bytes()
            }
            (None, Some(file)) => {
                let path = match base {
                    Some(b) if file.is_relative() => b.join(&file),
                    _ => file,
                };
                let bytes = std::fs::read(&path).map_err(|source| ConfigError::SecretFile {
                    path: path.clone(),
                    source,
                })?;
                let bytes = trim_trailing_whitespace(bytes);
                if bytes.is_empty() {
                    return Err(ConfigError::EmptySecretFile { path });
                }
                bytes
            }
        };

        // Addresses.
        let listen = ListenConfig {
            mesh: parse_addr("listen.mesh", &raw.listen.mesh)?,
            client: parse_addr("listen.client", &raw.listen.client)?,
        };

        // Timeouts.
        let d = Timeouts::default();
        let t = raw.timeouts;
        let timeouts = Timeouts {
            tick_interval_ms: t.tick_interval_ms.unwrap_or(d.tick_interval_ms),
            heartbeat_interval_ms: t.heartbeat_interval_ms.unwrap_or(d.heartbeat_interval_ms),
            heartbeat_timeout_ms: t.heartbeat_timeout_ms.unwrap_or(d.heartbeat_timeout_ms),
            vote_timeout_ms: t.vote_timeout_ms.unwrap_or(d.vote_timeout_ms),
            resolve_after_ms: t.resolve_after_ms.unwrap_or(d.resolve_after_ms),
            retry_interval_ms: t.retry_interval_ms.unwrap_or(d.retry_interval_ms),
            catchup_timeout_ms: t.catchup_timeout_ms.unwrap_or(d.catchup_timeout_ms),
        };
        for (key, v) in [
            ("tick_interval_ms", timeouts.tick_interval_ms),
            ("heartbeat_interval_ms", timeouts.heartbeat_interval_ms),
            ("heartbeat_timeout_ms", timeouts.heartbeat_timeout_ms),
            ("vote_timeout_ms", timeouts.vote_timeout_ms),
            ("resolve_after_ms", timeouts.resolve_after_ms),
            ("retry_interval_ms", timeouts.retry_interval_ms),
            ("catchup_timeout_ms", timeouts.catchup_timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::ZeroTimeout { key });
            }
        }
        if timeouts.heartbeat_timeout_ms <= timeouts.heartbeat_interval_ms {
            return Err(ConfigError::HeartbeatTimeout {
                interval: timeouts.heartbeat_interval_ms,
                timeout: timeouts.heartbeat_timeout_ms,
            });
        }

        let dv = Visibility::default();
        let visibility = Visibility {
            wait_peer_commits: raw
                .visibility
                .wait_peer_commits
                .unwrap_or(dv.wait_peer_commits),
            read_lease_ms: raw.visibility.read_lease_ms.unwrap_or(dv.read_lease_ms),
        };
        if visibility.read_lease_ms <= timeouts.heartbeat_interval_ms {
            return Err(ConfigError::ReadLease {
                interval: timeouts.heartbeat_interval_ms,
                lease: visibility.read_lease_ms,
            });
        }

        let dd = DataPlaneConfig::default();
        let data_plane = DataPlaneConfig {
            appliers_per_peer: raw
                .data_plane
                .appliers_per_peer
                .unwrap_or(dd.appliers_per_peer),
            lock_timeout_ms: raw.data_plane.lock_timeout_ms.unwrap_or(dd.lock_timeout_ms),
            finishers: raw.data_plane.finishers.unwrap_or(dd.finishers),
            decoding_work_mem_mb: raw
                .data_plane
                .decoding_work_mem_mb
                .unwrap_or(dd.decoding_work_mem_mb),
        };
        for (key, v) in [
            (
                "data_plane.appliers_per_peer",
                data_plane.appliers_per_peer as u64,
            ),
            ("data_plane.lock_timeout_ms", data_plane.lock_timeout_ms),
            ("data_plane.finishers", data_plane.finishers as u64),
            (
                "data_plane.decoding_work_mem_mb",
                data_plane.decoding_work_mem_mb,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::ZeroSetting { key });
            }
        }

        let state_dir = raw.state.dir.unwrap_or_else(|| PathBuf::from("mmd-state"));
        let state_dir = match base {
            Some(b) if state_dir.is_relative() => b.join(state_dir),
            _ => state_dir,
        };

        Ok(NodeConfig {
            cluster_id: raw.cluster_id,
            node_id: raw.node_id,
            secret,
            listen,
            postgres: PostgresConfig {
                conninfo: raw.postgres.conninfo,
            },
            nodes,
            timeouts,
            data_plane,
            visibility,
            state_dir,
        })
    }

    /// The protocol core's settings: cluster size, this node's id and the
    /// timeouts. Cannot fail on a config from [`NodeConfig::load`] or
    /// [`NodeConfig::parse`] (panics only if the public fields were later
    /// set to an impossible cluster).
    pub fn to_core_config(&self) -> mm_core::Config {
        let mut ids = mm_core::NodeSet::EMPTY;
        for &id in self.nodes.keys() {
            ids.insert(id);
        }
        let mut c = mm_core::Config::try_with_nodes(self.node_id, ids)
            .unwrap_or_else(|e| panic!("NodeConfig was validated: {e}"));
        let t = &self.timeouts;
        c.tick_interval = Time::from_millis(t.tick_interval_ms);
        c.heartbeat_interval = Time::from_millis(t.heartbeat_interval_ms);
        c.heartbeat_timeout = Time::from_millis(t.heartbeat_timeout_ms);
        c.vote_timeout = Time::from_millis(t.vote_timeout_ms);
        c.resolve_after = Time::from_millis(t.resolve_after_ms);
        c.retry_interval = Time::from_millis(t.retry_interval_ms);
        c.catchup_timeout = Time::from_millis(t.catchup_timeout_ms);
        c.read_lease = Time::from_millis(self.visibility.read_lease_ms);
        c
    }

    /// The largest configured node id (ids may have gaps).
    pub fn largest_id(&self) -> NodeId {
        self.nodes
            .keys()
            .next_back()
            .copied()
            .unwrap_or(self.node_id)
    }

    /// Every other node's mesh address.
    pub fn peers(&self) -> BTreeMap<NodeId, SocketAddr> {
        self.nodes
            .values()
            .filter(|n| n.id != self.node_id)
            .map(|n| (n.id, n.mesh))
            .collect()
    }
}
