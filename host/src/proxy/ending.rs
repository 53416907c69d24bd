//! A connection's watch on the two signals that end it: its listener's `stop` (finish
//! what is in flight, then close) and the process's `close` (cut now). Both fire at most
//! once in a connection's life, but a connection is woken thousands of times a second:
//! polling two `CancellationToken` futures on every wake takes two mutexes each time.
//! [`Ending`] polls them only when one of them woke the task, and costs one atomic load
//! on every other wake.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// What ended a connection's wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The listener stops: finish what is in flight, take nothing new.
    Drain,
    /// The process is closing (or the drain's grace period is over): cut.
    Cut,
}

pub struct Ending {
    /// `None` once it has fired: it fires once.
    stop: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    close: Pin<Box<WaitForCancellationFutureOwned>>,
    signal: Arc<Signal>,
    /// The waker `signal` has of the task, to tell when the task's waker changes.
    registered: Option<Waker>,
    /// `signal` as a waker, for polling the two futures.
    waker: Waker,
}

/// Set when `stop` or `close` woke it, and then wakes the task.
struct Signal {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl Ending {
    pub fn new(stop: CancellationToken, close: CancellationToken) -> Ending {
        let signal = Arc::new(Signal {
            // The first poll polls both, so that they know whom to wake.
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Ending {
            stop: Some(Box::pin(stop.cancelled_owned())),
            close: Box::pin(close.cancelled_owned()),
            waker: Waker::from(signal.clone()),
            signal,
            registered: None,
        }
    }

    /// `Drain` once, when `stop` is cancelled; `Cut` when `close` is (every time it is
    /// polled after that).
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        if !(self.registered.as_ref()).is_some_and(|waker| waker.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            *self.signal.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
            self.registered = Some(waker);
        }
        if !self.signal.woken.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        let mut own = Context::from_waker(&self.waker);
        if self.close.as_mut().poll(&mut own).is_ready() {
            // Whoever polls again hears it again.
            self.signal.woken.store(true, Ordering::Relaxed);
            return Poll::Ready(End::Cut);
        }
        if let Some(stop) = &mut self.stop
            && stop.as_mut().poll(&mut own).is_ready()
        {
            self.stop = None;
            return Poll::Ready(End::Drain);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits for the next end.
    async fn next(ending: &mut Ending) -> End {
        std::future::poll_fn(|cx| ending.poll(cx)).await
    }

    #[tokio::test]
    async fn drain_comes_once_then_cut() {
        let (stop, close) = (CancellationToken::new(), CancellationToken::new());
        let mut ending = Ending::new(stop.clone(), close.clone());
        let waker = Waker::noop();
        assert_eq!(ending.poll(&mut Context::from_waker(waker)), Poll::Pending);
        stop.cancel();
        let end = tokio::time::timeout(Duration::from_secs(5), next(&mut ending)).await;
        assert_eq!(end.unwrap(), End::Drain);
        // Drain does not come again; Cut does, whenever asked.
        assert_eq!(ending.poll(&mut Context::from_waker(waker)), Poll::Pending);
        close.cancel();
        let end = tokio::time::timeout(Duration::from_secs(5), next(&mut ending)).await;
        assert_eq!(end.unwrap(), End::Cut);
        assert_eq!(
            ending.poll(&mut Context::from_waker(waker)),
            Poll::Ready(End::Cut)
        );
    }

    #[tokio::test]
    async fn a_signal_from_another_thread_wakes_the_waiting_task() {
        let (stop, close) = (CancellationToken::new(), CancellationToken::new());
        let mut ending = Ending::new(stop, close.clone());
        let waiting = tokio::spawn(async move { next(&mut ending).await });
        // The task is parked in `next` before the signal comes.
        tokio::task::yield_now().await;
        std::thread::spawn(move || close.cancel()).join().unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(end.unwrap().unwrap(), End::Cut);
    }

    #[tokio::test]
    async fn a_signal_before_the_first_poll_is_heard() {
        let (stop, close) = (CancellationToken::new(), CancellationToken::new());
        stop.cancel();
        let mut ending = Ending::new(stop, close);
        let end = tokio::time::timeout(Duration::from_secs(5), next(&mut ending)).await;
        assert_eq!(end.unwrap(), End::Drain);
    }
}
