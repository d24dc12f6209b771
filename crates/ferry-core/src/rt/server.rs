use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixListener;

use super::connection::{Connection, ConnectionConfig};
use crate::error::{Error, Result};
use crate::router::Router;

/// Listens on a Unix socket path and serves a [`Router`] to every peer that connects, each
/// connection concurrently.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we created, so shutdown removes only our own.
    identity: Option<(u64, u64)>,
    router: Router,
    config: ConnectionConfig,
    grace: Duration,
}

/// Removes a stale socket file at `path`; refuses a path held by a live server or one that is
/// not a socket.
fn clear_stale_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("cannot inspect {}", path.display()), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::io(
            format!("cannot listen on {}", path.display()),
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(Error::io(
            format!("cannot listen on {}", path.display()),
            std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "a live server is listening there",
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| Error::io(format!("cannot remove stale socket {}", path.display()), e)),
        Err(e) => Err(Error::io(format!("cannot probe {}", path.display()), e)),
    }
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Server {
    /// Binds `path` with default connection settings.
    pub async fn bind(path: impl AsRef<Path>, router: Router) -> Result<Server> {
        Server::bind_with(path, router, ConnectionConfig::default()).await
    }

    /// Binds `path`: a stale socket file left by a dead server is removed; a live server's is
    /// left alone and the bind fails with `AddrInUse`.
    pub async fn bind_with(
        path: impl AsRef<Path>,
        router: Router,
        config: ConnectionConfig,
    ) -> Result<Server> {
        let path = path.as_ref().to_path_buf();
        clear_stale_socket(&path)?;
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io(format!("cannot listen on {}", path.display()), e))?;
        Ok(Server {
            identity: identity(&path),
            listener,
            path,
            router,
            config,
            grace: Duration::from_secs(10),
        })
    }

    /// How long shutdown waits for running calls to be answered. Default: 10 s.
    pub fn with_grace(mut self, grace: Duration) -> Server {
        self.grace = grace;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully: stops accepting, removes
    /// the socket file, lets running calls finish (up to the grace period) and closes every
    /// connection.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let mut conns: Vec<Connection> = Vec::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        conns.retain(|c| !c.is_closed());
                        conns.push(Connection::from_stream(stream, self.router.clone(), self.config.clone()));
                    }
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!("ferry: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = &mut shutdown => break,
            }
        }
        drop(self.listener);
        if self.identity.is_some() && identity(&self.path) == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
        let grace = self.grace;
        futures_util::future::join_all(conns.iter().map(|c| c.shutdown(grace))).await;
        Ok(())
    }
}
