//! The host's huge page policy, from sysfs: what bulkhead-vmm backs guest RAM with, and
//! what `bulkhead check` reports.

/// The host's huge page policy, from sysfs. `None` where it cannot be read (a jail
/// without /sys): the advice is still given, and the report says the outcome is unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPages {
    pub thp: Option<String>,
    pub shmem_thp: Option<String>,
    pub free_hugetlb_2m: Option<u64>,
}

impl HostPages {
    pub fn read() -> Self {
        let sel = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| selected(&s));
        HostPages {
            thp: sel("/sys/kernel/mm/transparent_hugepage/enabled"),
            shmem_thp: sel("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
            free_hugetlb_2m: std::fs::read_to_string(
                "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
            )
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        }
    }
}

/// The bracketed choice of a sysfs policy file: `always [madvise] never` → `madvise`.
fn selected(s: &str) -> Option<String> {
    let a = s.find('[')?;
    let b = s[a..].find(']')?;
    Some(s[a + 1..a + b].to_owned())
}

/// Whether a THP policy value (`enabled` or `shmem_enabled`) grants huge pages to
/// memory advised with `MADV_HUGEPAGE`.
pub fn advised_gets_huge(policy: &str) -> bool {
    matches!(
        policy,
        "always" | "madvise" | "advise" | "within_size" | "force"
    )
}

impl HostPages {
    /// One line for `bulkhead check`: what private and shared guest RAM will get here.
    pub fn summary(&self) -> String {
        let thp = |p: &Option<String>| match p.as_deref() {
            Some(p) if advised_gets_huge(p) => "2 MiB THP",
            Some(_) => "4 KiB pages",
            None => "unknown (no sysfs)",
        };
        let mut s = format!(
            "private RAM: {} (enabled={}); shared RAM (virtio-fs, networking): ",
            thp(&self.thp),
            self.thp.as_deref().unwrap_or("?")
        );
        match self.free_hugetlb_2m {
            Some(n) if n > 0 => s.push_str(&format!(
                "hugetlbfs while {n} reserved 2 MiB pages last, then "
            )),
            _ => {}
        }
        s.push_str(&format!(
            "{} (shmem_enabled={})",
            thp(&self.shmem_thp),
            self.shmem_thp.as_deref().unwrap_or("?")
        ));
        s
    }

    /// Shared guest RAM gets no huge pages: say how to change that.
    pub fn shared_hint(&self) -> Option<&'static str> {
        let shmem_ok = self.shmem_thp.as_deref().is_some_and(advised_gets_huge);
        (!shmem_ok && self.free_hugetlb_2m.unwrap_or(0) == 0).then_some(
            "guest RAM shared with virtio-fs/networking back ends uses 4 KiB pages, which slows VM start: \
             echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled (systemd/bulkhead-memory.conf \
             does it at boot), or reserve hugetlb pages",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_choice_is_read_from_brackets() {
        assert_eq!(
            selected("always [madvise] never\n").as_deref(),
            Some("madvise")
        );
        assert_eq!(
            selected("always within_size advise [never] deny force").as_deref(),
            Some("never")
        );
        assert_eq!(selected("garbage"), None);
    }

    #[test]
    fn summary_and_hint_follow_the_policy() {
        let mut h = HostPages {
            thp: Some("madvise".into()),
            shmem_thp: Some("never".into()),
            free_hugetlb_2m: Some(0),
        };
        assert!(
            h.summary().contains("private RAM: 2 MiB THP"),
            "{}",
            h.summary()
        );
        assert!(
            h.summary().contains("4 KiB pages (shmem_enabled=never)"),
            "{}",
            h.summary()
        );
        assert!(h.shared_hint().is_some());
        h.shmem_thp = Some("advise".into());
        assert!(h.shared_hint().is_none());
        h.shmem_thp = Some("never".into());
        h.free_hugetlb_2m = Some(512);
        assert!(h.shared_hint().is_none());
        assert!(h.summary().contains("512 reserved"), "{}", h.summary());
    }
}
