//! Connections that go quiet are closed: a peer that sends nothing for `timeout` (not even
//! an ack of the server's keepalive pings) loses its connection, and so does one that has
//! not sent the 24-byte HTTP/2 preface within `timeout` of connecting, however slowly it
//! trickles. Idle or deliberately slow clients cannot pin sockets forever.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// What every server connection answers to `is_write_vectored`. h2 copies a DATA frame
/// into its write buffer, next to the frames before and after it, only when the payload is
/// under 256 bytes on a vectored stream but under 1 KiB on one that is not; a bigger frame
/// is written on its own, and its stream's trailers after it. A verification answer is
/// about 260 bytes, so on a vectored stream every answer took two or three `writev` calls
/// (1.7 per call measured, against 0.7 for the bare echo) and the socket writes were a
/// third of the CPU under load. Saying "not vectored" lets h2 coalesce the answers of
/// many streams into one write, at the price of copying a few hundred bytes.
pub const VECTORED_WRITES: bool = false;

/// Length of the HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;

pub struct IdleTimeout {
    inner: TcpStream,
    timeout: Duration,
    /// Fires at the latest `timeout` after the last read. A read only notes its time in
    /// `last_read`; the timer is moved when it fires early, not on every read (moving it
    /// costs a timer-wheel update, and a busy connection reads thousands of times a second).
    idle: Pin<Box<Sleep>>,
    last_read: Instant,
    /// Fixed at accept; dropped once the preface is in.
    preface: Option<Pin<Box<Sleep>>>,
    read_so_far: usize,
}

impl IdleTimeout {
    pub fn new(inner: TcpStream, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            idle: Box::pin(tokio::time::sleep(timeout)),
            last_read: Instant::now(),
            preface: Some(Box::pin(tokio::time::sleep(timeout))),
            read_so_far: 0,
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let preface_late = self
            .preface
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready());
        if preface_late {
            return true;
        }
        while self.idle.as_mut().poll(cx).is_ready() {
            let deadline = self.last_read + self.timeout;
            if deadline <= Instant::now() {
                return true;
            }
            // Read since the timer was set: wait for the rest of the period.
            self.idle.as_mut().reset(deadline);
        }
        false
    }
}

impl AsyncRead for IdleTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                let read = buf.filled().len() - before;
                if read > 0 {
                    self.last_read = Instant::now();
                    self.read_so_far += read;
                    if self.read_so_far >= PREFACE_LEN {
                        self.preface = None;
                    }
                }
                Poll::Ready(result)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle or too slow connection",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for IdleTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        VECTORED_WRITES
    }
}

impl Connected for IdleTimeout {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
