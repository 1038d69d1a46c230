//! What the lifecycle tells the outside about itself: the event stream
//! (`GET /v1/events`) and the metrics scrape (`GET /metrics`).
//!
//! An event follower is a cursor over the store's `events` table plus a
//! wake-up from the store's notifier ([`Store::subscribe_events`]). It
//! reads a page after its cursor, hands it out, and only when it has caught
//! up does it wait to be poked. The data always comes from the table, never
//! from the notifier, so a follower that reads slowly (its client does)
//! falls behind without losing anything, and one that resumes from the
//! last seq it saw continues exactly after it.

use std::sync::Arc;

use hearth_api::Event;
use tokio::sync::watch;
use uuid::Uuid;

use super::{Lifecycle, LifecycleError};
use crate::metrics::StoreCounts;
use crate::store::{EventsHead, Store, StoreError};

/// Events per store read.
const PAGE: u32 = 1000;

/// A cursor over the event log that, when following, waits for new events.
#[derive(Debug)]
pub struct EventFollow {
    store: Arc<Store>,
    vm: Option<Uuid>,
    cursor: i64,
    follow: bool,
    head: watch::Receiver<EventsHead>,
    done: bool,
}

impl EventFollow {
    /// A follower of `vm`'s events (every VM's when `None`) after seq
    /// `since`; it ends when caught up unless `follow`.
    pub fn new(store: Arc<Store>, vm: Option<Uuid>, since: i64, follow: bool) -> EventFollow {
        // Subscribed before the first read: an event committed after that
        // read marks the receiver changed, so it is never slept through.
        let head = store.subscribe_events();
        EventFollow {
            store,
            vm,
            cursor: since,
            follow,
            head,
            done: false,
        }
    }

    /// The seq of the last event handed out (or the starting cursor).
    pub fn cursor(&self) -> i64 {
        self.cursor
    }

    /// The next events, oldest first; `None` at the end: caught up and not
    /// following, the daemon shutting down, or after an error.
    pub async fn next_batch(&mut self) -> Option<Result<Vec<Event>, StoreError>> {
        while !self.done {
            let closed = self.head.borrow_and_update().closed;
            match self.store.events(self.vm, self.cursor, PAGE) {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(batch) => {
                    if let Some(last) = batch.last() {
                        self.cursor = last.seq;
                        return Some(Ok(batch));
                    }
                }
            }
            if !self.follow || closed || self.head.changed().await.is_err() {
                self.done = true;
            }
        }
        None
    }
}

impl Lifecycle {
    /// Events after `since` of VM `vm` (id or name; the id of a deleted VM
    /// works too, its events stay) or of every VM; with `follow`, new ones
    /// as they are appended.
    pub fn follow_events(
        &self,
        vm: Option<&str>,
        since: i64,
        follow: bool,
    ) -> Result<EventFollow, LifecycleError> {
        let vm = match vm {
            None => None,
            Some(key) => match self.store.find(key)? {
                Some(row) => Some(row.id),
                None => Some(
                    Uuid::parse_str(key).map_err(|_| LifecycleError::NotFound(key.to_owned()))?,
                ),
            },
        };
        Ok(EventFollow::new(self.store.clone(), vm, since, follow))
    }

    /// The metrics text, its gauges computed from the store now.
    pub fn metrics_text(&self) -> Result<String, LifecycleError> {
        let taps = self.store.taps()?;
        let in_use = taps.iter().filter(|t| t.vm_id.is_some()).count() as u64;
        let counts = StoreCounts {
            vm_states: self.list()?.into_iter().map(|vm| vm.state).collect(),
            taps_idle: taps.len() as u64 - in_use,
            taps_in_use: in_use,
        };
        self.metrics
            .render(&counts)
            .map_err(|source| LifecycleError::Metrics { source })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hearth_api::{EventKind, VmSpec};

    use super::*;

    fn store() -> (tempfile::TempDir, Arc<Store>, Uuid) {
        let dir = tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .unwrap();
        let store = Arc::new(Store::open(&dir.path().join("hearth.db")).unwrap());
        let id = Uuid::now_v7();
        let spec = VmSpec {
            vcpus: 1,
            memory_mib: 128,
            kernel: "/k".into(),
            rootfs: "/r".into(),
            initrd: None,
            kernel_args: String::new(),
            capabilities: vec![],
        };
        store.insert_vm(id, "a", &spec).unwrap();
        (dir, store, id)
    }

    async fn drain(f: &mut EventFollow) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(batch) = f.next_batch().await {
            out.extend(batch.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn an_event_appended_while_a_follower_waits_is_delivered() {
        let (_d, store, id) = store();
        let mut f = EventFollow::new(store.clone(), None, 0, true);
        let first = f.next_batch().await.unwrap().unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(f.cursor(), first[0].seq);
        let waiting = tokio::spawn(async move {
            let batch = f.next_batch().await;
            (f, batch)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a caught-up follower waits");
        let seq = store
            .append_event(id, EventKind::Teardown, "removed tap hth0")
            .unwrap();
        let (mut f, batch) = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the follower was woken")
            .unwrap();
        let batch = batch.unwrap().unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].seq, seq);
        assert_eq!(batch[0].kind, EventKind::Teardown);
        // Shutdown ends a follower that has caught up.
        store.close_event_streams();
        let end = tokio::time::timeout(Duration::from_secs(5), f.next_batch()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
    }

    #[tokio::test]
    async fn resuming_from_a_cursor_gives_exactly_the_rest() {
        let (_d, store, id) = store();
        let other = Uuid::now_v7();
        // More than one page, two VMs interleaved.
        for i in 0..(PAGE as usize + 200) {
            let vm = if i % 3 == 0 { other } else { id };
            store
                .append_event(vm, EventKind::Sweep, &format!("e{i}"))
                .unwrap();
        }
        let all = drain(&mut EventFollow::new(store.clone(), None, 0, false)).await;
        assert_eq!(all.len(), PAGE as usize + 201);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        for cut in [0, 1, 500, all.len() - 1, all.len()] {
            let since = if cut == 0 { 0 } else { all[cut - 1].seq };
            let rest = drain(&mut EventFollow::new(store.clone(), None, since, false)).await;
            assert_eq!(rest, all[cut..], "resumed after {since}");
        }
        // The VM filter: only that VM's events, in order.
        let mine = drain(&mut EventFollow::new(store.clone(), Some(other), 0, false)).await;
        let want: Vec<_> = all.iter().filter(|e| e.vm_id == other).cloned().collect();
        assert_eq!(mine, want);
        // A slow follower loses nothing: everything appended since it last
        // read is there when it reads again.
        let mut f = EventFollow::new(store.clone(), None, all[all.len() - 1].seq, true);
        for i in 0..10 {
            store
                .append_event(id, EventKind::Sweep, &format!("late{i}"))
                .unwrap();
        }
        let late = f.next_batch().await.unwrap().unwrap();
        let reasons: Vec<_> = late.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(
            reasons,
            (0..10).map(|i| format!("late{i}")).collect::<Vec<_>>()
        );
    }
}
