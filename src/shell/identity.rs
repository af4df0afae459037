//! What pcache tells the operator when the backing bdev found is not the one the cache
//! records: same size, another UUID (a bdev re-created without its UUID after a restart, or
//! another device). Pure Rust: the SPDK shell fills in [`Mismatch`] and logs or returns the
//! text. The engine decides (`engine::compare_backing`); this only explains.
//!
//! The rules of every message here: say what is on the cache (its dirty bytes, or that it
//! may hold writes not yet written back), refuse by default, give the safe ways forward
//! (re-create the bdev with the recorded UUID, with the exact call; or accept after
//! checking it is the same device), and never suggest deleting or reformatting the cache.

use crate::engine::format::uuid_string;
use crate::engine::open::{describe_backing, describe_dirty};
use crate::engine::BackingIdentity;

/// A refused backing bdev, and what the operator needs to decide.
#[derive(Debug, Clone)]
pub(crate) struct Mismatch<'a> {
    /// rpc.py arguments of the `bdev_pcache_create` that attaches this cache to the bdev
    /// found (`-b PC0 -c Cache0 -d Back0`).
    pub create_args: &'a str,
    /// "cache bdev 'Cache0'" or "cache path '/dev/dax0.0'".
    pub cache_label: &'a str,
    /// The identity the superblock records.
    pub recorded: &'a BackingIdentity,
    /// The bdev found (its name is the `backing_bdev` asked for).
    pub found: &'a BackingIdentity,
    /// The SPDK module of the bdev found ("aio", "malloc", "nvme", ...), if known.
    pub found_module: Option<&'a str>,
    /// Dirty bytes in the cache's log (None: not counted, e.g. by examine).
    pub dirty_bytes: Option<u64>,
}

/// How to bring back bdev `name` with UUID `uuid`, for a bdev of SPDK module `module`.
fn recreate(module: Option<&str>, r: &BackingIdentity, uuid: &str) -> String {
    let n = &r.name;
    let bs = r.block_size;
    let mib = r.sectors / 2048;
    match module {
        Some("aio") => format!(
            "`bdev_aio_delete {n}`, then `bdev_aio_create <its file> {n} {bs} -u {uuid}` (in a \
             JSON config: \"uuid\": \"{uuid}\" in its bdev_aio_create params)"
        ),
        Some("malloc") => format!(
            "`bdev_malloc_delete {n}`, then `bdev_malloc_create -b {n} -u {uuid} {mib} {bs}` (a \
             malloc bdev's contents do not survive a restart: only what the cache holds comes \
             back)"
        ),
        Some("delay") => format!(
            "`bdev_delay_delete {n}`, then `bdev_delay_create -b <its base bdev> -d {n} -r 0 -t 0 \
             -w 0 -n 0 -u {uuid}` (in a JSON config: \"uuid\": \"{uuid}\" in its \
             bdev_delay_create params)"
        ),
        Some("nvme") => format!(
            "an NVMe namespace's UUID comes from the device and does not change: a namespace \
             with another UUID is another namespace; attach the controller whose namespace has \
             UUID {uuid} as bdev '{n}'"
        ),
        _ => format!(
            "re-create bdev '{n}' with UUID {uuid}: `-u {uuid}` for bdev_aio_create, \
             bdev_malloc_create or bdev_delay_create (e.g. `bdev_aio_create <its file> {n} {bs} \
             -u {uuid}`), or \"uuid\": \"{uuid}\" in its create params of a JSON config"
        ),
    }
}

/// The refusal of a backing bdev of the recorded size but another identity.
pub(crate) fn mismatch_message(m: &Mismatch) -> String {
    let (r, f) = (m.recorded, m.found);
    let what_differs = if r.uuid == [0; 16] {
        "another name (the cache records no UUID)".to_string()
    } else if f.uuid == [0; 16] {
        "no UUID".to_string()
    } else if f.name != r.name {
        "another UUID and another name".to_string()
    } else {
        "another UUID".to_string()
    };
    let way_a = if r.uuid == [0; 16] {
        format!(
            "attach the cache with its backing bdev under the recorded name: `bdev_pcache_create \
             ... -d {}`",
            r.name
        )
    } else {
        let uuid = uuid_string(&r.uuid);
        format!(
            "bring back the backing bdev with the recorded UUID {uuid}: {}; then \
             `bdev_pcache_create {}` attaches the cache as it is",
            recreate(m.found_module, r, &uuid),
            m.create_args
                .replace(&format!("-d {}", f.name), &format!("-d {}", r.name))
        )
    };
    format!(
        "{} holds a pcache of backing bdev {}, but backing bdev {} has {what_differs}. It may \
         be the same device under a new identity (aio and malloc bdevs get a random UUID at \
         every start unless created with one, -u), or another backing device of the same size. {}. \
         Refusing to attach it; nothing was written to either bdev. Safe ways forward: (a) \
         {way_a}; (b) only after checking that '{}' is the very device this cache was written \
         for: `bdev_pcache_create {} --backing-uuid-mismatch accept` (JSON-RPC: \
         \"backing_uuid_mismatch\": \"accept\"), which attaches it with its data and records \
         the new identity in the cache, so later attaches need no option. Never accept \
         another device: pcache would serve that device's blocks from this cache and write \
         these writes back over its data.",
        capitalize(m.cache_label),
        describe_backing(r),
        describe_backing(f),
        capitalize(&describe_dirty(m.dirty_bytes)),
        f.name,
        m.create_args,
    )
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (BackingIdentity, BackingIdentity) {
        let recorded = BackingIdentity {
            sectors: 131072,
            block_size: 4096,
            uuid: [
                0x6b, 0x1f, 0x4c, 0x1e, 0x0d, 0x2a, 0x4c, 0x55, 0x9a, 0x57, 0x3e, 0x2f, 0x1c, 0x0a,
                0x00, 0x02,
            ],
            name: "Back0".into(),
        };
        let found = BackingIdentity {
            uuid: [0x11; 16],
            ..recorded.clone()
        };
        (recorded, found)
    }

    fn msg(found: &BackingIdentity, module: Option<&str>, dirty: Option<u64>) -> String {
        let (recorded, _) = ids();
        mismatch_message(&Mismatch {
            create_args: &format!("-b PC0 -c Cache0 -d {}", found.name),
            cache_label: "cache bdev 'Cache0'",
            recorded: &recorded,
            found,
            found_module: module,
            dirty_bytes: dirty,
        })
    }

    #[test]
    fn an_aio_bdev_with_a_new_uuid_gets_the_call_that_recreates_it() {
        let (_, found) = ids();
        let m = msg(&found, Some("aio"), Some(8 << 20));
        for want in [
            "Cache bdev 'Cache0' holds a pcache of backing bdev 'Back0'",
            "uuid 6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0002",
            "has another UUID",
            "8388608 bytes of acknowledged writes not yet written back",
            "`bdev_aio_create <its file> Back0 4096 -u 6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0002`",
            "`bdev_pcache_create -b PC0 -c Cache0 -d Back0` attaches the cache",
            "`bdev_pcache_create -b PC0 -c Cache0 -d Back0 --backing-uuid-mismatch accept`",
            "\"backing_uuid_mismatch\": \"accept\"",
            "Never accept another device",
            "nothing was written",
        ] {
            assert!(m.contains(want), "missing {want:?} in: {m}");
        }
        assert!(!m.to_lowercase().contains("wipe"), "{m}");
        assert!(!m.to_lowercase().contains("format"), "{m}");
    }

    #[test]
    fn what_the_cache_holds_is_always_said() {
        let (_, found) = ids();
        assert!(msg(&found, None, None).contains("may hold acknowledged writes not yet written"));
        assert!(msg(&found, None, Some(0)).contains("holds no dirty data"));
    }

    #[test]
    fn each_kind_of_bdev_gets_its_own_way_back() {
        let (_, found) = ids();
        let u = "6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0002";
        let malloc = msg(&found, Some("malloc"), None);
        assert!(
            malloc.contains(&format!("`bdev_malloc_create -b Back0 -u {u} 64 4096`")),
            "{malloc}"
        );
        let delay = msg(&found, Some("delay"), None);
        assert!(
            delay.contains(&format!("-d Back0 -r 0 -t 0 -w 0 -n 0 -u {u}`")),
            "{delay}"
        );
        let nvme = msg(&found, Some("nvme"), None);
        assert!(nvme.contains("another namespace"), "{nvme}");
        let other = msg(&found, None, None);
        assert!(other.contains(&format!("-u {u}")), "{other}");
    }

    #[test]
    fn another_name_and_no_uuid_are_named() {
        let (_, mut found) = ids();
        found.name = "Other0".into();
        let m = msg(&found, Some("aio"), None);
        assert!(m.contains("has another UUID and another name"), "{m}");
        // Way (a) attaches with the recorded bdev, (b) names the one found.
        assert!(
            m.contains("`bdev_pcache_create -b PC0 -c Cache0 -d Back0` attaches"),
            "{m}"
        );
        assert!(
            m.contains("-d Other0 --backing-uuid-mismatch accept"),
            "{m}"
        );
        found.uuid = [0; 16];
        assert!(msg(&found, None, None).contains("has no UUID"));
    }
}
