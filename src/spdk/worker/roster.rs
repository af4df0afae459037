//! A pcache bdev's workers as the request path sees them: the lead, and, once the cache is
//! open with several, the whole team and which worker serves each stripe. Fixed before the
//! bdev is registered, then only read (from any thread).
//!
//! It is the first thing `bdev.ctxt` points at (`vbdev::Pcache` starts with `io::Front`,
//! which starts with this), so a worker finds its bdev's roster from a request alone
//! ([`Roster::of`]) without knowing the types above it. Calls only the routing rule
//! ([`crate::shell::routing`]).

use std::cell::OnceCell;
use std::ptr;
use std::sync::Arc;

use super::{Peer, Worker};
use crate::shell::routing::{Routing, Targets};
use crate::spdk::ffi::{self, spdk_bdev_io_type as t};
use crate::spdk::msg;

/// Where a request goes (see [`Roster::route`]).
pub(crate) enum Route {
    One(Peer),
    Many(Vec<Peer>),
}

pub(crate) struct Roster {
    /// The lead worker, its thread, core and inbox; set before the lead starts and before
    /// registration, never changed afterwards. The worker is only dereferenced on its
    /// thread.
    lead: Peer,
    /// The worker threads when there are several (set before registration, then fixed),
    /// and where requests go: which worker serves each stripe.
    team: OnceCell<(Arc<[Peer]>, Routing)>,
}

impl Roster {
    /// No worker yet.
    pub(crate) fn new() -> Self {
        Roster {
            lead: Peer {
                thread: ptr::null_mut(),
                worker: ptr::null_mut(),
                wid: 0,
                core: None,
                inbox: ptr::null(),
            },
            team: OnceCell::new(),
        }
    }

    /// The roster of `io`'s bdev.
    ///
    /// # Safety
    /// `io` is a pending request of a pcache bdev: its `bdev.ctxt` is the bdev's live node,
    /// whose first field (at offset 0, asserted in `vbdev` and `io`) is its roster.
    pub(crate) unsafe fn of<'a>(io: *mut ffi::spdk_bdev_io) -> &'a Roster {
        // SAFETY: per the contract.
        unsafe { &*(*(*io).bdev).ctxt.cast::<Roster>() }
    }

    pub(crate) fn lead(&self) -> Peer {
        self.lead
    }

    /// Before the lead starts taking requests (before registration).
    pub(crate) fn set_lead(&mut self, lead: Peer) {
        self.lead = lead;
    }

    /// The worker threads (empty when the lead worker serves everything).
    pub(crate) fn team(&self) -> &[Peer] {
        self.team.get().map_or(&[], |(t, _)| t)
    }

    /// Sets the team and its routing, once, before registration.
    pub(crate) fn set_team(&self, team: Arc<[Peer]>, routing: Routing) {
        let _ = self.team.set((team, routing));
    }

    /// The worker of this bdev that runs on the current thread (the lead if none does).
    /// The worker on `core`, if this bdev has one there.
    pub(crate) fn on_core(&self, core: u32) -> Option<Peer> {
        let team = self.team();
        let all = if team.is_empty() {
            std::slice::from_ref(&self.lead)
        } else {
            team
        };
        all.iter().copied().find(|p| p.core == Some(core))
    }

    pub(crate) fn here(&self) -> *mut Worker {
        let here = msg::current();
        self.team()
            .iter()
            .find(|p| p.thread == here)
            .map_or_else(|| self.lead.worker, |p| p.worker)
    }

    /// Which workers `io` concerns: its stripes' shards' workers (all of them for a flush
    /// or a reset), or the lead alone when it has no team.
    pub(crate) fn route(&self, io: *mut ffi::spdk_bdev_io) -> Route {
        let Some((team, r)) = self.team.get() else {
            return Route::One(self.lead);
        };
        // SAFETY: a live request of this bdev; `u.bdev` holds its range for the block
        // types (integer fields read by value).
        let (ty, offset, num) = unsafe {
            let b = ffi::bdev_io_block(io);
            (
                t::Type::from((*io).type_),
                (*b).offset_blocks,
                (*b).num_blocks,
            )
        };
        let ranged = matches!(
            ty,
            t::SPDK_BDEV_IO_TYPE_READ
                | t::SPDK_BDEV_IO_TYPE_WRITE
                | t::SPDK_BDEV_IO_TYPE_UNMAP
                | t::SPDK_BDEV_IO_TYPE_WRITE_ZEROES
        );
        match r.targets(team.len(), ranged, offset, num) {
            Targets::One(k) => Route::One(team[k]),
            Targets::All => Route::Many(team.to_vec()),
            Targets::Some(ks) => Route::Many(ks.into_iter().map(|k| team[k]).collect()),
        }
    }
}
