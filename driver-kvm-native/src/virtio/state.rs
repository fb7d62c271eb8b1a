//! What a virtio-mmio device looks like in the state file: its transport registers, its
//! queues as the device last used them, and its configuration space (to tell the guest when a
//! clone's device differs from the template's, e.g. a disk of another size).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use crate::snapshot::blob::Blob;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
    /// Descriptor chains the device had taken from a queue and not given back (queue, head):
    /// the clone gives them back unused, since what they held was for the template's host.
    pub in_flight: Vec<(u16, u16)>,
    /// The device-specific configuration space the guest could read at save.
    pub config: Blob,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    /// The queue, checked by virtio-queue (size a power of two within the maximum, aligned
    /// rings); whether its rings lie in guest memory is the caller's check.
    pub fn to_queue(self) -> Result<Queue, String> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("{e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    fn snapshot() -> QueueSnapshot {
        QueueSnapshot {
            max_size: 256,
            size: 128,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            next_avail: 7,
            next_used: 5,
            event_idx: true,
        }
    }

    #[test]
    fn a_queue_round_trips() {
        let q = snapshot().to_queue().unwrap();
        assert_eq!((q.next_avail(), q.next_used(), q.size()), (7, 5, 128));
        assert!(q.event_idx_enabled());
        assert_eq!(QueueSnapshot::from(&q), snapshot());
    }

    #[test]
    fn bad_sizes_and_addresses_are_refused() {
        let bad = [
            QueueSnapshot {
                size: 100,
                ..snapshot()
            },
            QueueSnapshot {
                size: 512,
                ..snapshot()
            },
            QueueSnapshot {
                max_size: 0,
                ..snapshot()
            },
            QueueSnapshot {
                desc_table: 0x1001,
                ..snapshot()
            },
            QueueSnapshot {
                used_ring: 0x3001,
                ..snapshot()
            },
        ];
        for q in bad {
            assert!(q.to_queue().is_err(), "{q:?}");
        }
    }
}
