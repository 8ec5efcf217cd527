//! One client session: one backend session on the local PostgreSQL, the
//! client's messages relayed as they are, except where replication needs a
//! say:
//! - startup and authentication pass through (trust, MD5, SCRAM are
//!   PostgreSQL's business); the backend session gets
//!   `default_transaction_read_only = on`, so a statement run outside a
//!   transaction can read but never write behind replication's back;
//! - a statement that writes, outside a transaction, is wrapped in
//!   `BEGIN READ WRITE` … commit path (an implicit transaction);
//! - `BEGIN` gets `SET TRANSACTION READ WRITE` after it (unless READ ONLY);
//! - DDL is preceded by a transactional `mm.ddl` message carrying its text
//!   and the search_path, so peers run it in the same transaction;
//! - `COMMIT` of a transaction that wrote goes to the core: `PREPARE
//!   TRANSACTION gid` here when it says so, then `COMMIT` for the client when
//!   the cluster committed, SQLSTATE 40001 when it aborted;
//! - statements mm cannot replicate are refused with the reason.

use super::backend::connect_backend;
use super::classify::{self, Kind};
use super::frame::{build, error_summary, Frame, FrameReader, FrameWriter};
use super::ProxyContext;
use crate::pg::hub::SessionCmd;
use crate::pg::remote_tx::{DDL_PREFIX, TX_PREFIX};
use crate::pg::sql::quote_literal;
use bytes::{BufMut, BytesMut};
use mm_core::{ClientId, DbResult, Input, NodeStatus, Outcome};
use pgwire::messages::extendedquery::{Bind, Close, Execute, Parse};
use pgwire::messages::simplequery::Query;
use pgwire::messages::startup::Startup;
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
const PROTOCOL_3_0: i32 = 196608;

/// Did the open transaction write (has it an xid)?
const WROTE: &str = "SELECT pg_current_xact_id_if_assigned() IS NOT NULL";

/// SQLSTATEs the proxy uses.
const SERIALIZATION_FAILURE: &str = "40001";
const FEATURE_NOT_SUPPORTED: &str = "0A000";
const CANNOT_CONNECT_NOW: &str = "57P03";
const ADMIN_SHUTDOWN: &str = "57P01";
const PROTOCOL_VIOLATION: &str = "08P01";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client: {0}")]
    Client(io::Error),
    #[error("backend: {0}")]
    Backend(io::Error),
    #[error("backend closed the connection")]
    BackendClosed,
    #[error("protocol: {0}")]
    Protocol(String),
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// A statement handle's kind and text (for DDL messages).
#[derive(Clone, Debug)]
struct Stmt {
    kind: Kind,
    sql: Arc<str>,
}

/// The handle `name` names (unnamed: ""); one the proxy never saw parsed
/// counts as a write, the safe side.
fn handle(map: &BTreeMap<String, Stmt>, name: Option<String>) -> Stmt {
    map.get(&name.unwrap_or_default()).cloned().unwrap_or(Stmt {
        kind: Kind::Write,
        sql: "".into(),
    })
}

struct Session {
    id: ClientId,
    ctx: Arc<ProxyContext>,
    client_r: FrameReader<BoxRead>,
    client_w: FrameWriter<BoxWrite>,
    client_gone: bool,
    /// Whether what is being relayed came by the extended protocol: a COPY
    /// it started then ends with the client's Sync after CopyDone (the one
    /// sent before the data was ignored by the backend in copy mode).
    extended: bool,
    backend_r: FrameReader<BoxRead>,
    backend_w: FrameWriter<BoxWrite>,
    /// The backend's transaction status from its last ReadyForQuery.
    status: u8,
    /// Internal queries sent whose responses are still to be swallowed.
    pending_internal: usize,
    statements: BTreeMap<String, Stmt>,
    portals: BTreeMap<String, Stmt>,
    batch: Vec<Frame>,
    /// Executes of the batch being collected, with their index in `batch`.
    batch_execs: Vec<(usize, Stmt)>,
    /// The current transaction ran replicated DDL.
    had_ddl: bool,
    /// An ErrorResponse went to the client since this was last cleared.
    saw_error: bool,
    /// The CommandComplete of an implicit transaction's statement, until
    /// its commit is decided (see [`Session::relay_with`]).
    held_complete: Option<Frame>,
    /// An administrator's session (`-c mm.admin_bypass=on`): it stays open
    /// on a node that is not online, to look at it.
    bypass: bool,
    /// `mm.wait_peer_commits` of this session (the node's default until SET).
    wait_peers: bool,
}

/// How long a statement waits for a node that is online but not readable
/// (its peers' lease lapsed, or it holds a transaction prepared past the
/// lease that may be committed elsewhere) before its session ends: long
/// enough for a resolver and a generation change to settle it.
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(6);

/// Serve one client connection to the end.
pub async fn run(sock: TcpStream, ctx: Arc<ProxyContext>, id: ClientId) {
    let peer = sock.peer_addr().ok();
    let _ = sock.set_nodelay(true);
    let (r, w) = sock.into_split();
    let mut client_r: FrameReader<BoxRead> = FrameReader::new(Box::new(r));
    let mut client_w: FrameWriter<BoxWrite> = FrameWriter::new(Box::new(w));
    match startup(&mut client_r, &mut client_w, &ctx).await {
        Ok(Some((backend_r, backend_w, bypass))) => {
            let wait_peers = ctx.visibility.wait_peer_commits;
            let mut s = Session {
                id,
                ctx,
                client_r,
                client_w,
                client_gone: false,
                extended: false,
                backend_r,
                backend_w,
                status: b'I',
                pending_internal: 0,
                statements: BTreeMap::new(),
                portals: BTreeMap::new(),
                batch: Vec::new(),
                batch_execs: Vec::new(),
                had_ddl: false,
                saw_error: false,
                held_complete: None,
                bypass,
                wait_peers,
            };
            match s.serve().await {
                Ok(()) => tracing::debug!(?peer, "client session ended"),
                Err(e) => tracing::info!(?peer, "client session ended: {e}"),
            }
            s.client_w.shutdown().await;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::info!(?peer, "client startup failed: {e}");
            let msg = match &e {
                SessionError::Backend(_) | SessionError::BackendClosed => {
                    format!("mm: cannot reach the local PostgreSQL: {e}")
                }
                other => format!("mm: {other}"),
            };
            client_w.push(&fatal(PROTOCOL_VIOLATION, &msg));
            client_w.shutdown().await;
        }
    }
}

fn fatal(code: &str, msg: &str) -> Frame {
    build::fatal(code, msg)
}

/// SSL/GSS negotiation (refused: plain only), cancel requests (forwarded),
/// then the startup packet and authentication relayed to the backend.
async fn startup(
    client_r: &mut FrameReader<BoxRead>,
    client_w: &mut FrameWriter<BoxWrite>,
    ctx: &Arc<ProxyContext>,
) -> Result<Option<(FrameReader<BoxRead>, FrameWriter<BoxWrite>, bool)>, SessionError> {
    let packet = loop {
        let Some(p) = client_r
            .next_untagged()
            .await
            .map_err(SessionError::Client)?
        else {
            return Ok(None);
        };
        let code = i32::from_be_bytes([p[4], p[5], p[6], p[7]]);
        match code {
            SSL_REQUEST | GSSENC_REQUEST => {
                client_w.push_raw(b"N");
                client_w.flush().await.map_err(SessionError::Client)?;
            }
            CANCEL_REQUEST => {
                if let Ok(mut b) = connect_backend(&ctx.backend).await {
                    b.write_raw(&p).await.ok();
                }
                return Ok(None);
            }
            PROTOCOL_3_0 => break p,
            other => {
                return Err(SessionError::Protocol(format!(
                    "unsupported protocol version {}.{}",
                    other >> 16,
                    other & 0xffff
                )))
            }
        }
    };
    let mut buf = BytesMut::from(&packet[..]);
    let mut dctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
    dctx.awaiting_frontend_ssl = false;
    let mut st = Startup::decode(&mut buf, &dctx)
        .map_err(|e| SessionError::Protocol(format!("bad startup packet: {e}")))?
        .ok_or_else(|| SessionError::Protocol("short startup packet".into()))?;
    if st.parameters.contains_key("replication") {
        client_w.push(&fatal(
            FEATURE_NOT_SUPPORTED,
            "mm: replication connections go to PostgreSQL directly, not through mmd",
        ));
        client_w.shutdown().await;
        return Ok(None);
    }
    let status = ctx.status.borrow().status;
    let bypass = st
        .parameters
        .get("options")
        .is_some_and(|o| asks_for_bypass(o));
    if bypass {
        tracing::info!(
            status = status_name(status),
            user = st.parameters.get("user").map(String::as_str).unwrap_or(""),
            "admin bypass session"
        );
    }
    if status != NodeStatus::Online && !bypass {
        client_w.push(&fatal(
            CANNOT_CONNECT_NOW,
            &format!(
                "mm: node {} is not online (status: {}); connect to an online node",
                ctx.node_id,
                status_name(status)
            ),
        ));
        client_w.shutdown().await;
        return Ok(None);
    }
    let opts = st.parameters.entry("options".to_string()).or_default();
    if !opts.is_empty() {
        opts.push(' ');
    }
    opts.push_str("-c default_transaction_read_only=on");
    let mut out = BytesMut::new();
    st.encode(&mut out)
        .map_err(|e| SessionError::Protocol(e.to_string()))?;

    let backend = connect_backend(&ctx.backend)
        .await
        .map_err(SessionError::Backend)?;
    let (mut backend_r, mut backend_w) = backend.into_frames();
    backend_w.push_raw(&out);
    backend_w.flush().await.map_err(SessionError::Backend)?;
    loop {
        let f = backend_r
            .next()
            .await
            .map_err(SessionError::Backend)?
            .ok_or(SessionError::BackendClosed)?;
        client_w.push(&f);
        match f.tag {
            b'R' => {
                let code = f
                    .body()
                    .get(..4)
                    .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                // 0 ok, 2 Kerberos, 7-9 GSS/SSPI, 12 SASL final: nothing to answer.
                if matches!(code, Some(3) | Some(5) | Some(10) | Some(11)) {
                    client_w.flush().await.map_err(SessionError::Client)?;
                    let Some(answer) = client_r.next().await.map_err(SessionError::Client)? else {
                        return Ok(None);
                    };
                    backend_w.push(&answer);
                    backend_w.flush().await.map_err(SessionError::Backend)?;
                }
            }
            b'E' => {
                client_w.flush().await.ok();
                return Ok(None);
            }
            b'Z' => {
                client_w.flush().await.map_err(SessionError::Client)?;
                return Ok(Some((backend_r, backend_w, bypass)));
            }
            _ => {}
        }
    }
}

/// `-c mm.admin_bypass=on` (or `--mm.admin_bypass=on`) among the startup
/// options. The session then opens, and stays open, whatever the node's
/// status, so an administrator can look at a node that is cut off or
/// catching up. It can read what this node holds, which may be stale; its
/// writes still go through the cluster, so on a node that is not online
/// they are refused at COMMIT (57P03) and nothing diverges.
fn asks_for_bypass(options: &str) -> bool {
    let mut words = options.split_whitespace();
    while let Some(w) = words.next() {
        let setting = match w {
            "-c" => words.next().unwrap_or(""),
            w => w
                .strip_prefix("--")
                .or_else(|| w.strip_prefix("-c"))
                .unwrap_or(""),
        };
        if let Some((name, value)) = setting.split_once('=') {
            if name == "mm.admin_bypass" {
                return matches!(
                    value.to_ascii_lowercase().as_str(),
                    "on" | "true" | "1" | "yes"
                );
            }
        }
    }
    false
}

pub fn status_name(s: NodeStatus) -> &'static str {
    match s {
        NodeStatus::Online => "online",
        NodeStatus::Recovery => "recovery",
        NodeStatus::Catchup => "catchup",
        NodeStatus::Isolated => "isolated",
    }
}

fn decode<M: Message>(f: &Frame) -> Result<M, SessionError> {
    let mut b = BytesMut::from(&f.raw[..]);
    let mut ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
    ctx.awaiting_frontend_ssl = false;
    ctx.awaiting_frontend_startup = false;
    M::decode(&mut b, &ctx)
        .map_err(|e| SessionError::Protocol(format!("malformed {:?} message: {e}", f.tag as char)))?
        .ok_or_else(|| SessionError::Protocol(format!("short {:?} message", f.tag as char)))
}

fn query_frame(sql: &str) -> Frame {
    let mut b = Vec::with_capacity(sql.len() + 1);
    b.put_slice(sql.as_bytes());
    b.put_u8(0);
    Frame::new(b'Q', &b)
}

/// What an internal query returned.
#[derive(Default)]
struct Internal {
    error: Option<Frame>,
    /// First column of the first row, as text.
    value: Option<String>,
}

/// The reply to a COMMIT.
enum CommitReply {
    Committed,
    Error(Frame),
}

impl Session {
    async fn serve(&mut self) -> Result<(), SessionError> {
        loop {
            tokio::select! {
                biased;
                f = self.client_r.next() => {
                    match f {
                        Ok(Some(f)) => {
                            if !self.on_client(f).await? {
                                return Ok(());
                            }
                        }
                        Ok(None) => return Ok(()),
                        Err(e) => {
                            if e.kind() == io::ErrorKind::InvalidData {
                                self.client_w.push(&fatal(PROTOCOL_VIOLATION, &format!("mm: {e}")));
                                self.flush_client().await;
                            }
                            return Err(SessionError::Client(e));
                        }
                    }
                }
                f = self.backend_r.next() => {
                    // Between requests: notifications, parameter changes,
                    // responses to a Flush, or the backend going away.
                    let f = f.map_err(SessionError::Backend)?.ok_or(SessionError::BackendClosed)?;
                    if f.tag == b'Z' {
                        self.status = f.body().first().copied().unwrap_or(b'I');
                    }
                    self.client_w.push(&f);
                    self.flush_client().await;
                }
            }
        }
    }

    async fn flush_client(&mut self) {
        if !self.client_gone && self.client_w.flush().await.is_err() {
            self.client_gone = true;
        }
    }

    /// Track `SET/RESET mm.wait_peer_commits` (PostgreSQL keeps its own copy).
    fn note_setting(&mut self, sql: &str) {
        if let Some(v) = classify::wait_peer_commits_setting(sql) {
            self.wait_peers = v.unwrap_or(self.ctx.visibility.wait_peer_commits);
        }
    }

    /// Wait (at most [`READ_WAIT`]) until this node may serve reads again;
    /// the status then, `Isolated` standing for "still not readable".
    async fn wait_readable(&mut self) -> NodeStatus {
        let until = tokio::time::Instant::now() + READ_WAIT;
        let mut status = self.ctx.status.clone();
        loop {
            {
                let s = status.borrow_and_update();
                if s.status != NodeStatus::Online {
                    return s.status;
                }
                if s.readable_now() {
                    return NodeStatus::Online;
                }
            }
            let tick = tokio::time::sleep(std::time::Duration::from_millis(20));
            tokio::select! {
                _ = status.changed() => {}
                _ = tick => {}
                _ = tokio::time::sleep_until(until) => {
                    tracing::warn!(node = self.ctx.node_id, "not readable for {READ_WAIT:?}: session ends");
                    return NodeStatus::Isolated;
                }
            }
        }
    }

    /// Returns false when the client said goodbye.
    async fn on_client(&mut self, f: Frame) -> Result<bool, SessionError> {
        // A node that left `online` (cut off, or its generation moved on
        // without it) may lack committed transactions: its sessions end
        // rather than read or write a stale copy.
        if matches!(f.tag, b'Q' | b'H' | b'S') && !self.bypass {
            let (mut status, readable) = {
                let s = self.ctx.status.borrow();
                (s.status, s.readable_now())
            };
            if status == NodeStatus::Online && !readable {
                status = self.wait_readable().await;
            }
            if status != NodeStatus::Online {
                self.client_w.push(&fatal(
                    CANNOT_CONNECT_NOW,
                    &format!(
                        "mm: node {} is no longer online (status: {}); this session ends, \
                         connect to an online node",
                        self.ctx.node_id,
                        status_name(status)
                    ),
                ));
                self.flush_client().await;
                return Ok(false);
            }
        }
        match f.tag {
            b'Q' => {
                let q: Query = decode(&f)?;
                self.simple_query(f, q.query).await?;
            }
            b'P' => {
                let p: Parse = decode(&f)?;
                self.note_setting(&p.query);
                let kind = classify::classify(&p.query);
                let st = Stmt {
                    kind,
                    sql: p.query.into(),
                };
                self.statements.insert(p.name.unwrap_or_default(), st);
                self.batch.push(f);
            }
            b'B' => {
                let b: Bind = decode(&f)?;
                let st = handle(&self.statements, b.statement_name);
                self.portals.insert(b.portal_name.unwrap_or_default(), st);
                self.batch.push(f);
            }
            b'E' => {
                let e: Execute = decode(&f)?;
                let st = handle(&self.portals, e.name);
                self.batch_execs.push((self.batch.len(), st));
                self.batch.push(f);
            }
            b'C' => {
                let c: Close = decode(&f)?;
                let name = c.name.unwrap_or_default();
                if c.target_type == b'S' {
                    self.statements.remove(&name);
                } else {
                    self.portals.remove(&name);
                }
                self.batch.push(f);
            }
            b'D' => self.batch.push(f),
            b'H' => {
                self.batch.push(f);
                self.extended_batch(false).await?;
            }
            b'S' => {
                self.batch.push(f);
                self.extended_batch(true).await?;
            }
            b'X' => return Ok(false),
            b'd' | b'c' | b'f' => {
                // Copy data outside COPY: PostgreSQL ignores it (protocol says so).
                self.backend_w.push(&f);
                self.backend_w
                    .flush()
                    .await
                    .map_err(SessionError::Backend)?;
            }
            other => {
                self.client_w.push(&fatal(
                    PROTOCOL_VIOLATION,
                    &format!("mm: invalid frontend message type {:?}", other as char),
                ));
                self.flush_client().await;
                return Ok(false);
            }
        }
        Ok(true)
    }

    // ---- internal queries -------------------------------------------------

    /// Queue an internal query; its responses are swallowed before the next relay.
    fn send_internal(&mut self, sql: &str) {
        self.backend_w.push(&query_frame(sql));
        self.pending_internal += 1;
    }

    /// Read one internal query's responses up to its ReadyForQuery.
    async fn read_internal(&mut self) -> Result<Internal, SessionError> {
        let mut out = Internal::default();
        loop {
            let f = self
                .backend_r
                .next()
                .await
                .map_err(SessionError::Backend)?
                .ok_or(SessionError::BackendClosed)?;
            match f.tag {
                b'Z' => {
                    self.status = f.body().first().copied().unwrap_or(b'I');
                    self.pending_internal = self.pending_internal.saturating_sub(1);
                    return Ok(out);
                }
                b'E' => {
                    let (code, msg) = error_summary(f.body());
                    tracing::debug!(client = self.id.0, code, msg, "internal query failed");
                    out.error.get_or_insert(f);
                }
                b'D' if out.value.is_none() => out.value = first_column(f.body()),
                // Notifications and parameter changes belong to the client.
                b'A' | b'S' => self.client_w.push(&f),
                _ => {}
            }
        }
    }

    async fn swallow_pending(&mut self) -> Result<Option<Frame>, SessionError> {
        let mut first_error = None;
        while self.pending_internal > 0 {
            let r = self.read_internal().await?;
            if first_error.is_none() {
                first_error = r.error;
            }
        }
        Ok(first_error)
    }

    /// Run one internal query now.
    async fn internal(&mut self, sql: &str) -> Result<Internal, SessionError> {
        self.swallow_pending().await?;
        self.send_internal(sql);
        self.backend_w
            .flush()
            .await
            .map_err(SessionError::Backend)?;
        self.read_internal().await
    }

    /// Before forwarding statements: `BEGIN READ WRITE` if they need a
    /// transaction the client did not open, and a DDL message for each
    /// schema change that will run inside one.
    fn queue_preamble<'a>(&mut self, wrap: bool, ddl: impl Iterator<Item = &'a str>) {
        if wrap {
            self.send_internal("BEGIN READ WRITE");
            self.had_ddl = false;
        }
        if self.status == b'T' || wrap {
            for sql in ddl {
                self.send_ddl_message(sql);
                self.had_ddl = true;
            }
        }
    }

    fn push_commit_reply(&mut self, reply: CommitReply) {
        match reply {
            CommitReply::Committed => self.client_w.push(&build::command_complete("COMMIT")),
            CommitReply::Error(e) => {
                self.saw_error = true;
                self.client_w.push(&e);
            }
        }
    }

    fn send_ddl_message(&mut self, sql: &str) {
        let q = format!(
            "SELECT pg_logical_emit_message(true, {}, json_build_object('search_path', \
             current_setting('search_path'), 'sql', {})::text)",
            quote_literal(DDL_PREFIX),
            quote_literal(sql)
        );
        self.send_internal(&q);
    }

    // ---- relaying -----------------------------------------------------------

    /// Relay the backend's responses to what was forwarded, up to
    /// ReadyForQuery (held back if `hold`); returns its status.
    async fn relay(&mut self, hold: bool) -> Result<u8, SessionError> {
        self.relay_with(hold, false).await
    }

    /// As [`Self::relay`]; with `keep_complete` (the statements of an
    /// implicit transaction) the last CommandComplete is kept back in
    /// `held_complete`: PostgreSQL sends it only after the commit, and a
    /// client may take it as the end of the statement (tokio-postgres's
    /// `copy_in` does), so it must not arrive before the cluster committed.
    async fn relay_with(&mut self, hold: bool, keep_complete: bool) -> Result<u8, SessionError> {
        self.swallow_pending().await?;
        loop {
            let f = self
                .backend_r
                .next()
                .await
                .map_err(SessionError::Backend)?
                .ok_or(SessionError::BackendClosed)?;
            // Only a CommandComplete right before ReadyForQuery is the
            // transaction's last word; anything after an earlier one
            // (another statement's rows, an error) lets it go, in order.
            if !matches!(f.tag, b'C' | b'Z') {
                if let Some(earlier) = self.held_complete.take() {
                    self.client_w.push(&earlier);
                }
            }
            match f.tag {
                b'Z' => {
                    self.status = f.body().first().copied().unwrap_or(b'I');
                    if !hold {
                        self.client_w.push(&f);
                    }
                    self.flush_client().await;
                    return Ok(self.status);
                }
                b'G' => {
                    self.client_w.push(&f);
                    self.flush_client().await;
                    self.copy_in().await?;
                }
                b'E' => {
                    self.saw_error = true;
                    self.client_w.push(&f);
                }
                b'C' if keep_complete => {
                    if let Some(earlier) = self.held_complete.replace(f) {
                        self.client_w.push(&earlier);
                    }
                }
                _ => {
                    self.client_w.push(&f);
                    if f.raw.len() > 32 * 1024 {
                        self.flush_client().await;
                    }
                }
            }
        }
    }

    /// COPY FROM STDIN: the client's data to the backend until done or failed.
    async fn copy_in(&mut self) -> Result<(), SessionError> {
        loop {
            let Some(f) = self.client_r.next().await.map_err(SessionError::Client)? else {
                // Client gone mid-copy: fail the copy so the backend ends it.
                self.backend_w
                    .push(&Frame::new(b'f', b"client disconnected\0"));
                self.backend_w
                    .flush()
                    .await
                    .map_err(SessionError::Backend)?;
                self.client_gone = true;
                return Ok(());
            };
            let tag = f.tag;
            self.backend_w.push(&f);
            if matches!(tag, b'c' | b'f') {
                if self.extended {
                    self.copy_sync().await?;
                }
                self.backend_w
                    .flush()
                    .await
                    .map_err(SessionError::Backend)?;
                return Ok(());
            }
            if tag != b'd' {
                self.backend_w
                    .flush()
                    .await
                    .map_err(SessionError::Backend)?;
            }
        }
    }

    /// After an extended-protocol COPY's CopyDone or CopyFail the backend
    /// waits for a Sync before ReadyForQuery; clients (libpq, tokio-postgres)
    /// send it right behind. Forward what comes up to it.
    async fn copy_sync(&mut self) -> Result<(), SessionError> {
        loop {
            let Some(f) = self.client_r.next().await.map_err(SessionError::Client)? else {
                self.client_gone = true;
                self.backend_w.push(&Frame::new(b'S', &[]));
                return Ok(());
            };
            let tag = f.tag;
            self.backend_w.push(&f);
            if tag == b'S' {
                return Ok(());
            }
        }
    }

    // ---- simple query protocol ---------------------------------------------

    async fn simple_query(&mut self, f: Frame, sql: String) -> Result<(), SessionError> {
        self.extended = false;
        let stmts = classify::statements(&sql);
        for (text, _) in &stmts {
            self.note_setting(text);
        }
        if let Some(reason) = stmts.iter().find_map(|(_, k)| match k {
            Kind::Refused(r) => Some(*r),
            _ => None,
        }) {
            self.client_w.push(&build::error(
                FEATURE_NOT_SUPPORTED,
                &format!("mm: {reason}"),
            ));
        } else if stmts.len() > 1
            && stmts
                .iter()
                .any(|(_, k)| k.is_transaction_control() || *k == Kind::Maintenance)
        {
            // "BEGIN; …; COMMIT" in one string: each statement on its own,
            // stopping at the first error as PostgreSQL would.
            for (text, kind) in stmts {
                self.saw_error = false;
                self.one_query(query_frame(&text), vec![(text, kind)])
                    .await?;
                if self.saw_error {
                    break;
                }
            }
        } else {
            self.one_query(f, stmts).await?;
        }
        self.client_w.push(&build::ready(self.status));
        self.flush_client().await;
        Ok(())
    }

    /// One query message: everything but its ReadyForQuery, which the
    /// caller sends with the final status.
    async fn one_query(
        &mut self,
        f: Frame,
        stmts: Vec<(String, Kind)>,
    ) -> Result<(), SessionError> {
        let single = stmts
            .first()
            .map(|(_, k)| k.clone())
            .filter(|_| stmts.len() == 1);
        match single {
            Some(Kind::Commit) if self.status == b'T' => {
                let reply = self.commit(None).await?;
                self.push_commit_reply(reply);
                return Ok(());
            }
            Some(Kind::Begin { read_only }) if self.status == b'I' => {
                self.backend_w.push(&f);
                if !read_only {
                    self.backend_w
                        .push(&query_frame("SET TRANSACTION READ WRITE"));
                }
                self.backend_w
                    .flush()
                    .await
                    .map_err(SessionError::Backend)?;
                self.relay(true).await?;
                if !read_only {
                    self.pending_internal += 1;
                    if let Some(e) = self.swallow_pending().await? {
                        tracing::debug!(
                            "SET TRANSACTION READ WRITE failed: {:?}",
                            error_summary(e.body())
                        );
                    }
                }
                self.had_ddl = false;
                return Ok(());
            }
            Some(Kind::Maintenance) => {
                self.client_w.push(&build::notice(
                    "mm: maintenance commands run on this node only",
                ));
            }
            _ => {}
        }
        let wrap = self.status == b'I' && stmts.iter().any(|(_, k)| k.needs_transaction());
        let ddl = stmts
            .iter()
            .filter(|(_, k)| *k == Kind::Ddl)
            .map(|(t, _)| t.as_str());
        self.queue_preamble(wrap, ddl);
        self.backend_w.push(&f);
        // Ask whether it wrote in the same round trip, unless the backend
        // will be reading copy data by then.
        let pipelined = wrap && !stmts.iter().any(|(t, _)| classify::copies_in(t));
        if pipelined {
            self.backend_w.push(&query_frame(WROTE));
        }
        self.backend_w
            .flush()
            .await
            .map_err(SessionError::Backend)?;
        let status = self.relay_with(true, wrap).await?;
        if wrap {
            let wrote = self.wrote(pipelined).await?;
            self.finish_implicit(status, wrote).await?;
        }
        Ok(())
    }

    /// The statement(s) of an implicit transaction ran; the held
    /// ReadyForQuery said `status`. Commit (or roll back); the caller
    /// sends ReadyForQuery.
    async fn finish_implicit(&mut self, status: u8, wrote: Internal) -> Result<(), SessionError> {
        // The statement's CommandComplete goes out once the commit is
        // decided, and not at all if the transaction aborted at commit.
        let mut complete = self.held_complete.take();
        match status {
            b'T' => {
                if let reply @ CommitReply::Error(_) = self.commit(Some(wrote)).await? {
                    self.push_commit_reply(reply);
                    complete = None;
                }
            }
            b'E' => {
                self.internal("ROLLBACK").await?;
            }
            _ => {}
        }
        if let Some(c) = complete {
            self.client_w.push(&c);
        }
        self.ensure_idle().await
    }

    /// The answer to WROTE: already pipelined behind the statements, or
    /// asked now (behind a COPY nothing may be pipelined).
    async fn wrote(&mut self, pipelined: bool) -> Result<Internal, SessionError> {
        if pipelined {
            self.read_internal().await
        } else {
            self.internal(WROTE).await
        }
    }

    // ---- extended query protocol -------------------------------------------

    async fn extended_batch(&mut self, sync: bool) -> Result<(), SessionError> {
        self.extended = true;
        let frames = std::mem::take(&mut self.batch);
        let execs = std::mem::take(&mut self.batch_execs);
        let refused = execs.iter().find_map(|(_, s)| match &s.kind {
            Kind::Refused(r) => Some(format!("mm: {r}")),
            _ => None,
        });
        let control_mixed =
            execs.len() > 1 && execs.iter().any(|(_, s)| s.kind.is_transaction_control());
        let commit_here =
            execs.len() == 1 && execs[0].1.kind == Kind::Commit && self.status == b'T';
        let refused = refused.or_else(|| {
            control_mixed.then(|| {
                "mm: BEGIN, COMMIT and ROLLBACK must be executed in a Sync of their own".to_string()
            })
        });
        let refused = refused.or_else(|| {
            (commit_here && !sync).then(|| "mm: COMMIT must be followed by Sync".to_string())
        });
        if let Some(reason) = refused {
            // Keep statement and portal bookkeeping in step with the
            // client (Parse, Bind, Close go through); execute nothing.
            for f in frames
                .iter()
                .filter(|f| matches!(f.tag, b'P' | b'B' | b'C' | b'D'))
            {
                self.backend_w.push(f);
            }
            self.backend_w.push(&Frame::new(b'S', &[]));
            self.backend_w
                .flush()
                .await
                .map_err(SessionError::Backend)?;
            self.relay(true).await?;
            self.client_w
                .push(&build::error(FEATURE_NOT_SUPPORTED, &reason));
            if sync {
                self.client_w.push(&build::ready(self.status));
            }
            self.flush_client().await;
            return Ok(());
        }
        if commit_here {
            let skip = execs[0].0;
            for (i, f) in frames.iter().enumerate() {
                if i != skip {
                    self.backend_w.push(f);
                }
            }
            self.backend_w
                .flush()
                .await
                .map_err(SessionError::Backend)?;
            self.relay(true).await?;
            let reply = self.commit(None).await?;
            self.push_commit_reply(reply);
            self.client_w.push(&build::ready(self.status));
            self.flush_client().await;
            return Ok(());
        }
        let begin_rw = execs.len() == 1 && execs[0].1.kind == (Kind::Begin { read_only: false });
        let wrap = self.status == b'I' && execs.iter().any(|(_, s)| s.kind.needs_transaction());
        let ddl = execs
            .iter()
            .filter(|(_, s)| s.kind == Kind::Ddl)
            .map(|(_, s)| &*s.sql);
        self.queue_preamble(wrap, ddl);
        if wrap && !sync {
            // A Flush-terminated batch: the wrap must be in place before its
            // statements run, and the commit waits for the Sync. Refuse
            // rather than guess (no common client does this for writes).
            self.swallow_pending().await?;
            self.internal("ROLLBACK").await?;
            self.client_w.push(&build::error(
                FEATURE_NOT_SUPPORTED,
                "mm: a write outside a transaction must end with Sync, not Flush; use BEGIN … COMMIT",
            ));
            self.flush_client().await;
            return Ok(());
        }
        for f in &frames {
            self.backend_w.push(f);
        }
        if begin_rw && sync {
            self.backend_w
                .push(&query_frame("SET TRANSACTION READ WRITE"));
        }
        // As in `one_query`: nothing behind a COPY FROM.
        let copy = execs.iter().any(|(_, s)| classify::copies_in(&s.sql));
        let pipelined = wrap && sync && !copy;
        if pipelined {
            self.backend_w.push(&query_frame(WROTE));
        }
        self.backend_w
            .flush()
            .await
            .map_err(SessionError::Backend)?;
        if !sync {
            // Responses to a Flush arrive while idle.
            self.swallow_pending().await?;
            return Ok(());
        }
        let status = self.relay_with(wrap, wrap).await?;
        if begin_rw {
            self.pending_internal += 1;
            self.swallow_pending().await?;
            self.had_ddl = false;
        }
        if wrap {
            let wrote = self.wrote(pipelined).await?;
            self.finish_implicit(status, wrote).await?;
            self.client_w.push(&build::ready(self.status));
            self.flush_client().await;
        }
        Ok(())
    }

    // ---- the commit path ------------------------------------------------------

    /// COMMIT of the open transaction (backend status `T`).
    /// `wrote`: the answer to [`WROTE`] if it was already asked (pipelined
    /// behind the client's statement).
    async fn commit(&mut self, wrote: Option<Internal>) -> Result<CommitReply, SessionError> {
        let wrote = match wrote {
            Some(w) => w,
            None => self.internal(WROTE).await?,
        };
        if let Some(e) = wrote.error {
            self.ensure_idle().await?;
            return Ok(CommitReply::Error(e));
        }
        if wrote.value.as_deref() != Some("t") {
            let r = self.internal("COMMIT").await?;
            return Ok(match r.error {
                Some(e) => CommitReply::Error(e),
                None => CommitReply::Committed,
            });
        }
        if self.had_ddl {
            let sql = format!(
                "SELECT mm.adjust_sequences({}, {})",
                crate::config::SEQUENCE_STRIDE,
                self.ctx.node_id
            );
            let r = self.internal(&sql).await?;
            if let Some(e) = r.error {
                self.ensure_idle().await?;
                return Ok(CommitReply::Error(e));
            }
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.ctx.hub.register_session(self.id, tx);
        let driver = self.ctx.driver.clone();
        let id = self.id;
        let wait_peers = self.wait_peers;
        let outcome = async move { driver.commit(id, wait_peers).await };
        tokio::pin!(outcome);
        let mut prepare_error: Option<Frame> = None;
        let outcome = loop {
            tokio::select! {
                biased;
                Some(cmd) = rx.recv() => self.on_session_cmd(cmd, &mut prepare_error).await?,
                o = &mut outcome => break o,
            }
        };
        self.ctx.hub.unregister_session(self.id);
        while let Ok(cmd) = rx.try_recv() {
            self.on_session_cmd(cmd, &mut prepare_error).await?;
        }
        self.had_ddl = false;
        let reply = match outcome {
            Some(Outcome::Committed) => CommitReply::Committed,
            Some(Outcome::Aborted(reason)) => {
                CommitReply::Error(prepare_error.unwrap_or_else(|| {
                    build::error(
                        SERIALIZATION_FAILURE,
                        &format!(
                        "mm: the cluster aborted the transaction ({reason:?}); it is safe to retry"
                    ),
                    )
                }))
            }
            Some(Outcome::Refused(st)) => CommitReply::Error(build::error(
                CANNOT_CONNECT_NOW,
                &format!(
                    "mm: node {} is not online (status: {}): the transaction was rolled back; \
                     connect to an online node",
                    self.ctx.node_id,
                    status_name(st)
                ),
            )),
            None => CommitReply::Error(build::error(
                ADMIN_SHUTDOWN,
                "mm: mmd is shutting down: the transaction's outcome is settled by the cluster",
            )),
        };
        self.ensure_idle().await?;
        Ok(reply)
    }

    async fn on_session_cmd(
        &mut self,
        cmd: SessionCmd,
        prepare_error: &mut Option<Frame>,
    ) -> Result<(), SessionError> {
        match cmd {
            SessionCmd::Prepare { gid, results } => {
                let sql = format!(
                    "SELECT mm.record_tx({gid_text}, {}); \
                     SELECT pg_logical_emit_message(true, {}, ''); PREPARE TRANSACTION {gid_text}",
                    gid.gen,
                    quote_literal(TX_PREFIX),
                    gid_text = quote_literal(&gid.to_string())
                );
                let r = self.internal(&sql).await?;
                let ok = r.error.is_none();
                if let Some(e) = r.error {
                    *prepare_error = Some(e);
                }
                let _ = results.send(Input::Db(DbResult::LocalPrepared {
                    client: self.id,
                    gid,
                    ok,
                }));
            }
            SessionCmd::Rollback => {
                if self.status != b'I' {
                    self.internal("ROLLBACK").await?;
                }
            }
        }
        Ok(())
    }

    async fn ensure_idle(&mut self) -> Result<(), SessionError> {
        if self.status != b'I' {
            self.internal("ROLLBACK").await?;
        }
        Ok(())
    }
}

/// The first column of a DataRow body, as text (`None` for NULL).
fn first_column(body: &[u8]) -> Option<String> {
    if body.len() < 6 {
        return None;
    }
    let n = i16::from_be_bytes([body[0], body[1]]);
    if n < 1 {
        return None;
    }
    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
    if len < 0 {
        return None;
    }
    body.get(6..6 + len as usize)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[cfg(test)]
mod tests {
    use super::asks_for_bypass;

    #[test]
    fn bypass_is_asked_for_in_the_startup_options() {
        assert!(asks_for_bypass("-c mm.admin_bypass=on"));
        assert!(asks_for_bypass("-c search_path=x -cmm.admin_bypass=true"));
        assert!(asks_for_bypass("--mm.admin_bypass=ON"));
        assert!(!asks_for_bypass("-c mm.admin_bypass=off"));
        assert!(!asks_for_bypass("-c mm.admin_bypassing=on"));
        assert!(!asks_for_bypass("-c search_path=mm.admin_bypass=on"));
        assert!(!asks_for_bypass(""));
    }
}
