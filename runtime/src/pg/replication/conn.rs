//! A PostgreSQL connection in replication mode (`replication=database`), our
//! own, on `postgres-protocol`'s message codecs and authentication helpers.
//!
//! Why not an existing client (docs/crate-survey.md §1):
//! - upstream `tokio-postgres` 0.7 has no replication mode and no CopyBoth;
//!   `postgres-protocol`'s `Message::parse` even rejects the CopyBothResponse
//!   tag `W`, so we frame backend messages ourselves and hand everything but
//!   `W` to it;
//! - `pgwire-replication` hard-codes `proto_version '1'`: no `two_phase`, so no
//!   prepared transactions at PREPARE time, which the data plane is built on;
//! - `pg_walstream` 0.9.0 decodes everything we need, but its stream only sends
//!   standby status updates every 128 events or on a keepalive request, so the
//!   slot's `confirmed_flush_lsn` did not move in the survey's live check. The
//!   confirm point is a correctness property for us (a slot must retain exactly
//!   what we have not durably applied), so [`ReplicationStream::confirm`] sends
//!   the update at once. It also owns its sockets (`std::net::TcpStream`) and a
//!   retry policy; ours runs over any `AsyncRead + AsyncWrite`
//!   ([`ReplicationClient::connect_stream`]), e.g. a simulated network.
//!
//! No TLS: `sslmode=require` is refused, anything else is plaintext.
//! Authentication: trust, cleartext password, MD5, SCRAM-SHA-256 (without
//! channel binding).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::pgoutput::{self, PgOutputMessage};
use super::{Lsn, ReplError};

/// Anything a replication connection can run over.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// Larger backend messages are a protocol error (PostgreSQL's own limit is 1 GB).
const MAX_MESSAGE: usize = 1 << 30;
/// Seconds from 1970-01-01 to 2000-01-01.
const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;

enum Frame {
    Msg(backend::Message),
    /// `W`, which `backend::Message::parse` does not know.
    CopyBothResponse,
}

struct Wire {
    io: Box<dyn Transport>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Wire {
    /// The next backend message. Cancel-safe: partial input stays buffered.
    async fn read_frame(&mut self) -> Result<Frame, ReplError> {
        loop {
            if self.rbuf.len() >= 5 {
                let tag = self.rbuf[0];
                let len =
                    i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
                let len = usize::try_from(len)
                    .ok()
                    .filter(|l| (4..=MAX_MESSAGE).contains(l))
                    .ok_or_else(|| {
                        ReplError::Protocol(format!(
                            "message {:?} with length {len}",
                            char::from(tag)
                        ))
                    })?;
                let total = 1 + len;
                if self.rbuf.len() >= total {
                    if tag == b'W' {
                        self.rbuf.advance(total);
                        return Ok(Frame::CopyBothResponse);
                    }
                    let mut frame = self.rbuf.split_to(total);
                    return match backend::Message::parse(&mut frame) {
                        Ok(Some(m)) => Ok(Frame::Msg(m)),
                        Ok(None) => Err(ReplError::Protocol("incomplete message".into())),
                        Err(e) => Err(ReplError::Protocol(format!(
                            "message {:?}: {e}",
                            char::from(tag)
                        ))),
                    };
                }
                self.rbuf.reserve(total - self.rbuf.len());
            }
            if self.io.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ReplError::Closed);
            }
        }
    }

    /// A message outside CopyBoth mode.
    async fn read_msg(&mut self) -> Result<backend::Message, ReplError> {
        match self.read_frame().await? {
            Frame::Msg(m) => Ok(m),
            Frame::CopyBothResponse => {
                Err(ReplError::Protocol("unexpected CopyBothResponse".into()))
            }
        }
    }

    /// Writes out `wbuf`. Whatever a cancelled call did not write stays queued.
    async fn flush(&mut self) -> Result<(), ReplError> {
        self.io.write_all_buf(&mut self.wbuf).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Reads to ReadyForQuery after an ErrorResponse, then returns the error.
    async fn fail_after_error(&mut self, err: ReplError) -> Result<(), ReplError> {
        loop {
            match self.read_msg().await? {
                backend::Message::ReadyForQuery(_) => return Err(err),
                _ => continue,
            }
        }
    }
}

/// First byte of a [`FILTERING_PLUGIN`] batch payload (`mm_batch`).
const BATCH_TAG: u8 = b'~';

/// The pgoutput messages of a batch payload: after the tag, frames of a
/// 4-byte big-endian length and one message.
fn split_batch(payload: &Bytes) -> Result<Vec<PgOutputMessage>, pgoutput::DecodeError> {
    let mut out = Vec::new();
    let mut at = 1;
    while at < payload.len() {
        let bad = || pgoutput::DecodeError::Truncated {
            msg: "mm_output batch",
            field: "frame",
        };
        let len_bytes = payload.get(at..at + 4).ok_or_else(bad)?;
        let len = u32::from_be_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
        let end = (at + 4)
            .checked_add(len)
            .filter(|&e| e <= payload.len())
            .ok_or_else(bad)?;
        out.push(pgoutput::decode(&payload.slice(at + 4..end))?);
        at = end;
    }
    Ok(out)
}

/// The output plugin mmd creates its slots with when the server has it:
/// pgoutput that can leave out echoes (`plugin/mm_output`).
pub const FILTERING_PLUGIN: &str = "mm_output";

/// Which echoes a [`FILTERING_PLUGIN`] stream leaves out: transactions of
/// another origin than `origin` (the node streamed from) whose origin is
/// `me` or whose generation is at most `skip_upto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EchoSkip {
    pub me: u32,
    pub origin: u32,
    pub skip_upto: u64,
}

/// The server cannot use the output plugin: not installed (SQLSTATE 58P01,
/// "could not access file"), or not named by `output_plugin_libraries`
/// (PostgreSQL 15.20 and later).
pub fn plugin_missing(e: &ReplError) -> bool {
    matches!(e, ReplError::Server { code, message, .. }
        if code == "58P01" || plugin_unusable(message))
}

/// The text of either refusal of [`plugin_missing`].
pub fn plugin_unusable(message: &str) -> bool {
    message.contains("could not access file")
        || message.contains("may not be used as an output plugin")
}

fn server_error(fields: backend::ErrorFields<'_>) -> ReplError {
    let mut fields = fields;
    let (mut severity, mut code, mut message, mut detail) =
        (String::new(), String::new(), String::new(), None);
    loop {
        match fields.next() {
            Ok(Some(f)) => {
                let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
                match f.type_() {
                    b'V' => severity = v,
                    b'S' if severity.is_empty() => severity = v,
                    b'C' => code = v,
                    b'M' => message = v,
                    b'D' => detail = Some(v),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(e) => {
                message = format!("{message} (unparsable error fields: {e})");
                break;
            }
        }
    }
    ReplError::Server {
        severity,
        code,
        message,
        detail,
    }
}

fn io_other(e: std::io::Error) -> ReplError {
    ReplError::Protocol(e.to_string())
}

/// `IDENTIFY_SYSTEM`'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemInfo {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: Lsn,
    pub dbname: Option<String>,
}

/// `CREATE_REPLICATION_SLOT`'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub slot_name: String,
    /// Decoding of the slot starts with transactions committing after this.
    pub consistent_point: Lsn,
    /// The exported snapshot's name, when one was asked for.
    pub snapshot: Option<String>,
    pub output_plugin: String,
}

/// The rows of a simple query (text format; None is NULL).
pub type Rows = Vec<Vec<Option<String>>>;

/// A replication connection before START_REPLICATION: replication commands
/// and (with `replication=database`) plain SQL.
pub struct ReplicationClient {
    wire: Wire,
    params: HashMap<String, String>,
}

impl ReplicationClient {
    /// Connects with a libpq-style conninfo (`host`, `port`, `user`, `dbname`,
    /// `password`, `application_name`, `connect_timeout`; `host` may be a
    /// Unix socket directory). Tries the hosts in order.
    pub async fn connect(conninfo: &str) -> Result<ReplicationClient, ReplError> {
        let cfg: tokio_postgres::Config = conninfo
            .parse()
            .map_err(|e| ReplError::Config(format!("conninfo: {e}")))?;
        if cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(ReplError::Config(
                "sslmode=require: TLS is not supported".into(),
            ));
        }
        let user = match cfg.get_user() {
            Some(u) => u.to_owned(),
            None => std::env::var("USER")
                .map_err(|_| ReplError::Config("conninfo has no user and $USER is unset".into()))?,
        };
        let dbname = cfg.get_dbname().unwrap_or(&user).to_owned();
        let app = cfg.get_application_name().unwrap_or("mmd").to_owned();
        let timeout = cfg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let ports = cfg.get_ports();
        let default_hosts = [tokio_postgres::config::Host::Tcp("localhost".into())];
        let hosts = if cfg.get_hosts().is_empty() {
            &default_hosts[..]
        } else {
            cfg.get_hosts()
        };
        let mut last_err = None;
        for (i, host) in hosts.iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let io = tokio::time::timeout(timeout, open(host, port)).await;
            let io = match io {
                Ok(Ok(io)) => io,
                Ok(Err(e)) => {
                    last_err = Some(ReplError::Io(e));
                    continue;
                }
                Err(_) => {
                    last_err = Some(ReplError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting to {host:?} port {port}: timed out"),
                    )));
                    continue;
                }
            };
            let startup = Self::connect_stream(io, &user, &dbname, &app, cfg.get_password());
            match tokio::time::timeout(timeout, startup).await {
                Ok(r) => return r,
                Err(_) => {
                    last_err = Some(ReplError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "startup timed out",
                    )))
                }
            }
        }
        Err(last_err.unwrap_or_else(|| ReplError::Config("no host".into())))
    }

    /// Startup and authentication over an already open transport.
    pub async fn connect_stream(
        io: impl Transport + 'static,
        user: &str,
        dbname: &str,
        application_name: &str,
        password: Option<&[u8]>,
    ) -> Result<ReplicationClient, ReplError> {
        let mut wire = Wire {
            io: Box::new(io),
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
        };
        frontend::startup_message(
            [
                ("user", user),
                ("database", dbname),
                ("replication", "database"),
                ("application_name", application_name),
                ("client_encoding", "UTF8"),
            ],
            &mut wire.wbuf,
        )
        .map_err(io_other)?;
        wire.flush().await?;
        let need_password = || {
            password.ok_or_else(|| {
                ReplError::Auth("the server asks for a password; conninfo has none".into())
            })
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            match wire.read_msg().await? {
                backend::Message::AuthenticationOk => break,
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(need_password()?, &mut wire.wbuf)
                        .map_err(io_other)?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(user.as_bytes(), need_password()?, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut wire.wbuf)
                        .map_err(io_other)?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut found = false;
                    while let Some(m) = mechs.next().map_err(io_other)? {
                        found |= m == sasl::SCRAM_SHA_256;
                    }
                    if !found {
                        return Err(ReplError::Auth("server offers no SCRAM-SHA-256".into()));
                    }
                    let s = sasl::ScramSha256::new(
                        need_password()?,
                        sasl::ChannelBinding::unsupported(),
                    );
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        s.message(),
                        &mut wire.wbuf,
                    )
                    .map_err(io_other)?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ReplError::Protocol("SASL continue before SASL".into()))?;
                    s.update(body.data())
                        .map_err(|e| ReplError::Auth(e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut wire.wbuf).map_err(io_other)?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ReplError::Protocol("SASL final before SASL".into()))?;
                    s.finish(body.data())
                        .map_err(|e| ReplError::Auth(e.to_string()))?;
                    continue;
                }
                backend::Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                backend::Message::NoticeResponse(_) => continue,
                _ => return Err(ReplError::Auth(
                    "unsupported authentication method (trust, password, md5, SCRAM-SHA-256 only)"
                        .into(),
                )),
            }
            wire.flush().await?;
        }
        let mut params = HashMap::new();
        loop {
            match wire.read_msg().await? {
                backend::Message::ReadyForQuery(_) => break,
                backend::Message::ParameterStatus(p) => {
                    params.insert(
                        p.name().map_err(io_other)?.to_owned(),
                        p.value().map_err(io_other)?.to_owned(),
                    );
                }
                backend::Message::BackendKeyData(_) | backend::Message::NoticeResponse(_) => {}
                backend::Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                _ => {
                    return Err(ReplError::Protocol(
                        "unexpected message during startup".into(),
                    ))
                }
            }
        }
        Ok(ReplicationClient { wire, params })
    }

    /// A server parameter reported at startup (`server_version`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// Runs one simple-query command and returns the rows of its (last) result.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, ReplError> {
        frontend::query(sql, &mut self.wire.wbuf).map_err(io_other)?;
        self.wire.flush().await?;
        let mut rows = Vec::new();
        loop {
            match self.wire.read_msg().await? {
                backend::Message::RowDescription(_) => rows.clear(),
                backend::Message::DataRow(row) => {
                    let buf = row.buffer();
                    let mut out = Vec::new();
                    let mut ranges = row.ranges();
                    while let Some(r) = ranges.next().map_err(io_other)? {
                        out.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(out);
                }
                backend::Message::CommandComplete(_)
                | backend::Message::EmptyQueryResponse
                | backend::Message::NoticeResponse(_)
                | backend::Message::ParameterStatus(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(rows),
                backend::Message::ErrorResponse(body) => {
                    let err = server_error(body.fields());
                    self.wire.fail_after_error(err).await?;
                }
                _ => return Err(ReplError::Protocol(format!("unexpected reply to {sql:?}"))),
            }
        }
    }

    async fn one_row(&mut self, sql: &str, cols: usize) -> Result<Vec<Option<String>>, ReplError> {
        let mut rows = self.simple_query(sql).await?;
        match rows.pop() {
            Some(r) if rows.is_empty() && r.len() >= cols => Ok(r),
            _ => Err(ReplError::Protocol(format!(
                "{sql}: expected one row of {cols} columns"
            ))),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplError> {
        let r = self.one_row("IDENTIFY_SYSTEM", 4).await?;
        let bad = |what: &str| ReplError::Protocol(format!("IDENTIFY_SYSTEM: bad {what}"));
        Ok(SystemInfo {
            system_id: r[0].clone().ok_or_else(|| bad("systemid"))?,
            timeline: r[1]
                .as_deref()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("timeline"))?,
            xlog_pos: r[2]
                .as_deref()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("xlogpos"))?,
            dbname: r[3].clone(),
        })
    }

    /// `CREATE_REPLICATION_SLOT name LOGICAL pgoutput (TWO_PHASE, SNAPSHOT 'nothing')`
    /// (PostgreSQL 15 syntax). A `two_phase` slot decodes a prepared
    /// transaction at PREPARE time.
    pub async fn create_slot(
        &mut self,
        name: &str,
        two_phase: bool,
    ) -> Result<SlotInfo, ReplError> {
        self.create_slot_with(name, two_phase, "nothing").await
    }

    /// As [`Self::create_slot`], exporting the slot's starting snapshot
    /// (`SlotInfo::snapshot`): a transaction elsewhere that sets it sees
    /// exactly what committed before the slot's first decoded transaction.
    /// The snapshot lives while this connection stays open and idle.
    pub async fn create_slot_exporting(
        &mut self,
        name: &str,
        two_phase: bool,
    ) -> Result<SlotInfo, ReplError> {
        let info = self.create_slot_with(name, two_phase, "export").await?;
        if info.snapshot.is_none() {
            return Err(ReplError::Protocol(
                "CREATE_REPLICATION_SLOT exported no snapshot".into(),
            ));
        }
        Ok(info)
    }

    /// With [`FILTERING_PLUGIN`] when the server has it, else pgoutput.
    async fn create_slot_with(
        &mut self,
        name: &str,
        two_phase: bool,
        snapshot: &str,
    ) -> Result<SlotInfo, ReplError> {
        check_slot_name(name)?;
        let sql = |plugin: &str| {
            format!(
                "CREATE_REPLICATION_SLOT {name} LOGICAL {plugin} (TWO_PHASE {two_phase}, SNAPSHOT '{snapshot}')"
            )
        };
        let r = match self.one_row(&sql(FILTERING_PLUGIN), 4).await {
            Err(e) if plugin_missing(&e) => {
                tracing::warn!(
                    "{FILTERING_PLUGIN} is not usable on this server (install it with \
                     scripts/build-plugin.sh and name it in output_plugin_libraries): slot \
                     {name} uses pgoutput, and every echo is decoded and sent"
                );
                self.one_row(&sql("pgoutput"), 4).await?
            }
            r => r?,
        };
        let bad = |what: &str| ReplError::Protocol(format!("CREATE_REPLICATION_SLOT: bad {what}"));
        Ok(SlotInfo {
            slot_name: r[0].clone().ok_or_else(|| bad("slot_name"))?,
            consistent_point: r[1]
                .as_deref()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("consistent_point"))?,
            snapshot: r[2].clone(),
            output_plugin: r[3].clone().unwrap_or_default(),
        })
    }

    /// `DROP_REPLICATION_SLOT name [WAIT]` (WAIT: until it is not active).
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), ReplError> {
        check_slot_name(name)?;
        let wait = if wait { " WAIT" } else { "" };
        self.simple_query(&format!("DROP_REPLICATION_SLOT {name}{wait}"))
            .await
            .map(drop)
    }

    /// `START_REPLICATION SLOT slot LOGICAL start (proto_version '3',
    /// publication_names 'publication', two_phase 'true', messages 'true')`.
    /// `start` 0/0 means the slot's `confirmed_flush_lsn`; everything before
    /// `start` counts as confirmed.
    pub async fn start(
        self,
        slot: &str,
        publication: &str,
        start: Lsn,
    ) -> Result<ReplicationStream, ReplError> {
        self.start_filtered(slot, publication, start, None).await
    }

    /// As [`Self::start`]; with `skip`, on a slot of [`FILTERING_PLUGIN`],
    /// the echoes the subscriber does not need are left out, and each
    /// transaction arrives in few CopyData messages (batches, which
    /// [`ReplicationStream::next`] splits; see `plugin/mm_output/mm_output.c`).
    pub async fn start_filtered(
        mut self,
        slot: &str,
        publication: &str,
        start: Lsn,
        skip: Option<EchoSkip>,
    ) -> Result<ReplicationStream, ReplError> {
        check_slot_name(slot)?;
        let ident = format!("\"{}\"", publication.replace('"', "\"\""));
        let extra = skip
            .map(|k| {
                format!(
                    ", mm_me '{}', mm_origin '{}', mm_skip_upto '{}', mm_batch 'on'",
                    k.me, k.origin, k.skip_upto
                )
            })
            .unwrap_or_default();
        let sql = format!(
            "START_REPLICATION SLOT {slot} LOGICAL {start} (proto_version '3', publication_names '{}', \
             two_phase 'true', messages 'true'{extra})",
            ident.replace('\'', "''")
        );
        frontend::query(&sql, &mut self.wire.wbuf).map_err(io_other)?;
        self.wire.flush().await?;
        loop {
            match self.wire.read_frame().await? {
                Frame::CopyBothResponse => break,
                Frame::Msg(backend::Message::NoticeResponse(_)) => {}
                Frame::Msg(backend::Message::ErrorResponse(body)) => {
                    let err = server_error(body.fields());
                    self.wire.fail_after_error(err).await?;
                }
                Frame::Msg(_) => {
                    return Err(ReplError::Protocol(
                        "unexpected reply to START_REPLICATION".into(),
                    ))
                }
            }
        }
        Ok(ReplicationStream {
            wire: self.wire,
            received: start,
            pending: VecDeque::new(),
            flushed: start,
            last_status: Instant::now(),
            status_interval: Duration::from_secs(10),
            done: false,
        })
    }
}

fn check_slot_name(name: &str) -> Result<(), ReplError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ReplError::Config(format!(
            "slot name {name:?}: 1..63 of [a-z0-9_] only"
        )))
    }
}

async fn open(
    host: &tokio_postgres::config::Host,
    port: u16,
) -> std::io::Result<Box<dyn Transport>> {
    match host {
        tokio_postgres::config::Host::Tcp(h) => {
            let s = tokio::net::TcpStream::connect((h.as_str(), port)).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(dir) => {
            let s = tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?;
            Ok(Box::new(s))
        }
    }
}

/// Microseconds since 2000-01-01 (the clock field of replication messages).
fn pg_now() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(Duration::from_secs(PG_EPOCH_OFFSET_SECS));
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}

/// A replication connection in CopyBoth mode, after START_REPLICATION.
///
/// Replies to keepalives that ask for one, and sends a status update at least
/// every `status_interval` while [`next`](Self::next) is being called. The
/// flush position it reports is only ever what [`confirm`](Self::confirm)
/// was given: the slot keeps everything after it.
pub struct ReplicationStream {
    wire: Wire,
    /// Highest WAL end the server reported (XLogData or keepalive), counting
    /// a batch only once its last message was returned.
    received: Lsn,
    /// The rest of a batch: each message with its WAL position, the last
    /// one also with the batch's WAL end.
    pending: VecDeque<(Lsn, PgOutputMessage, Option<Lsn>)>,
    /// Highest position confirmed durable by the caller.
    flushed: Lsn,
    last_status: Instant,
    status_interval: Duration,
    done: bool,
}

impl ReplicationStream {
    /// The next pgoutput message and the WAL position it was sent at;
    /// `None` once the server ended the stream (CopyDone).
    ///
    /// Cancel-safe as far as reading goes (a partially received message stays
    /// buffered); a keepalive reply interrupted by cancellation is completed by
    /// the next write.
    pub async fn next(&mut self) -> Result<Option<(Lsn, PgOutputMessage)>, ReplError> {
        if let Some(next) = self.pop_pending() {
            return Ok(Some(next));
        }
        loop {
            if self.done {
                return Ok(None);
            }
            if self.last_status.elapsed() >= self.status_interval {
                self.send_status(false).await?;
            }
            let body = match self.wire.read_frame().await? {
                Frame::Msg(backend::Message::CopyData(body)) => body.into_bytes(),
                Frame::Msg(backend::Message::CopyDone) => {
                    self.done = true;
                    frontend::copy_done(&mut self.wire.wbuf);
                    self.wire.flush().await?;
                    loop {
                        match self.wire.read_msg().await? {
                            backend::Message::ReadyForQuery(_) => return Ok(None),
                            backend::Message::ErrorResponse(body) => {
                                return Err(server_error(body.fields()))
                            }
                            _ => {}
                        }
                    }
                }
                Frame::Msg(backend::Message::ErrorResponse(body)) => {
                    self.done = true;
                    return Err(server_error(body.fields()));
                }
                Frame::Msg(backend::Message::NoticeResponse(_))
                | Frame::Msg(backend::Message::ParameterStatus(_)) => continue,
                _ => {
                    return Err(ReplError::Protocol(
                        "unexpected message in CopyBoth mode".into(),
                    ))
                }
            };
            match body.first() {
                Some(b'w') => {
                    if body.len() < 25 {
                        return Err(ReplError::Protocol("short XLogData".into()));
                    }
                    let mut h = &body[1..25];
                    let start = Lsn(h.get_u64());
                    let end = Lsn(h.get_u64());
                    let payload: Bytes = body.slice(25..);
                    if payload.first() == Some(&BATCH_TAG) {
                        let mut msgs = split_batch(&payload)
                            .map_err(|err| ReplError::Decode { lsn: start, err })?;
                        let Some(last) = msgs.pop() else {
                            continue;
                        };
                        self.pending
                            .extend(msgs.into_iter().map(|m| (start, m, None)));
                        self.pending.push_back((start, last, Some(end.max(start))));
                        return Ok(self.pop_pending());
                    }
                    self.received = self.received.max(end).max(start);
                    let msg = pgoutput::decode(&payload)
                        .map_err(|err| ReplError::Decode { lsn: start, err })?;
                    return Ok(Some((start, msg)));
                }
                Some(b'k') => {
                    if body.len() < 18 {
                        return Err(ReplError::Protocol("short primary keepalive".into()));
                    }
                    let mut h = &body[1..18];
                    let end = Lsn(h.get_u64());
                    let _clock = h.get_i64();
                    self.received = self.received.max(end);
                    if h.get_u8() != 0 {
                        self.send_status(false).await?;
                    }
                }
                other => {
                    return Err(ReplError::Protocol(format!(
                        "unknown CopyData kind {:?}",
                        other.map(|&b| char::from(b))
                    )))
                }
            }
        }
    }

    /// The next message of a batch; its WAL end counts as received with the
    /// batch's last message.
    fn pop_pending(&mut self) -> Option<(Lsn, PgOutputMessage)> {
        let (lsn, msg, end) = self.pending.pop_front()?;
        if let Some(end) = end {
            self.received = self.received.max(end);
        }
        Some((lsn, msg))
    }

    /// Everything up to `flush` is durably applied here: tell the server now
    /// (the slot's `confirmed_flush_lsn` follows). Never moves backwards.
    pub async fn confirm(&mut self, flush: Lsn) -> Result<(), ReplError> {
        self.flushed = self.flushed.max(flush);
        self.send_status(false).await
    }

    /// The highest position given to [`confirm`](Self::confirm) (or the start).
    pub fn confirmed(&self) -> Lsn {
        self.flushed
    }

    /// The highest WAL end the server has reported.
    pub fn received(&self) -> Lsn {
        self.received
    }

    /// How often a status update goes out without a keepalive asking (default
    /// 10 s; keep it below the server's `wal_sender_timeout`).
    pub fn set_status_interval(&mut self, every: Duration) {
        self.status_interval = every;
    }

    /// Standby status update: write = what we received, flush = apply = what
    /// was confirmed.
    async fn send_status(&mut self, reply_requested: bool) -> Result<(), ReplError> {
        let write = self.received.max(self.flushed);
        let w = &mut self.wire.wbuf;
        w.put_u8(b'd');
        w.put_i32(4 + 34);
        w.put_u8(b'r');
        w.put_u64(write.0);
        w.put_u64(self.flushed.0);
        w.put_u64(self.flushed.0);
        w.put_i64(pg_now());
        w.put_u8(u8::from(reply_requested));
        self.wire.flush().await?;
        self.last_status = Instant::now();
        Ok(())
    }

    /// Ends the stream politely: a last status update, CopyDone, Terminate.
    pub async fn close(mut self) -> Result<(), ReplError> {
        if !self.done {
            self.send_status(false).await?;
            frontend::copy_done(&mut self.wire.wbuf);
        }
        frontend::terminate(&mut self.wire.wbuf);
        self.wire.flush().await?;
        let _ = self.wire.io.shutdown().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_splits_into_its_messages_and_a_cut_frame_is_an_error() {
        // Two logical messages (tag 'M', non-transactional): flags, lsn, prefix, len, content.
        let msg = |prefix: &str| {
            let mut m = BytesMut::new();
            m.put_u8(b'M');
            m.put_u8(0);
            m.put_u64(0x10);
            m.put_slice(prefix.as_bytes());
            m.put_u8(0);
            m.put_u32(0);
            m.freeze()
        };
        let mut b = BytesMut::new();
        b.put_u8(BATCH_TAG);
        for p in ["a", "bc"] {
            let m = msg(p);
            b.put_u32(m.len() as u32);
            b.put_slice(&m);
        }
        let b = b.freeze();
        let got = split_batch(&b).unwrap();
        let prefixes: Vec<String> = got
            .iter()
            .map(|m| match m {
                PgOutputMessage::Message(m) => m.prefix.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(prefixes, ["a", "bc"]);
        assert!(
            split_batch(&b.slice(..b.len() - 1)).is_err(),
            "cut in a message"
        );
        assert!(split_batch(&b.slice(..3)).is_err(), "cut in a length");
        assert!(split_batch(&b.slice(..1)).unwrap().is_empty());
    }
    use tokio::io::DuplexStream;

    fn backend_msg(out: &mut BytesMut, tag: u8, body: &[u8]) {
        out.put_u8(tag);
        out.put_i32(4 + body.len() as i32);
        out.put_slice(body);
    }

    /// Reads one frontend message (tag, body); the startup packet has no tag.
    async fn read_frontend(io: &mut DuplexStream, startup: bool) -> (u8, Vec<u8>) {
        let tag = if startup {
            0
        } else {
            io.read_u8().await.unwrap()
        };
        let len = io.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        io.read_exact(&mut body).await.unwrap();
        (tag, body)
    }

    /// A scripted server: trust auth, START_REPLICATION, one keepalive asking
    /// for a reply, one XLogData, a garbled XLogData.
    #[tokio::test]
    async fn keepalive_reply_and_xlogdata_over_a_fake_server() {
        let (client_io, mut server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(async move {
            let (_, startup) = read_frontend(&mut server, true).await;
            let text = String::from_utf8_lossy(&startup).into_owned();
            assert!(text.contains("replication\0database\0"), "{text:?}");
            assert!(text.contains("user\0mm\0"), "{text:?}");
            let mut out = BytesMut::new();
            backend_msg(&mut out, b'R', &0i32.to_be_bytes());
            backend_msg(&mut out, b'S', b"server_version\x0015.8\x00");
            backend_msg(&mut out, b'Z', b"I");
            server.write_all(&out).await.unwrap();

            let (tag, q) = read_frontend(&mut server, false).await;
            assert_eq!(tag, b'Q');
            let q = String::from_utf8_lossy(&q).into_owned();
            assert!(
                q.starts_with("START_REPLICATION SLOT s1 LOGICAL 0/10 (proto_version '3', publication_names '\"p''x\"', two_phase 'true', messages 'true')"),
                "{q}"
            );
            let mut out = BytesMut::new();
            backend_msg(&mut out, b'W', &[0, 0, 0]);
            let mut k = vec![b'k'];
            k.extend_from_slice(&0x99u64.to_be_bytes());
            k.extend_from_slice(&0i64.to_be_bytes());
            k.push(1);
            backend_msg(&mut out, b'd', &k);
            let mut w = vec![b'w'];
            w.extend_from_slice(&0x20u64.to_be_bytes());
            w.extend_from_slice(&0x30u64.to_be_bytes());
            w.extend_from_slice(&0i64.to_be_bytes());
            w.push(b'O');
            w.extend_from_slice(&5u64.to_be_bytes());
            w.extend_from_slice(b"mm_node_2\0");
            backend_msg(&mut out, b'd', &w);
            server.write_all(&out).await.unwrap();

            // The keepalive reply: write = 0x99, flush = apply = the start.
            let (tag, d) = read_frontend(&mut server, false).await;
            assert_eq!((tag, d[0], d.len()), (b'd', b'r', 34));
            let lsn = |i: usize| u64::from_be_bytes(d[i..i + 8].try_into().unwrap());
            assert_eq!((lsn(1), lsn(9), lsn(17)), (0x99, 0x10, 0x10));
            // confirm(0x30)
            let (_, d) = read_frontend(&mut server, false).await;
            let lsn = |i: usize| u64::from_be_bytes(d[i..i + 8].try_into().unwrap());
            assert_eq!((lsn(1), lsn(9), lsn(17)), (0x99, 0x30, 0x30));

            let mut out = BytesMut::new();
            let mut w = vec![b'w'];
            w.extend_from_slice(&0x40u64.to_be_bytes());
            w.extend_from_slice(&0x40u64.to_be_bytes());
            w.extend_from_slice(&0i64.to_be_bytes());
            w.extend_from_slice(b"O\0\0");
            backend_msg(&mut out, b'd', &w);
            server.write_all(&out).await.unwrap();
            server
        });
        let c = ReplicationClient::connect_stream(client_io, "mm", "db", "t", None)
            .await
            .unwrap();
        assert_eq!(c.parameter("server_version"), Some("15.8"));
        let mut s = c.start("s1", "p'x", Lsn(0x10)).await.unwrap();
        let (lsn, m) = s.next().await.unwrap().unwrap();
        assert_eq!(lsn, Lsn(0x20));
        assert!(matches!(m, PgOutputMessage::Origin(o) if o.name == "mm_node_2"));
        assert_eq!(s.received(), Lsn(0x99));
        s.confirm(Lsn(0x30)).await.unwrap();
        s.confirm(Lsn(0x25)).await.unwrap(); // never moves back
        assert_eq!(s.confirmed(), Lsn(0x30));
        let err = s.next().await.unwrap_err();
        assert!(
            matches!(err, ReplError::Decode { lsn: Lsn(0x40), .. }),
            "{err}"
        );
        let mut server = srv.await.unwrap();
        drop(s);
        // The connection is gone: the server reads EOF after the extra status update.
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(
            rest.len(),
            1 + 4 + 34,
            "one more status update (the backward confirm)"
        );
    }

    #[test]
    fn slot_names() {
        assert!(check_slot_name("mm_node_1").is_ok());
        for bad in ["", "A", "a-b", "a b", "a;drop", &"x".repeat(64)] {
            assert!(check_slot_name(bad).is_err(), "{bad:?}");
        }
    }
}
