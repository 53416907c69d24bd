//! Which HTTP a client speaks on an HTTP port: HTTP/2 with prior knowledge opens with
//! its connection preface, anything else is taken as HTTP/1.1. The bytes read to tell are
//! handed back first to whichever protocol then reads the connection ([`Rewind`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What an HTTP/2 client sends first (RFC 9113 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The client's protocol (`true`: HTTP/2), and the bytes read to tell; `None` when the
/// client closed before saying anything.
pub async fn sniff<T: AsyncRead + Unpin>(client: &mut T) -> io::Result<Option<(bool, Bytes)>> {
    let mut seen = BytesMut::with_capacity(1024);
    loop {
        if client.read_buf(&mut seen).await? == 0 {
            return Ok(None);
        }
        let n = seen.len().min(PREFACE.len());
        if seen[..n] != PREFACE[..n] {
            return Ok(Some((false, seen.freeze())));
        }
        if n == PREFACE.len() {
            return Ok(Some((true, seen.freeze())));
        }
    }
}

/// A connection whose first bytes were read already: they are read again first.
pub struct Rewind<T> {
    seen: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(seen: Bytes, inner: T) -> Self {
        Rewind { seen, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.seen.has_remaining() {
            let n = self.seen.len().min(buf.remaining());
            buf.put_slice(&self.seen[..n]);
            self.seen.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn sniffed(chunks: &[&[u8]]) -> (Option<bool>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(4096);
        for chunk in chunks {
            client.write_all(chunk).await.unwrap();
        }
        drop(client);
        let found = sniff(&mut server).await.unwrap();
        let Some((h2, seen)) = found else {
            return (None, Vec::new());
        };
        let mut all = Vec::new();
        Rewind::new(seen, server)
            .read_to_end(&mut all)
            .await
            .unwrap();
        (Some(h2), all)
    }

    #[tokio::test]
    async fn the_preface_means_http2_and_every_byte_is_read_again() {
        let mut sent = PREFACE.to_vec();
        sent.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00");
        assert_eq!(sniffed(&[&sent]).await, (Some(true), sent.clone()));
    }

    #[tokio::test]
    async fn anything_else_is_http1_from_its_first_differing_byte() {
        let sent = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n".to_vec();
        assert_eq!(sniffed(&[&sent]).await, (Some(false), sent.clone()));
        // "PRI" alone could still be either: one more byte that differs settles it.
        assert_eq!(
            sniffed(&[b"PRI", b"X"]).await,
            (Some(false), b"PRIX".to_vec())
        );
    }

    #[tokio::test]
    async fn a_client_that_closes_first_says_nothing() {
        assert_eq!(sniffed(&[]).await, (None, Vec::new()));
        // Part of the preface, then gone.
        assert_eq!(sniffed(&[b"PRI * HT"]).await, (None, Vec::new()));
    }
}
