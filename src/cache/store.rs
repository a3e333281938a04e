//! The shared read cache's memory: a set-associative table in shared memory, sized once at server
//! start by `pg_redis.cache_size`. Each set has its own spinlock (held only to copy bytes in or
//! out: nothing in a critical section can raise an ERROR) and a version that every invalidation
//! of a key in the set raises. A backend takes a `Ticket` before it asks Redis and fills the cache
//! with the answer only if neither the set's version nor the cache's epoch moved meanwhile: an
//! invalidation that raced the read wins, so no stale value is left behind.
//!
//! The epoch is raised by a flush (FLUSHALL seen, the tracker lost or regained Redis): entries of
//! an older epoch are dead at once, without touching them.

use pgrx::pg_sys;
use std::ffi::CStr;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

const WAYS: usize = 4;
/// Key and value bytes one entry holds; larger pairs are not cached.
pub const ENTRY_BYTES: usize = 1000;

#[repr(C)]
struct Header {
    /// 1 while the tracker follows Redis' invalidations; entries are used only then.
    online: AtomicU32,
    tracker_pid: AtomicI32,
    /// Which connection settings the tracker follows (a hash of the link's fingerprint).
    fingerprint: AtomicU64,
    epoch: AtomicU64,
    sets: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    fills: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
}

#[repr(C)]
struct Slot {
    /// The epoch it was filled in; 0 = empty.
    epoch: u64,
    /// µs since the PostgreSQL epoch after which the entry is dead (Redis' TTL); 0 = never.
    expires_at: i64,
    hash: u64,
    last_used: u64,
    key_len: u16,
    value_len: u16,
    data: [u8; ENTRY_BYTES],
}

#[repr(C)]
struct Set {
    lock: AtomicU32,
    version: AtomicU64,
    clock: u64,
    slots: [Slot; WAYS],
}

static mut REGION: *mut Header = std::ptr::null_mut();
static mut BYTES: usize = 0;
static mut PREV_REQUEST: Option<unsafe extern "C-unwind" fn()> = None;
static mut PREV_STARTUP: Option<unsafe extern "C-unwind" fn()> = None;
const NAME: &CStr = c"pg_redis shared read cache";

fn region_size(bytes: usize) -> usize {
    let sets = (bytes / std::mem::size_of::<Set>()).max(1);
    std::mem::size_of::<Header>() + sets * std::mem::size_of::<Set>()
}

/// In `_PG_init` of a preloaded library: ask for the memory and set it up at startup.
pub fn init_preloaded(bytes: usize) {
    unsafe {
        BYTES = bytes;
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_request);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_startup);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_request() {
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(region_size(BYTES));
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_startup() {
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
        let size = region_size(BYTES);
        // AddinShmemInitLock is the 22nd of the main LWLocks (lwlocknames.h), as pgrx uses it.
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let p = pg_sys::ShmemInitStruct(NAME.as_ptr(), size, &mut found) as *mut Header;
        if !found {
            // All zero is a valid empty cache (epoch 0 entries are empty); then epoch 1.
            std::ptr::write_bytes(p as *mut u8, 0, size);
            (*p).sets =
                ((size - std::mem::size_of::<Header>()) / std::mem::size_of::<Set>()) as u64;
            (*p).epoch.store(1, Ordering::Relaxed);
        }
        pg_sys::LWLockRelease(init_lock);
        REGION = p;
    }
}

fn header() -> Option<&'static Header> {
    // Set once in the postmaster before any backend forks; read-only afterwards.
    unsafe { REGION.as_ref() }
}

/// Is there a cache at all (`pg_redis.cache_size` > 0 in a preloaded library)?
pub fn exists() -> bool {
    header().is_some()
}

fn set(h: &Header, i: u64) -> &Set {
    unsafe { &*((h as *const Header).add(1) as *const Set).add(i as usize) }
}

fn hash(key: &[u8]) -> u64 {
    // SipHash with fixed keys: the same in every process.
    let mut s = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut s);
    s.finish()
}

struct Locked<'a>(&'a Set);

impl<'a> Locked<'a> {
    fn new(s: &'a Set) -> Self {
        let mut spins = 0u32;
        while s
            .lock
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        Locked(s)
    }

    #[allow(clippy::mut_from_ref)]
    fn slots(&self) -> &mut [Slot; WAYS] {
        // Exclusive while the lock is held.
        unsafe { &mut *(std::ptr::addr_of!(self.0.slots) as *mut [Slot; WAYS]) }
    }

    #[allow(clippy::mut_from_ref)]
    fn clock(&self) -> &mut u64 {
        unsafe { &mut *(std::ptr::addr_of!(self.0.clock) as *mut u64) }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.0.lock.store(0, Ordering::Release);
    }
}

fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn live(slot: &Slot, epoch: u64, hash: u64, key: &[u8], at: i64) -> bool {
    slot.epoch == epoch
        && slot.hash == hash
        && slot.key_len as usize == key.len()
        && &slot.data[..key.len()] == key
        && (slot.expires_at == 0 || at < slot.expires_at)
}

/// Taken before a read from Redis; the read's answer may fill the cache only with it.
pub struct Ticket {
    set: u64,
    hash: u64,
    version: u64,
    epoch: u64,
}

/// A ticket when the cache follows the connection settings whose fingerprint hashes to `fp`.
pub fn ticket(key: &[u8], fp: u64) -> Option<Ticket> {
    let h = header()?;
    if h.online.load(Ordering::Acquire) != 1 || h.fingerprint.load(Ordering::Acquire) != fp {
        return None;
    }
    let hash = hash(key);
    let set_index = hash % h.sets;
    let s = set(h, set_index);
    // The epoch is read before the version: a flush after this makes the fill fail.
    let epoch = h.epoch.load(Ordering::Acquire);
    let version = s.version.load(Ordering::Acquire);
    Some(Ticket {
        set: set_index,
        hash,
        version,
        epoch,
    })
}

/// The cached value of `key`, if it is there and alive.
pub fn lookup(t: &Ticket, key: &[u8]) -> Option<Vec<u8>> {
    let h = header()?;
    let s = set(h, t.set);
    let at = now();
    let l = Locked::new(s);
    // The epoch now, not the ticket's: a flush since the ticket was taken counts.
    let epoch = h.epoch.load(Ordering::Acquire);
    let clock = {
        let c = l.clock();
        *c += 1;
        *c
    };
    let found = (h.online.load(Ordering::Acquire) == 1)
        .then(|| {
            l.slots()
                .iter_mut()
                .find(|e| live(e, epoch, t.hash, key, at))
        })
        .flatten();
    let v = found.map(|e| {
        e.last_used = clock;
        e.data[e.key_len as usize..e.key_len as usize + e.value_len as usize].to_vec()
    });
    drop(l);
    let counter = if v.is_some() { &h.hits } else { &h.misses };
    counter.fetch_add(1, Ordering::Relaxed);
    v
}

/// Keep `value` of `key` (read from Redis under `t`) unless something invalidated it meanwhile.
/// `expires_at`: when Redis' TTL ends (µs since the PostgreSQL epoch), 0 for none.
pub fn fill(t: &Ticket, key: &[u8], value: &[u8], expires_at: i64) {
    let Some(h) = header() else { return };
    if key.len() + value.len() > ENTRY_BYTES {
        return;
    }
    let s = set(h, t.set);
    let l = Locked::new(s);
    // Both checked under the set's lock, which every invalidation of the set takes too.
    if s.version.load(Ordering::Acquire) != t.version
        || h.epoch.load(Ordering::Acquire) != t.epoch
        || h.online.load(Ordering::Acquire) != 1
    {
        return;
    }
    let clock = {
        let c = l.clock();
        *c += 1;
        *c
    };
    let slots = l.slots();
    let at = now();
    let i = slots
        .iter()
        .position(|e| {
            e.epoch == t.epoch && e.hash == t.hash && &e.data[..e.key_len as usize] == key
        })
        .or_else(|| {
            slots
                .iter()
                .position(|e| e.epoch != t.epoch || (e.expires_at != 0 && at >= e.expires_at))
        })
        .unwrap_or_else(|| (0..WAYS).min_by_key(|&i| slots[i].last_used).unwrap_or(0));
    let e = &mut slots[i];
    e.epoch = t.epoch;
    e.expires_at = expires_at;
    e.hash = t.hash;
    e.last_used = clock;
    e.key_len = key.len() as u16;
    e.value_len = value.len() as u16;
    e.data[..key.len()].copy_from_slice(key);
    e.data[key.len()..key.len() + value.len()].copy_from_slice(value);
    drop(l);
    h.fills.fetch_add(1, Ordering::Relaxed);
}

/// `key` changed in Redis (or may have): drop it, and fail every fill of its set in flight.
pub fn invalidate(key: &[u8]) {
    let Some(h) = header() else { return };
    let hash = hash(key);
    let s = set(h, hash % h.sets);
    let l = Locked::new(s);
    s.version.fetch_add(1, Ordering::AcqRel);
    for e in l.slots().iter_mut() {
        if e.hash == hash && e.key_len as usize == key.len() && &e.data[..key.len()] == key {
            e.epoch = 0;
        }
    }
    drop(l);
    h.invalidations.fetch_add(1, Ordering::Relaxed);
}

/// Drop everything (FLUSHALL, or invalidations may have been missed).
pub fn flush() {
    if let Some(h) = header() {
        h.epoch.fetch_add(1, Ordering::AcqRel);
        h.flushes.fetch_add(1, Ordering::Relaxed);
    }
}

/// The tracker follows Redis' invalidations from now on (its subscription is in place).
pub fn go_online(fp: u64) {
    if let Some(h) = header() {
        h.online.store(0, Ordering::Release);
        h.fingerprint.store(fp, Ordering::Release);
        // Whatever was cached before the subscription may have changed unseen.
        flush();
        h.online.store(1, Ordering::Release);
    }
}

/// Invalidations may be missed from now on: stop using the cache, and drop it.
pub fn go_offline() {
    if let Some(h) = header() {
        h.online.store(0, Ordering::Release);
        flush();
    }
}

/// Does the tracker follow Redis now (the cache in use)?
pub fn online() -> bool {
    header().is_some_and(|h| h.online.load(Ordering::Acquire) == 1)
}

pub fn set_tracker_pid(pid: i32) {
    if let Some(h) = header() {
        h.tracker_pid.store(pid, Ordering::Relaxed);
    }
}

pub struct Info {
    pub online: bool,
    pub tracker_pid: i32,
    pub size_bytes: i64,
    pub capacity: i64,
    pub entries: i64,
    pub hits: i64,
    pub misses: i64,
    pub fills: i64,
    pub invalidations: i64,
    pub flushes: i64,
}

pub fn info() -> Option<Info> {
    let h = header()?;
    let epoch = h.epoch.load(Ordering::Acquire);
    let at = now();
    let mut entries = 0i64;
    for i in 0..h.sets {
        let l = Locked::new(set(h, i));
        entries += l
            .slots()
            .iter()
            .filter(|e| e.epoch == epoch && (e.expires_at == 0 || at < e.expires_at))
            .count() as i64;
    }
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed) as i64;
    Some(Info {
        online: h.online.load(Ordering::Acquire) == 1,
        tracker_pid: h.tracker_pid.load(Ordering::Relaxed),
        size_bytes: region_size(unsafe { BYTES }) as i64,
        capacity: (h.sets as usize * WAYS) as i64,
        entries,
        hits: n(&h.hits),
        misses: n(&h.misses),
        fills: n(&h.fills),
        invalidations: n(&h.invalidations),
        flushes: n(&h.flushes),
    })
}
