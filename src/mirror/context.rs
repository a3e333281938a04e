//! Running code as someone else, safely: the table's owner (for filters and type output, with a
//! fixed search_path and rendering settings) or the extension's owner (for the internal tables).
//! PostgreSQL restores the user id and settings itself when an ERROR aborts the (sub)transaction.

use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::{CStr, CString};

thread_local! {
    static EXT_OWNER: Cell<Option<pg_sys::Oid>> = const { Cell::new(None) };
}

/// The owner of the extension's internal schema: the role the internal tables belong to.
pub fn ext_owner() -> pg_sys::Oid {
    if let Some(o) = EXT_OWNER.with(|c| c.get()) {
        return o;
    }
    let o = crate::spi_read::one::<pg_sys::Oid>(
        "SELECT nspowner FROM pg_catalog.pg_namespace WHERE nspname = 'redis_internal'",
        &[],
    )
    .ok()
    .flatten()
    .unwrap_or(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID));
    EXT_OWNER.with(|c| c.set(Some(o)));
    o
}

/// Run `f` as `role`. With `restricted`, as a security-restricted operation (no SET ROLE, no
/// temp objects), the way PostgreSQL runs maintenance code as a table's owner.
///
/// The caller's search_path never applies to what runs as someone else: an operator or function
/// the caller put earlier in the path would otherwise run with `role`'s rights (a writer could
/// make itself superuser through the extension owner's internal queries). Internal SQL is
/// written for `pg_catalog, pg_temp` and standard_conforming_strings on.
pub fn as_role<R>(role: pg_sys::Oid, restricted: bool, f: impl FnOnce() -> R) -> R {
    with_settings(&SAFE_SETTINGS, || as_role_only(role, restricted, f))
}

const SAFE_SETTINGS: [(&str, &str); 2] = [
    ("search_path", "pg_catalog, pg_temp"),
    ("standard_conforming_strings", "on"),
];

pub fn as_role_only<R>(role: pg_sys::Oid, restricted: bool, f: impl FnOnce() -> R) -> R {
    let mut save_uid = pg_sys::InvalidOid;
    let mut save_ctx = 0i32;
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut save_uid, &mut save_ctx);
        let mut ctx = save_ctx | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32;
        if restricted {
            ctx |= pg_sys::SECURITY_RESTRICTED_OPERATION as i32;
        }
        pg_sys::SetUserIdAndSecContext(role, ctx);
    }
    let r = f();
    unsafe { pg_sys::SetUserIdAndSecContext(save_uid, save_ctx) };
    r
}

pub const RENDER_SETTINGS: [(&str, &str); 7] = [
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
    ("search_path", "pg_catalog, pg_temp"),
    ("standard_conforming_strings", "on"),
];

/// Run `f` with the settings that make rendering independent of the session: UTC timestamps,
/// ISO dates, full-precision floats, hex bytea, and a search_path of pg_catalog only.
pub fn with_render_settings<R>(f: impl FnOnce() -> R) -> R {
    with_settings(&RENDER_SETTINGS, f)
}

/// Delivery's statements run with generic plans only: a custom plan is made for the queue's size
/// as last vacuumed, and the DELETE of a delivered batch by TID planned for a queue vacuumed
/// empty (while a backlog of a million rows has been queued since) became a sequential scan that
/// compared every row with every TID of the batch: a drain stalled for minutes (bench P3). The
/// generic plans (a TID scan, the id index) do not depend on the queue's size.
pub const DELIVERY_SETTINGS: [(&str, &str); 1] = [("plan_cache_mode", "force_generic_plan")];

/// Run `f` with DELIVERY_SETTINGS.
pub fn with_delivery_settings<R>(f: impl FnOnce() -> R) -> R {
    with_settings(&DELIVERY_SETTINGS, f)
}

/// The worker runs only internal SQL: it makes the render and safe settings its session's own
/// once, so that `as_role` and `with_render_settings` find nothing to change on every batch.
/// Inside a transaction.
pub fn adopt_internal_settings() {
    for (name, value) in RENDER_SETTINGS
        .iter()
        .chain(SAFE_SETTINGS.iter())
        .chain(DELIVERY_SETTINGS.iter())
    {
        let (n, v) = (
            CString::new(*name).unwrap_or_default(),
            CString::new(*value).unwrap_or_default(),
        );
        set(&n, &v, pg_sys::GucAction::GUC_ACTION_SET);
    }
}

/// `with_render_settings` limited to the settings given (a subset of RENDER_SETTINGS that a
/// mirror's rendering depends on, Mirror::render_settings).
pub fn with_some_render_settings<R>(settings: &[(&str, &str)], f: impl FnOnce() -> R) -> R {
    with_settings(settings, f)
}

/// A session time zone of fixed offset zero (UTC, Etc/UTC, GMT, ...) renders as 'UTC' does.
fn utc_already() -> bool {
    let mut offset: std::ffi::c_long = 1;
    unsafe {
        !pg_sys::session_timezone.is_null()
            && pg_sys::pg_get_timezone_offset(pg_sys::session_timezone, &mut offset)
            && offset == 0
    }
}

/// Set a setting as a session's SET would (`action`: for the session, for the transaction, or
/// saved for a nest level).
fn set(name: &CStr, value: &CStr, action: pg_sys::GucAction::Type) {
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            0,
            false,
        );
    }
}

/// SET LOCAL: until the current transaction ends.
pub fn set_for_transaction(name: &CStr, value: &CStr) {
    set(name, value, pg_sys::GucAction::GUC_ACTION_LOCAL);
}

/// Run `f` with the settings given (session-local, undone afterwards and on error).
fn with_settings<R>(settings: &[(&str, &str)], f: impl FnOnce() -> R) -> R {
    // A nest level only when something is set: popping one walks every setting (PostgreSQL 15).
    let mut nest = None;
    for &(name, value) in settings {
        let (n, v) = (
            CString::new(name).unwrap_or_default(),
            CString::new(value).unwrap_or_default(),
        );
        // Most sessions already have most of these: setting a GUC is not free (search_path
        // also makes the next name lookup recompute the path), so only what differs is set.
        if name == "TimeZone" && value == "UTC" && utc_already() {
            continue;
        }
        let current = unsafe { pg_sys::GetConfigOption(n.as_ptr(), true, false) };
        if !current.is_null() && unsafe { CStr::from_ptr(current) } == v.as_c_str() {
            continue;
        }
        if nest.is_none() {
            nest = Some(unsafe { pg_sys::NewGUCNestLevel() });
        }
        set(&n, &v, pg_sys::GucAction::GUC_ACTION_SAVE);
    }
    let r = f();
    if let Some(nest) = nest {
        unsafe { pg_sys::AtEOXact_GUC(true, nest) };
    }
    r
}
