//! Read-only SPI helpers. pgrx's `Spi::get_one` and friends mark the transaction as writing
//! (they assign a transaction id), which would cost an xid and a commit record on every idle
//! worker loop, and make `redis_fetch` believe its caller had written. Reads go through here,
//! through kept plans (src/plans.rs): most of them run on every loop or every call.

use pgrx::datum::{DatumWithOid, FromDatum, IntoDatum};
use pgrx::spi::{Spi, SpiError};

/// First column of the first row; `None` when there is no row or the value is NULL.
pub fn one<T: FromDatum + IntoDatum>(
    sql: &str,
    args: &[DatumWithOid],
) -> Result<Option<T>, SpiError> {
    Spi::connect(|c| {
        let rows = crate::plans::select(c, sql, Some(1), args)?;
        match rows.into_iter().next() {
            Some(r) => r.get::<T>(1),
            None => Ok(None),
        }
    })
}

/// First two columns of the first row.
pub fn two<A: FromDatum + IntoDatum, B: FromDatum + IntoDatum>(
    sql: &str,
    args: &[DatumWithOid],
) -> Result<(Option<A>, Option<B>), SpiError> {
    Spi::connect(|c| {
        let rows = crate::plans::select(c, sql, Some(1), args)?;
        match rows.into_iter().next() {
            Some(r) => Ok((r.get::<A>(1)?, r.get::<B>(2)?)),
            None => Ok((None, None)),
        }
    })
}
