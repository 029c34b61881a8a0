//! The gRPC listener: accepts connections within limits, runs the TLS handshake off the accept
//! loop, and tells every request what its connection proved ([`ConnectionInfo`]).
//!
//! Limits, so that strangers cannot hold a node's resources: at most `max_connections` open at
//! once and `max_connections_per_ip` from one address (more are closed as soon as they are
//! accepted); a connection must finish its TLS handshake and send its first bytes within
//! `HANDSHAKE_TIMEOUT`, and is closed after `idle_timeout` without receiving anything.
//! Clients of the MendFS library send HTTP/2 pings while they wait, so a long watch is not
//! idle.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mendfs_meta::auth::{ConnectionInfo, RefusalLog};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::tls::ServerTls;

/// How long a new connection has to finish its TLS handshake and send its first bytes.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on what connections may hold.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub idle_timeout: Duration,
}

/// Open connections, in all and per remote address.
#[derive(Debug, Default)]
struct Slots {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Holds one connection's place in [`Slots`] until the connection is dropped.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        slots.total = slots.total.saturating_sub(1);
        if let Some(count) = slots.per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                slots.per_ip.remove(&self.ip);
            }
        }
    }
}

fn take_slot(slots: &Arc<Mutex<Slots>>, ip: IpAddr, limits: &ConnectionLimits) -> Result<Slot, &'static str> {
    let mut guard = slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if guard.total >= limits.max_connections {
        return Err("the node has its maximum number of connections open");
    }
    let from_ip = guard.per_ip.entry(ip).or_insert(0);
    if *from_ip >= limits.max_connections_per_ip {
        return Err("this address has its maximum number of connections open");
    }
    *from_ip += 1;
    guard.total += 1;
    Ok(Slot { slots: slots.clone(), ip })
}

/// Logs a refused connection, at most one line per `REFUSAL_LOG_EVERY` with the count since.
fn log_refusal(refusals: &Mutex<RefusalLog>, remote: SocketAddr, why: &str) {
    let due = refusals.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).note(Instant::now());
    if let Some(refused) = due {
        tracing::warn!(%remote, refused, "refused a connection: {why}");
    }
}

/// The admitted connections (after their TLS handshake when `tls` is set) for a server to
/// serve, and the accept loop that yields them until `stop` resolves, which the caller runs
/// as a tracked task of the node.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    tls: Option<ServerTls>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> (ReceiverStream<io::Result<Connection>>, impl std::future::Future<Output = ()> + Send + 'static) {
    // Few slots: a connection waits here only while tonic picks it up.
    let (sender, receiver) = mpsc::channel(16);
    let slots = Arc::new(Mutex::new(Slots::default()));
    let refusals = Arc::new(Mutex::new(RefusalLog::default()));
    let accept_loop = async move {
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                _ = &mut stop => break,
                _ = sender.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let slot = match take_slot(&slots, remote.ip(), &limits) {
                Ok(slot) => slot,
                Err(why) => {
                    log_refusal(&refusals, remote, why);
                    continue; // dropping the stream closes it
                }
            };
            // TCP_NODELAY: replies are small, and Nagle's algorithm against the peer's delayed
            // ACK would hold each one for ~40 ms.
            let _ = stream.set_nodelay(true);
            let (sender, tls, refusals) = (sender.clone(), tls.clone(), refusals.clone());
            // The handshake runs apart from the accept loop: a slow or silent client delays no
            // one else.
            tokio::spawn(async move {
                let established = tokio::time::timeout(HANDSHAKE_TIMEOUT, establish(stream, remote, tls)).await;
                let (io, certificate) = match established {
                    Ok(Ok(established)) => established,
                    Ok(Err(why)) => return log_refusal(&refusals, remote, &why),
                    Err(_) => {
                        let why = format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                        return log_refusal(&refusals, remote, &why);
                    }
                };
                let connection = Connection {
                    io,
                    info: ConnectionInfo { remote: Some(remote), certificate },
                    idle_timeout: limits.idle_timeout,
                    last_received: None,
                    idle: Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT)),
                    _slot: slot,
                };
                let _ = sender.send(Ok(connection)).await;
            });
        }
    };
    (ReceiverStream::new(receiver), accept_loop)
}

async fn establish(
    stream: TcpStream,
    remote: SocketAddr,
    tls: Option<ServerTls>,
) -> Result<(Stream, Option<mendfs_meta::auth::CertifiedIdentity>), String> {
    match tls {
        None => Ok((Stream::Plain(stream), None)),
        Some(tls) => {
            let stream = tls.accept(stream).await.map_err(|e| format!("TLS handshake with {remote} failed: {e}"))?;
            let certificate = crate::tls::certified_identity(&stream)?;
            Ok((Stream::Tls(Box::new(stream)), certificate))
        }
    }
}

/// A connection's byte stream, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One admitted connection: its stream, what it proved, and its place in the limits.
pub struct Connection {
    io: Stream,
    info: ConnectionInfo,
    idle_timeout: Duration,
    /// When bytes last arrived; None until the first do (the handshake timeout applies).
    last_received: Option<tokio::time::Instant>,
    /// Fires at the earliest moment the connection could be idle. Re-armed only when it fires
    /// (from `last_received`), not on every read: a busy connection costs no timer work.
    idle: Pin<Box<Sleep>>,
    _slot: Slot,
}

impl Connection {
    pub fn remote(&self) -> Option<SocketAddr> {
        self.info.remote
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = match &mut this.io {
            Stream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        };
        if let Poll::Ready(result) = polled {
            if buf.filled().len() > before {
                this.last_received = Some(tokio::time::Instant::now());
            }
            return Poll::Ready(result);
        }
        loop {
            if this.idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let Some(last) = this.last_received else {
                let waited = HANDSHAKE_TIMEOUT;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nothing received for {waited:?}"),
                )));
            };
            let idle_at = last + this.idle_timeout;
            if idle_at <= tokio::time::Instant::now() {
                let waited = this.idle_timeout;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nothing received for {waited:?}"),
                )));
            }
            // Bytes arrived since the timer was set: wait until this connection could be idle.
            this.idle.as_mut().reset(idle_at);
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Stream::Plain(stream) => Pin::new(stream).poll_write(cx, data),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Stream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, buffers),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, buffers),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Stream::Plain(stream) => stream.is_write_vectored(),
            Stream::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Stream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Stream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_bound_connections_in_all_and_per_address() {
        let limits =
            ConnectionLimits { max_connections: 3, max_connections_per_ip: 2, idle_timeout: Duration::from_secs(1) };
        let slots = Arc::new(Mutex::new(Slots::default()));
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let first = take_slot(&slots, a, &limits).expect("first");
        let _second = take_slot(&slots, a, &limits).expect("second");
        assert!(take_slot(&slots, a, &limits).is_err(), "a third from one address");
        let _third = take_slot(&slots, b, &limits).expect("another address");
        assert!(take_slot(&slots, "127.0.0.3".parse().unwrap(), &limits).is_err(), "over the total");
        drop(first);
        assert!(take_slot(&slots, a, &limits).is_ok(), "a closed connection frees its slot");
        let guard = slots.lock().unwrap();
        assert_eq!(guard.total, 2, "the slot taken in the last assert was dropped");
    }
}
