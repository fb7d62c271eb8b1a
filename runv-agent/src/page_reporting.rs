//! Free page reporting (virtio-balloon, the qemu driver's cold VMs): the guest tells the host
//! which blocks of free memory it may take back, and the host discards them.
//!
//! The kernel reports free blocks of 2^order pages, and only while a zone has
//! `32 << order` pages free beyond its low watermark. Its default order is the pageblock
//! order (9, or 10 in a kernel without hugetlb): 64 or 128 MiB free, which a 128 MiB guest
//! never has, so nothing would ever be reported. A smaller order, sized to the guest, makes
//! reporting work in small guests; the parameter is writable at run time (6.1 overwrites a
//! value given on the command line when the balloon driver registers).

const PARAM: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
/// Pages per report the kernel batches (`PAGE_REPORTING_CAPACITY`).
const CAPACITY: u64 = 32;
/// 2 MiB blocks at most: a host huge page, discarded whole.
const MAX_ORDER: u32 = 9;
/// 64 KiB blocks at least: smaller ones cost more reports than they return.
const MIN_ORDER: u32 = 4;

/// The largest order whose free-memory condition asks at most an eighth of the guest's RAM.
pub fn order_for(mem_total_kib: u64) -> u32 {
    let budget_pages = mem_total_kib / 4 / 8;
    let mut order = MAX_ORDER;
    while order > MIN_ORDER && (CAPACITY << order) > budget_pages {
        order -= 1;
    }
    order
}

/// Sets the reporting order for this guest's size; nothing without a balloon driver (no page
/// reporting in the kernel, or the driver not loaded).
pub fn tune() {
    if !std::path::Path::new(PARAM).exists() {
        return;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let Some(total) = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
    else {
        return;
    };
    let order = order_for(total);
    match std::fs::write(PARAM, order.to_string()) {
        Ok(()) => crate::debug!("free page reporting in blocks of {} KiB", 4u64 << order),
        Err(e) => crate::warn!("page reporting order: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_fits_the_guest() {
        // 128 MiB guests (113 MiB with runv's kernel, 82 MiB with Debian's): 256 KiB blocks,
        // reported while 8 MiB are free.
        assert_eq!(order_for(113_164), 6);
        assert_eq!(order_for(82_052), 6);
        // 1 GiB and more: 2 MiB blocks, the host's huge pages.
        assert_eq!(order_for(1 << 20), 9);
        assert_eq!(order_for(64 << 20), 9);
        // Tiny guests: never below 64 KiB.
        assert_eq!(order_for(8_192), MIN_ORDER);
        assert_eq!(order_for(0), MIN_ORDER);
    }
}
