//! The row as `row_to_json` renders it, with the per-column work done once, not per row.
//!
//! `row_to_json` looks up, for every row, the row type's descriptor and, for every column, its
//! base type, JSON category and output function (syscache lookups and an `fmgr_info` each): a
//! fifth of the backend's time in a bulk INSERT into a mirrored table (bench/profile.py bulk).
//! Here they are looked up once (native.rs keeps the renderer per table until the table's
//! mirror or columns change) and each row only runs the output functions and
//! `JsonEncodeDateTime`, in the order and with the rules of `composite_to_json` /
//! `datum_to_json` (PostgreSQL 15, utils/adt/json.c), so the text is the same byte for byte
//! (tests/test_mirror.py, test_json_text_is_row_to_json_byte_for_byte). Columns that
//! `row_to_json` renders by recursion (arrays, composites) are left to it: `new` says None.
//!
//! Every call into PostgreSQL goes through pgrx's guard (a setjmp, a thread check): with a
//! dozen per row they were ~6 % of a COPY's samples (bench/profile.py copy). So what needs no
//! catalog knowledge runs in Rust: integers and text-like columns are read from the datum
//! itself (their output functions only copy or print them), strings are escaped by serde_json
//! (the same bytes as `escape_json` for UTF-8; anything else goes to `escape_json`), and the
//! buffer is appended to directly, calling PostgreSQL only to grow it.

use pgrx::pg_sys;
use std::ffi::{c_char, c_int, CStr};
use std::io::Write;

extern "C-unwind" {
    // common/jsonapi.h: not in pgrx's bindings. Pure parsing, it cannot raise an error.
    fn IsValidJsonNumber(str: *const c_char, len: c_int) -> bool;
}

/// Column types whose text is read straight from the datum, without their output function.
#[derive(Clone, Copy)]
pub(crate) enum Direct {
    Int2,
    Int4,
    Int8,
    /// text, varchar, bpchar, json: the output function returns the varlena's bytes as they are.
    Text,
}

impl Direct {
    /// For a column's base type.
    pub(crate) fn of(typid: pg_sys::Oid) -> Option<Direct> {
        match typid {
            pg_sys::INT2OID => Some(Direct::Int2),
            pg_sys::INT4OID => Some(Direct::Int4),
            pg_sys::INT8OID => Some(Direct::Int8),
            pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID | pg_sys::JSONOID => {
                Some(Direct::Text)
            }
            _ => None,
        }
    }

    /// The value's text as its output function would give it (not escaped), appended to `out`.
    ///
    /// # Safety
    /// `value` is a non-null datum of the type this was made for.
    pub(crate) unsafe fn write(self, value: pg_sys::Datum, out: &mut impl Write) {
        // Writing to a Buf or a Vec cannot fail.
        let _ = match self {
            Direct::Int2 => write!(out, "{}", value.value() as i16),
            Direct::Int4 => write!(out, "{}", value.value() as i32),
            Direct::Int8 => write!(out, "{}", value.value() as i64),
            Direct::Text => out.write_all(text_bytes(value)),
        };
    }
}

/// The bytes of a text-like datum, detoasted (into the current memory context) if need be.
///
/// # Safety
/// `value` is a non-null varlena datum.
pub(crate) unsafe fn text_bytes<'a>(value: pg_sys::Datum) -> &'a [u8] {
    let mut v = value.cast_mut_ptr::<pg_sys::varlena>();
    // pg_detoast_datum_packed's test: only compressed or out-of-line values need work.
    if pgrx::varlena::varatt_is_4b_c(v) || pgrx::varlena::varatt_is_1b_e(v) {
        v = pg_sys::pg_detoast_datum_packed(v);
    }
    pgrx::varlena::varlena_to_byte_slice(v)
}

/// A StringInfo appended to in Rust; PostgreSQL is called only to enlarge it (its errors, such
/// as a value past 1 GB, stay PostgreSQL's).
pub(crate) struct Buf(pg_sys::StringInfo);

impl Buf {
    /// # Safety
    /// `s` is an initialised StringInfo that outlives the Buf.
    pub(crate) unsafe fn new(s: pg_sys::StringInfo) -> Buf {
        Buf(s)
    }

    pub(crate) fn put(&mut self, b: &[u8]) {
        // SAFETY: `new`'s contract; enlargeStringInfo leaves room for b and the trailing NUL.
        unsafe {
            let s = &mut *self.0;
            if s.len as usize + b.len() >= s.maxlen as usize {
                pg_sys::enlargeStringInfo(self.0, b.len().min(i32::MAX as usize) as c_int);
            }
            let s = &mut *self.0;
            std::ptr::copy_nonoverlapping(b.as_ptr(), s.data.add(s.len as usize).cast(), b.len());
            s.len += b.len() as c_int;
            *s.data.add(s.len as usize) = 0;
        }
    }

    /// The string as `escape_json` renders it, quotes included.
    pub(crate) fn escape(&mut self, s: &[u8]) {
        // serde_json escapes exactly the bytes escape_json does (", \, and below 0x20, with the
        // same short forms and lowercase \u00xx); it needs UTF-8, which anything else is not.
        if let Ok(t) = std::str::from_utf8(s) {
            if serde_json::to_writer(&mut *self, t).is_ok() {
                return;
            }
        }
        // SAFETY: a NUL-terminated copy for escape_json (text holds no NUL bytes).
        unsafe {
            let c = pg_sys::pnstrdup(s.as_ptr().cast(), s.len());
            pg_sys::escape_json(self.0, c);
            pg_sys::pfree(c.cast());
        }
    }

    /// Empty the buffer; one that a large row grew past 1 MB is given back first.
    pub(crate) fn clear(&mut self) {
        // SAFETY: `new`'s contract.
        unsafe {
            let s = &mut *self.0;
            if s.maxlen > 1 << 20 {
                // repalloc keeps the buffer in its own memory context.
                s.data = pg_sys::repalloc(s.data.cast(), 1024).cast();
                s.maxlen = 1024;
            }
            let s = &mut *self.0;
            s.len = 0;
            s.cursor = 0;
            *s.data = 0;
        }
    }

    /// What is in the buffer.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `new`'s contract.
        unsafe { std::slice::from_raw_parts((*self.0).data as *const u8, (*self.0).len as usize) }
    }
}

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.put(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Category {
    Bool,
    /// int2, int4, int8: always a valid JSON number, printed from the datum.
    Integer(Direct),
    /// float4, float8, numeric: a number unless NaN or an infinity (then a JSON string).
    Number,
    /// date, timestamp, timestamptz: ISO 8601 through `JsonEncodeDateTime`.
    DateTime(pg_sys::Oid),
    /// json: its text is JSON already.
    Json,
    /// jsonb: its output is JSON.
    Jsonb,
    /// text, varchar, bpchar: the datum's bytes as a JSON string.
    Text,
    /// Everything else: its output as a JSON string.
    Other,
}

struct Column {
    /// 0-based attribute number in the slot.
    index: usize,
    /// `{"name":` for the first column, `,"name":` for the others.
    head: Vec<u8>,
    category: Category,
    /// The type's output function, looked up once (for numbers, jsonb and other types).
    output: Box<pg_sys::FmgrInfo>,
}

pub struct RowJson {
    columns: Vec<Column>,
}

impl RowJson {
    /// The renderer for rows of `desc`; None when a column is one `row_to_json` renders by
    /// recursion (an array or a composite): the caller uses `row_to_json` then.
    ///
    /// # Safety
    /// `desc` is a valid tuple descriptor; the renderer lives in the current memory context.
    pub unsafe fn new(desc: pg_sys::TupleDesc) -> Option<RowJson> {
        let natts = (*desc).natts as usize;
        let attrs = (*desc).attrs.as_slice(natts);
        let mut columns = Vec::with_capacity(natts);
        let name_buf = pg_sys::makeStringInfo(); // the column heads' scratch space
        for (index, a) in attrs.iter().enumerate() {
            if a.attisdropped {
                continue;
            }
            let typid = pg_sys::getBaseType(a.atttypid);
            let category = match typid {
                pg_sys::BOOLOID => Category::Bool,
                pg_sys::INT2OID => Category::Integer(Direct::Int2),
                pg_sys::INT4OID => Category::Integer(Direct::Int4),
                pg_sys::INT8OID => Category::Integer(Direct::Int8),
                pg_sys::FLOAT4OID | pg_sys::FLOAT8OID | pg_sys::NUMERICOID => Category::Number,
                pg_sys::DATEOID | pg_sys::TIMESTAMPOID | pg_sys::TIMESTAMPTZOID => {
                    Category::DateTime(typid)
                }
                pg_sys::JSONOID => Category::Json,
                pg_sys::JSONBOID => Category::Jsonb,
                pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => Category::Text,
                _ if pg_sys::get_element_type(typid) != pg_sys::InvalidOid
                    || typid == pg_sys::ANYARRAYOID
                    || typid == pg_sys::ANYCOMPATIBLEARRAYOID
                    || typid == pg_sys::RECORDARRAYOID
                    || pg_sys::type_is_rowtype(typid) =>
                {
                    return None
                }
                // A type of an extension may have a cast to json that row_to_json would use.
                _ if typid.to_u32() >= pg_sys::FirstNormalObjectId => return None,
                _ => Category::Other,
            };
            let mut output = Box::new(std::mem::zeroed::<pg_sys::FmgrInfo>());
            if matches!(
                category,
                Category::Number | Category::Jsonb | Category::Other
            ) {
                let mut func = pg_sys::InvalidOid;
                let mut varlena = false;
                pg_sys::getTypeOutputInfo(typid, &mut func, &mut varlena);
                pg_sys::fmgr_info(func, output.as_mut());
            }
            pg_sys::resetStringInfo(name_buf);
            pg_sys::appendStringInfoChar(
                name_buf,
                if columns.is_empty() { b'{' } else { b',' } as c_char,
            );
            pg_sys::escape_json(name_buf, a.attname.data.as_ptr());
            pg_sys::appendStringInfoChar(name_buf, b':' as c_char);
            let head =
                std::slice::from_raw_parts((*name_buf).data as *const u8, (*name_buf).len as usize)
                    .to_vec();
            columns.push(Column {
                index,
                head,
                category,
                output,
            });
        }
        pg_sys::pfree((*name_buf).data.cast());
        pg_sys::pfree(name_buf.cast());
        Some(RowJson { columns })
    }

    /// Append the row in the slot (its attributes deformed) to `buf`, as `row_to_json` renders
    /// it. What the output functions allocate goes to the current memory context (capture's,
    /// reset after each row).
    ///
    /// # Safety
    /// `slot` holds a row of the descriptor given to `new`, deformed.
    pub unsafe fn render(&mut self, slot: *mut pg_sys::TupleTableSlot, buf: &mut Buf) {
        if self.columns.is_empty() {
            buf.put(b"{");
        }
        for c in self.columns.iter_mut() {
            buf.put(&c.head);
            if *(*slot).tts_isnull.add(c.index) {
                buf.put(b"null");
                continue;
            }
            let value = *(*slot).tts_values.add(c.index);
            match c.category {
                Category::Bool => buf.put(if value.value() as u8 != 0 {
                    b"true"
                } else {
                    b"false"
                }),
                Category::Integer(d) => d.write(value, buf),
                Category::Text => buf.escape(text_bytes(value)),
                Category::Json => buf.put(text_bytes(value)),
                Category::DateTime(typid) => {
                    let mut date = [0 as c_char; pg_sys::MAXDATELEN as usize + 1];
                    pg_sys::JsonEncodeDateTime(date.as_mut_ptr(), value, typid, std::ptr::null());
                    buf.put(b"\"");
                    buf.put(CStr::from_ptr(date.as_ptr()).to_bytes());
                    buf.put(b"\"");
                }
                Category::Jsonb => {
                    let s = pg_sys::OutputFunctionCall(c.output.as_mut(), value);
                    buf.put(CStr::from_ptr(s).to_bytes());
                }
                Category::Number => {
                    let s = CStr::from_ptr(pg_sys::OutputFunctionCall(c.output.as_mut(), value));
                    let b = s.to_bytes();
                    if IsValidJsonNumber(s.as_ptr(), b.len() as c_int) {
                        buf.put(b);
                    } else {
                        buf.escape(b);
                    }
                }
                Category::Other => {
                    let s = pg_sys::OutputFunctionCall(c.output.as_mut(), value);
                    buf.escape(CStr::from_ptr(s).to_bytes());
                }
            }
        }
        buf.put(b"}");
    }
}
