//! Dirty-chunk tracking for incremental resync of a returning mirror (R7, see
//! `docs/replication.md`).
//!
//! A primary copy keeps, per tracked mirror, a bitmap over its [`CHUNK_SIZE`] chunks and the
//! identity of the mirror's copy the map is relative to. The rule that makes it correct: every
//! write, write-zeroes or discard the primary applies is either acknowledged by the tracked
//! mirror or marks its chunks dirty (marked *after* the local I/O). A resync pass clears a
//! chunk's bit *before* reading the chunk locally and marks it again if the copy to the mirror
//! fails, so a concurrent write is never lost from the map. Maps live in memory only: a
//! restarted primary has none, so its next resync is a full copy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::copy::CHUNK_SIZE;

/// A compact bitmap over a copy's chunks: bit `i` set means chunk `i` (bytes
/// `[i * CHUNK_SIZE, (i + 1) * CHUNK_SIZE)`) may differ on the mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMap {
    words: Vec<u64>,
    /// The volume size the map covers.
    size: u64,
    count: u64,
}

/// Chunks covering `size` bytes.
pub fn chunks_of(size: u64) -> u64 {
    size.div_ceil(u64::from(CHUNK_SIZE))
}

impl ChunkMap {
    /// A map of `size` bytes with every chunk clean.
    pub fn clean(size: u64) -> ChunkMap {
        let n = chunks_of(size);
        ChunkMap {
            words: vec![0; n.div_ceil(64) as usize],
            size,
            count: 0,
        }
    }

    /// A map of `size` bytes with every chunk dirty (a full copy).
    pub fn all_dirty(size: u64) -> ChunkMap {
        let mut m = ChunkMap::clean(size);
        for i in 0..chunks_of(size) {
            m.set(i);
        }
        m
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of chunks the map covers.
    pub fn chunks(&self) -> u64 {
        chunks_of(self.size)
    }

    /// Dirty chunks.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_dirty(&self, chunk: u64) -> bool {
        self.words
            .get((chunk / 64) as usize)
            .is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }

    /// Marks `chunk` dirty (ignored past the end); true if it was clean.
    pub fn set(&mut self, chunk: u64) -> bool {
        let Some(w) = self.words.get_mut((chunk / 64) as usize) else {
            return false;
        };
        let bit = 1 << (chunk % 64);
        if *w & bit != 0 || chunk >= chunks_of(self.size) {
            return false;
        }
        *w |= bit;
        self.count += 1;
        true
    }

    /// Marks `chunk` clean; true if it was dirty.
    pub fn clear(&mut self, chunk: u64) -> bool {
        let Some(w) = self.words.get_mut((chunk / 64) as usize) else {
            return false;
        };
        let bit = 1 << (chunk % 64);
        if *w & bit == 0 {
            return false;
        }
        *w &= !bit;
        self.count -= 1;
        true
    }

    /// Grows the map to `size` bytes (never shrinks): the new area, and the old last chunk if
    /// it was partial, are dirty (the mirror may not have grown, or not the same way).
    pub fn grow(&mut self, size: u64) {
        if size <= self.size {
            return;
        }
        let first = self.size / u64::from(CHUNK_SIZE);
        self.size = size;
        self.words.resize(chunks_of(size).div_ceil(64) as usize, 0);
        for i in first..chunks_of(size) {
            self.set(i);
        }
    }

    /// Marks every chunk touched by `[offset, offset + len)` dirty (growing first if the range
    /// lies past the map).
    pub fn mark_range(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len.max(1));
        if end > self.size {
            self.grow(end);
        }
        let c = u64::from(CHUNK_SIZE);
        for i in offset / c..=(end - 1) / c {
            self.set(i);
        }
    }

    /// The dirty chunk indexes, ascending, without building a list (a full pass over a
    /// 64 TiB volume has 16 M of them).
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }

    /// The dirty chunk indexes, ascending.
    pub fn dirty_chunks(&self) -> Vec<u64> {
        self.iter().collect()
    }
}

/// What identifies a mirror's copy for incremental resync: the copy's incarnation (random,
/// written in its header at creation: a deleted and recreated copy has another) and the
/// mirror's instance (its machine's boot id: unflushed writes it acknowledged did not survive a
/// reboot). A map is only used for the identity it was started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyIdentity {
    pub incarnation: u64,
    pub instance: u64,
}

impl CopyIdentity {
    /// Wire form (a ping answer's payload to a storage peer): both fields, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&self.incarnation.to_le_bytes());
        b.extend_from_slice(&self.instance.to_le_bytes());
        b
    }

    /// `None` unless exactly 16 bytes with a non-zero incarnation (0: unknown, an old copy).
    pub fn decode(b: &[u8]) -> Option<CopyIdentity> {
        let inc: [u8; 8] = b.get(..8)?.try_into().ok()?;
        let ins: [u8; 8] = b.get(8..16)?.try_into().ok()?;
        if b.len() != 16 {
            return None;
        }
        let id = CopyIdentity {
            incarnation: u64::from_le_bytes(inc),
            instance: u64::from_le_bytes(ins),
        };
        (id.incarnation != 0).then_some(id)
    }
}

/// One tracked mirror.
#[derive(Debug)]
struct Tracked {
    /// The mirror copy the map is relative to; `None`: not known yet (the map cannot be used).
    identity: Option<CopyIdentity>,
    map: ChunkMap,
    /// Bumped by every mark: an identity learned by a query is kept only if nothing was ever
    /// marked.
    marks: u64,
}

/// The plan of one resync pass for a mirror ([`DirtyTracker::start_pass`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassPlan {
    /// Only the chunks dirtied since the mirror last held the primary's data are copied.
    pub incremental: bool,
    /// The chunks to copy (a snapshot of the map when the pass started).
    pub chunks: ChunkMap,
}

impl PassPlan {
    /// How many chunks the pass copies.
    pub fn len(&self) -> u64 {
        self.chunks.count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chunks to copy, ascending.
    pub fn chunk_list(&self) -> Vec<u64> {
        self.chunks.dirty_chunks()
    }
}

/// A primary copy's dirty maps, one per tracked mirror. Cheap when nothing is tracked.
#[derive(Debug, Default)]
pub struct DirtyTracker {
    any: AtomicBool,
    maps: Mutex<HashMap<SocketAddr, Tracked>>,
}

impl DirtyTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Tracked>> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a mutation of `[offset, offset + len)` was applied locally: marks the chunks dirty
    /// for every tracked mirror not in `acked` (the mirrors that acknowledged it).
    pub fn mark_unacked(&self, offset: u64, len: u64, acked: &[SocketAddr]) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        for (m, t) in self.lock().iter_mut() {
            if !acked.contains(m) {
                t.map.mark_range(offset, len);
                t.marks += 1;
            }
        }
    }

    /// Starts tracking `mirror` with a clean map, if it is not tracked (a mirror in sync from
    /// the copy's creation); its identity is learned later ([`DirtyTracker::learned`]). True
    /// if it was not tracked.
    pub fn track_clean(&self, mirror: SocketAddr, size: u64) -> bool {
        let mut maps = self.lock();
        if maps.contains_key(&mirror) {
            return false;
        }
        maps.insert(
            mirror,
            Tracked {
                identity: None,
                map: ChunkMap::clean(size),
                marks: 0,
            },
        );
        self.any.store(true, Ordering::Release);
        true
    }

    /// The identity of `mirror`'s copy, learned by a query after [`DirtyTracker::track_clean`]:
    /// kept only if nothing was ever marked in the map (the mirror acknowledged every write
    /// since) and none was known.
    pub fn learned(&self, mirror: SocketAddr, id: CopyIdentity) -> bool {
        let mut maps = self.lock();
        match maps.get_mut(&mirror) {
            Some(t) if t.identity.is_none() && t.marks == 0 && t.map.count() == 0 => {
                t.identity = Some(id);
                true
            }
            _ => false,
        }
    }

    /// Plans a resync pass of `mirror`, whose copy now has identity `id` (`None`: unknown),
    /// for a volume of `size` bytes. The map is used if it was started for the same identity;
    /// otherwise it is replaced by an all-dirty one for `id` (a full copy).
    pub fn start_pass(&self, mirror: SocketAddr, id: Option<CopyIdentity>, size: u64) -> PassPlan {
        let mut maps = self.lock();
        let t = maps.entry(mirror).or_insert_with(|| Tracked {
            identity: None,
            map: ChunkMap::clean(0),
            marks: 0,
        });
        self.any.store(true, Ordering::Release);
        let incremental = id.is_some() && t.identity == id;
        if incremental {
            t.map.grow(size);
        } else {
            t.identity = id;
            t.map = ChunkMap::all_dirty(size);
            t.marks += 1;
        }
        PassPlan {
            incremental,
            chunks: t.map.clone(),
        }
    }

    /// Before a pass reads `chunk` to copy it: clears its bit (a later write marks it again).
    pub fn take_chunk(&self, mirror: SocketAddr, chunk: u64) {
        if let Some(t) = self.lock().get_mut(&mirror) {
            t.map.clear(chunk);
        }
    }

    /// A copy of `chunk` to `mirror` failed: dirty again.
    pub fn mark_chunk(&self, mirror: SocketAddr, chunk: u64) {
        if let Some(t) = self.lock().get_mut(&mirror) {
            t.map.set(chunk);
            t.marks += 1;
        }
    }

    /// Dirty chunks of `mirror` (`None`: not tracked).
    pub fn dirty_count(&self, mirror: SocketAddr) -> Option<u64> {
        self.lock().get(&mirror).map(|t| t.map.count())
    }

    /// The identity `mirror`'s map is relative to.
    pub fn identity(&self, mirror: SocketAddr) -> Option<CopyIdentity> {
        self.lock().get(&mirror).and_then(|t| t.identity)
    }

    /// The map of `mirror` can no longer be trusted (its copy changed under it): forgets it,
    /// so its next pass is full.
    pub fn forget(&self, mirror: SocketAddr) {
        self.lock().remove(&mirror);
    }

    /// Forgets every map (the copy is no longer primary, or is deleted).
    pub fn forget_all(&self) {
        let mut maps = self.lock();
        maps.clear();
        self.any.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    const C: u64 = CHUNK_SIZE as u64;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn bitmap_marks_ranges_counts_and_clears() {
        let mut m = ChunkMap::clean(10 * C + 512);
        assert_eq!((m.chunks(), m.count()), (11, 0));
        m.mark_range(C - 512, 1024); // straddles chunks 0 and 1
        m.mark_range(5 * C, C); // exactly chunk 5
        m.mark_range(10 * C, 512); // the partial last chunk
        m.mark_range(5 * C + 7, 1); // again: no double count
        assert_eq!(m.dirty_chunks(), vec![0, 1, 5, 10]);
        assert_eq!(m.count(), 4);
        assert!(m.clear(5) && !m.clear(5));
        assert!(!m.set(11) && !m.set(1000), "past the end is ignored");
        assert_eq!(m.dirty_chunks(), vec![0, 1, 10]);
        let all = ChunkMap::all_dirty(130 * C);
        assert_eq!(all.count(), 130);
        assert_eq!(all.dirty_chunks(), (0..130).collect::<Vec<_>>());
        assert_eq!(ChunkMap::clean(0).chunks(), 0);
    }

    #[test]
    fn growing_marks_the_new_area_and_the_old_partial_chunk() {
        let mut m = ChunkMap::clean(2 * C + 4096);
        m.grow(C); // never shrinks
        assert_eq!(m.size(), 2 * C + 4096);
        m.grow(70 * C);
        assert_eq!(m.dirty_chunks(), (2..70).collect::<Vec<_>>());
        let mut m = ChunkMap::clean(2 * C);
        m.grow(3 * C);
        assert_eq!(m.dirty_chunks(), vec![2]);
        // A write past the map (a resize the map has not seen) grows it.
        let mut m = ChunkMap::clean(C);
        m.mark_range(4 * C, 512);
        assert_eq!(m.dirty_chunks(), vec![1, 2, 3, 4]);
    }

    #[test]
    fn identity_wire_form_is_checked() {
        let id = CopyIdentity {
            incarnation: 7,
            instance: 9,
        };
        assert_eq!(CopyIdentity::decode(&id.encode()), Some(id));
        assert_eq!(CopyIdentity::decode(&[]), None);
        assert_eq!(CopyIdentity::decode(&id.encode()[..15]), None);
        let mut long = id.encode();
        long.push(0);
        assert_eq!(CopyIdentity::decode(&long), None);
        let zero = CopyIdentity {
            incarnation: 0,
            instance: 9,
        };
        assert_eq!(CopyIdentity::decode(&zero.encode()), None, "0 is unknown");
    }

    #[test]
    fn unacknowledged_writes_mark_and_a_pass_uses_the_map_only_for_the_same_copy() {
        let t = DirtyTracker::default();
        let (m, other) = (addr(1), addr(2));
        let id = CopyIdentity {
            incarnation: 1,
            instance: 1,
        };
        t.mark_unacked(0, 512, &[]); // nothing tracked: nothing to do
        assert_eq!(t.dirty_count(m), None);
        // In sync from creation: a clean map; the identity arrives later.
        assert!(t.track_clean(m, 16 * C));
        assert!(!t.track_clean(m, 16 * C), "already tracked");
        assert!(t.learned(m, id));
        // Acknowledged by m: clean; not acknowledged (failed, or not sent): dirty.
        t.mark_unacked(0, 4096, &[m, other]);
        assert_eq!(t.dirty_count(m), Some(0));
        t.mark_unacked(3 * C, 4096, &[other]);
        t.mark_unacked(9 * C - 512, 1024, &[]);
        assert_eq!(t.dirty_count(m), Some(3));
        // The same copy comes back: only the dirty chunks.
        let p = t.start_pass(m, Some(id), 16 * C);
        assert_eq!((p.incremental, p.chunk_list()), (true, vec![3, 8, 9]));
        // Clear before the read, re-mark on a failed copy; a write during the pass re-marks.
        t.take_chunk(m, 3);
        t.take_chunk(m, 8);
        t.mark_unacked(8 * C, 512, &[]);
        t.take_chunk(m, 9);
        t.mark_chunk(m, 9);
        assert_eq!(t.start_pass(m, Some(id), 16 * C).chunk_list(), vec![8, 9]);
        // A recreated copy (another incarnation), or an unknown one: full.
        let new = CopyIdentity {
            incarnation: 2,
            instance: 1,
        };
        let p = t.start_pass(m, Some(new), 16 * C);
        assert!(!p.incremental);
        assert_eq!(p.len(), 16);
        assert!(!t.start_pass(m, None, 16 * C).incremental);
        assert!(
            !t.start_pass(m, None, 16 * C).incremental,
            "unknown stays full"
        );
        // A reboot of the mirror (another instance): full.
        let p = t.start_pass(m, Some(new), 16 * C);
        assert!(!p.incremental);
        let rebooted = CopyIdentity {
            incarnation: 2,
            instance: 5,
        };
        assert!(!t.start_pass(m, Some(rebooted), 16 * C).incremental);
        // Resize: the pass grows the map, the new area dirty.
        for c in 0..16 {
            t.take_chunk(m, c);
        }
        let p = t.start_pass(m, Some(rebooted), 18 * C);
        assert_eq!((p.incremental, p.chunk_list()), (true, vec![16, 17]));
        t.forget_all();
        assert_eq!(t.dirty_count(m), None);
    }

    #[test]
    fn an_identity_learned_after_a_mark_is_not_trusted() {
        let t = DirtyTracker::default();
        let m = addr(1);
        let id = CopyIdentity {
            incarnation: 3,
            instance: 4,
        };
        assert!(t.track_clean(m, 4 * C));
        t.mark_unacked(0, 512, &[]); // m failed a write while the query ran
        assert!(!t.learned(m, id));
        assert!(!t.start_pass(m, Some(id), 4 * C).incremental);
        t.forget(m);
        assert_eq!(t.identity(m), None);
    }
}
