//! The open/format driver: runs the engine's [`Opener`] (superblock replicas, log replay)
//! with DMA reads of the cache bdev, formats a cache bdev that holds no pcache, and hands
//! the open cache to the team ([`Worker::spawn_team`]).
//!
//! Runs on the lead worker before the bdev is registered; calls device I/O
//! ([`devio`](super::devio)) and nothing above the worker.

use std::sync::Arc;

use super::devio::{Kind, Purpose};
use super::{OpenInfo, State, Worker};
use crate::engine::open::describe_backing;
use crate::engine::{format, Dev, FormatError, IoError, OpenError, OpenStep, Opener};
use crate::media::host::record_backing;
use crate::shell::identity::{mismatch_message, Mismatch};
use crate::spdk::log::spdk_log;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FormatPhase {
    Idle,
    Writes { left: u32, failed: bool },
    Flush,
}

impl Worker {
    pub(super) fn open_begin(&mut self) {
        let opener = Opener::new(self.identity.clone(), self.copts.clone());
        let step = opener.start();
        self.opener = Some(opener);
        self.open_handle(step);
    }

    pub(super) fn fail_open(&mut self, msg: String) {
        self.open_error = Some(msg);
        self.opener = None;
        self.state = State::Quiescing;
    }

    pub(super) fn open_handle(&mut self, step: OpenStep) {
        match step {
            OpenStep::Read { sector, sectors } => {
                let len = sectors.saturating_mul(512);
                let mut d = self.new_dio(Purpose::Open, 0, Kind::Read, Dev::Cache);
                let held = usize::try_from(len)
                    .ok()
                    .and_then(|l| self.hold_buffer(&mut d, l));
                if held.is_none() {
                    self.recycle(d);
                    return self.fail_open(format!(
                        "cannot allocate a {len}-byte DMA buffer to read the cache bdev"
                    ));
                }
                if !self.set_range(&mut d, sector, sectors) {
                    self.recycle(d);
                    return self.fail_open("open read out of range".into());
                }
                self.issue(d);
            }
            OpenStep::Done(cache) => {
                self.opener = None;
                let sb = cache.superblock().clone();
                let have = self.cache_bytes / 512;
                if sb.geometry.cache_sectors > have {
                    return self.fail_open(format!(
                        "the cache bdev holds a pcache of {} bytes but has only {} bytes",
                        sb.geometry.cache_sectors * 512,
                        self.cache_bytes
                    ));
                }
                let rebound = self.open_rebound.take();
                if rebound.is_some() {
                    if let Some(dax) = self.dax.as_mut() {
                        // A mapped cache: its superblock is written here, synchronously,
                        // before the bdev exists (a cache bdev's by the app thread).
                        if let Err(e) = record_backing(dax, &sb.backing) {
                            return self.fail_open(format!(
                                "the backing bdev was accepted but {e}; not attaching it (the \
                                 replicas are written one after the other, so at least one is \
                                 valid: the create can be retried)"
                            ));
                        }
                        spdk_log!(
                            NOTICE,
                            "{}: recorded backing bdev {} in the cache superblock",
                            self.name,
                            describe_backing(&sb.backing)
                        );
                    }
                }
                let info = OpenInfo {
                    gc_percent: cache.stats().gc_percent,
                    mode: cache.mode(),
                    seq_cutoff: cache.seq_cutoff(),
                    write_admission: cache.write_admission(),
                    dirty_bytes: cache.dirty_bytes(),
                    rebound,
                    sb,
                    formatted: self.formatted,
                    problems: std::mem::take(&mut self.open_problems),
                    team: Arc::from(Vec::new()),
                };
                self.spawn_team(cache, info);
            }
            OpenStep::Failed(OpenError::NoSuperblock {
                a: FormatError::BadMagic { .. },
                b: FormatError::BadMagic { .. },
            }) if !self.formatted => self.format_begin(),
            OpenStep::Failed(OpenError::BackingIdentity {
                recorded,
                found,
                dirty_bytes,
            }) => {
                let d = &self.describe;
                let msg = mismatch_message(&Mismatch {
                    create_args: &d.create_args,
                    cache_label: &d.cache_label,
                    recorded: &recorded,
                    found: &found,
                    found_module: d.backing_module.as_deref(),
                    dirty_bytes,
                });
                self.fail_open(format!("cannot open the cache: {msg}"));
            }
            OpenStep::Failed(e) => {
                let hint = match &e {
                    OpenError::BackingMismatch { .. } => {
                        " (the sizes differ, so this is another device, or a resized one the cache no longer fits: refused, with no option to accept it; nothing was written. The cache may hold writes of its own backing device not yet written back: attach it with that device; wiping or reformatting the cache bdev would lose those writes)"
                    }
                    OpenError::NoSuperblock { .. } => {
                        " (a damaged pcache superblock: refusing to format over it; check it offline with `pcache check`; wiping the cache bdev to start afresh loses any writes not yet written back)"
                    }
                    _ => "",
                };
                self.fail_open(format!("cannot open the cache: {e}{hint}"));
            }
        }
    }

    pub(super) fn open_read_done(&mut self, data: Result<Vec<u8>, IoError>) {
        let Some(opener) = self.opener.as_mut() else {
            return;
        };
        let step = opener.step(data);
        if let OpenStep::Done(_) = step {
            // Keep the report for `OpenInfo` (the opener is dropped once done).
            self.open_problems = opener.report().problems.clone();
            self.open_rebound = opener.report().backing_rebound.clone();
            for p in &self.open_problems {
                spdk_log!(NOTICE, "{}: open: {p}", self.name);
            }
        }
        self.open_handle(step);
    }

    pub(super) fn format_begin(&mut self) {
        self.opener = None;
        let (_, writes) = match format(self.cache_bytes, self.identity.clone(), &self.fopts) {
            Ok(w) => w,
            Err(e) => return self.fail_open(format!("cannot format the cache bdev: {e}")),
        };
        spdk_log!(
            NOTICE,
            "{}: cache bdev holds no pcache: formatting ({} bytes)",
            self.name,
            self.cache_bytes
        );
        self.formatted = true;
        self.format_phase = FormatPhase::Writes {
            left: writes.len() as u32,
            failed: false,
        };
        for (sector, bytes) in writes {
            let mut d = self.new_dio(Purpose::Format, 0, Kind::Write, Dev::Cache);
            let ok = self.attach_vec(&mut d, bytes);
            let sectors = d.sectors;
            if !ok || !self.set_range(&mut d, sector, sectors) {
                self.recycle(d);
                self.format_io_done(false);
                continue;
            }
            self.issue(d);
        }
    }

    pub(super) fn format_io_done(&mut self, ok: bool) {
        match self.format_phase {
            FormatPhase::Writes { left, failed } => {
                let failed = failed || !ok;
                if left > 1 {
                    self.format_phase = FormatPhase::Writes {
                        left: left - 1,
                        failed,
                    };
                    return;
                }
                if failed {
                    self.format_phase = FormatPhase::Idle;
                    return self
                        .fail_open("a write to the cache bdev failed while formatting".into());
                }
                if self.flush_ok[0] {
                    self.format_phase = FormatPhase::Flush;
                    let mut d = self.new_dio(Purpose::Format, 0, Kind::Flush, Dev::Cache);
                    d.offset = 0;
                    d.blocks = self.blocks[0];
                    self.issue(d);
                } else {
                    self.format_phase = FormatPhase::Idle;
                    self.open_begin();
                }
            }
            FormatPhase::Flush => {
                self.format_phase = FormatPhase::Idle;
                if ok {
                    self.open_begin();
                } else {
                    self.fail_open("flushing the cache bdev after formatting failed".into());
                }
            }
            FormatPhase::Idle => {}
        }
    }
}
