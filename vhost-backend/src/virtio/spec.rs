//! virtio-blk definitions (virtio 1.2, section 5.2), and the device's config space.

// Feature bits.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

// Status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// The flag of a write-zeroes segment allowing the device to unmap.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

pub const SECTOR_SIZE: u64 = 512;

/// The physical block size the device reports (`VIRTIO_BLK_F_TOPOLOGY`), whatever the logical
/// one: the guest aligns its I/O (filesystem blocks, partitions) to 4 KiB even on a disk of
/// 512-byte logical blocks.
pub const PHYSICAL_BLOCK_SIZE: u32 = 4096;

/// The logical block sizes a volume may have: 512 (the default, what firmware and most disk
/// images expect) or 4096.
pub use keel_api::types::BLOCK_SIZES;

/// A `--block-size` argument: one of [`BLOCK_SIZES`].
pub fn parse_block_size(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if BLOCK_SIZES.contains(&n) => Ok(n),
        _ => Err(format!(
            "invalid block size {s:?}: expected 512 or 4096 (bytes)"
        )),
    }
}

/// Limits the device advertises and the parser enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// Max data segments per request (`seg_max`).
    pub seg_max: u32,
    /// Max bytes of data per IN/OUT request.
    pub max_request_bytes: u64,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

impl Limits {
    pub fn new(capacity_bytes: u64, read_only: bool) -> Limits {
        Limits {
            capacity_sectors: capacity_bytes / SECTOR_SIZE,
            read_only,
            seg_max: 126,
            max_request_bytes: 128 << 20,
            max_discard_sectors: (1 << 30) / SECTOR_SIZE as u32,
            max_discard_seg: 16,
            max_write_zeroes_sectors: (1 << 30) / SECTOR_SIZE as u32,
            max_write_zeroes_seg: 16,
        }
    }
}

/// The virtio-blk config space (60 bytes, little-endian) for logical blocks of `blk_size`
/// bytes (512 or 4096; `VIRTIO_BLK_F_BLK_SIZE`). The topology (`VIRTIO_BLK_F_TOPOLOGY`)
/// reports [`PHYSICAL_BLOCK_SIZE`] physical blocks, aligned at the start of the disk, as the
/// minimum I/O size, and no optimal I/O size; discards are aligned to physical blocks.
/// Request offsets stay in 512-byte virtio sectors whatever `blk_size` is.
pub fn config_space(limits: &Limits, num_queues: u16, blk_size: u32) -> [u8; 60] {
    let blk_size = if BLOCK_SIZES.contains(&blk_size) {
        blk_size
    } else {
        PHYSICAL_BLOCK_SIZE
    };
    let per_physical = PHYSICAL_BLOCK_SIZE / blk_size; // 8 or 1
    let mut c = [0u8; 60];
    c[0..8].copy_from_slice(&limits.capacity_sectors.to_le_bytes());
    // size_max (8..12) is not offered.
    c[12..16].copy_from_slice(&limits.seg_max.to_le_bytes());
    // geometry (16..20) is not offered.
    c[20..24].copy_from_slice(&blk_size.to_le_bytes());
    // topology (24..32): physical_block_exp (log2 of logical blocks per physical block),
    // alignment_offset (in logical blocks), min_io_size and opt_io_size (in logical blocks;
    // 0: no optimal size).
    c[24] = per_physical.trailing_zeros() as u8;
    c[25] = 0;
    c[26..28].copy_from_slice(&(per_physical as u16).to_le_bytes());
    c[28..32].copy_from_slice(&0u32.to_le_bytes());
    c[32] = 1; // writeback (only meaningful with CONFIG_WCE, not offered)
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    c[36..40].copy_from_slice(&limits.max_discard_sectors.to_le_bytes());
    c[40..44].copy_from_slice(&limits.max_discard_seg.to_le_bytes());
    // discard_sector_alignment, in 512-byte sectors: one physical block.
    c[44..48].copy_from_slice(&(PHYSICAL_BLOCK_SIZE / SECTOR_SIZE as u32).to_le_bytes());
    c[48..52].copy_from_slice(&limits.max_write_zeroes_sectors.to_le_bytes());
    c[52..56].copy_from_slice(&limits.max_write_zeroes_seg.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_reports_logical_and_physical_block_sizes() {
        let l = Limits::new(1 << 30, false);
        let c = config_space(&l, 2, 512);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[24], 3, "physical block = 512 << 3 = 4096");
        assert_eq!(c[25], 0, "alignment offset");
        assert_eq!(
            u16::from_le_bytes(c[26..28].try_into().unwrap()),
            8,
            "min_io 4 KiB"
        );
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        let c = config_space(&l, 2, 4096);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(c[24], 0, "physical block = logical block");
        assert_eq!(u16::from_le_bytes(c[26..28].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        // The capacity is in 512-byte sectors whatever the logical block size.
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
    }

    #[test]
    fn only_512_and_4096_are_block_sizes() {
        assert_eq!(parse_block_size("512"), Ok(512));
        assert_eq!(parse_block_size("4096"), Ok(4096));
        for bad in ["0", "1024", "2048", "8192", "", "4k", "-512"] {
            assert!(parse_block_size(bad).is_err(), "{bad}");
        }
    }
}
