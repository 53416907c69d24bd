//! The data plane's threads: each runs a single-threaded event loop of its own, and every
//! TCP connection (L4 or HTTP) lives on one of them from accept to close, as in nginx,
//! HAProxy or Envoy. A connection's tasks (an HTTP connection's streams, its pooled
//! connections to endpoints) then wake each other on one thread, without atomics or
//! cross-thread wake-ups, and run in arrival order, so the frames of many streams leave in
//! one write. The accept loops stay on the process's runtime and hand each connection to
//! the next worker in turn.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Dropped with the workers: each thread's event loop then ends, and its runtime
    /// cancels whatever is left on it.
    _stop: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// `count` threads (at least one), named `weir-worker`.
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::new();
        let mut stop = Vec::new();
        for _ in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (sender, stopped) = oneshot::channel::<()>();
            stop.push(sender);
            std::thread::Builder::new()
                .name("weir-worker".into())
                .spawn(move || {
                    runtime.block_on(async {
                        let _ = stopped.await;
                    })
                })?;
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
            _stop: stop,
        })
    }

    /// Runs `task` on the next worker.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_go_to_each_worker_in_turn_and_run_there() {
        let workers = Workers::start(2).unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let sender = sender.clone();
            workers.spawn(async move {
                sender.send(std::thread::current().id()).unwrap();
            });
        }
        let threads: Vec<_> = (0..4)
            .map(|_| {
                receiver
                    .recv_timeout(std::time::Duration::from_secs(5))
                    .unwrap()
            })
            .collect();
        let distinct: std::collections::HashSet<_> = threads.iter().collect();
        assert_eq!(distinct.len(), 2, "{threads:?}");
        assert!(!distinct.contains(&std::thread::current().id()));
    }
}
