//! The row as `row_to_json` renders it, with the per-column work done once, not per row.
//!
//! `row_to_json` looks up, for every row, the row type's descriptor and, for every column, its
//! base type, JSON category and output function (syscache lookups and an `fmgr_info` each): a
//! fifth of the backend's time in a bulk INSERT into a mirrored table (bench/profile.py bulk).
//! Here they are looked up once (native.rs keeps the renderer per table until the table's
//! mirror or columns change) and each row only runs the output functions and PostgreSQL's own
//! `escape_json` / `JsonEncodeDateTime`, in the order and with the rules of `composite_to_json` /
//! `datum_to_json` (PostgreSQL 15, utils/adt/json.c), so the text is the same byte for byte
//! (tests/test_mirror.py, test_json_text_is_row_to_json_byte_for_byte). Columns that
//! `row_to_json` renders by recursion (arrays, composites) are left to it: `new` says None.

use pgrx::pg_sys;
use std::ffi::{c_char, c_int, CStr};

extern "C-unwind" {
    // common/jsonapi.h: not in pgrx's bindings. Pure parsing, it cannot raise an error.
    fn IsValidJsonNumber(str: *const c_char, len: c_int) -> bool;
}

enum Category {
    Bool,
    /// int2, int4, int8: their output is always a valid JSON number.
    Integer,
    /// float4, float8, numeric: a number unless NaN or an infinity (then a JSON string).
    Number,
    /// date, timestamp, timestamptz: ISO 8601 through `JsonEncodeDateTime`.
    DateTime(pg_sys::Oid),
    /// json, jsonb: their output is JSON already.
    Json,
    /// Everything else: its output as a JSON string.
    Other,
}

struct Column {
    /// 0-based attribute number in the slot.
    index: usize,
    /// `{"name":` for the first column, `,"name":` for the others.
    head: Vec<u8>,
    category: Category,
    /// The type's output function, looked up once (unused for booleans and dates).
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
                pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID => Category::Integer,
                pg_sys::FLOAT4OID | pg_sys::FLOAT8OID | pg_sys::NUMERICOID => Category::Number,
                pg_sys::DATEOID | pg_sys::TIMESTAMPOID | pg_sys::TIMESTAMPTZOID => {
                    Category::DateTime(typid)
                }
                pg_sys::JSONOID | pg_sys::JSONBOID => Category::Json,
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
            if !matches!(category, Category::Bool | Category::DateTime(_)) {
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

    /// The row in the slot (its attributes deformed) as a json datum (text's representation),
    /// allocated in the current memory context (capture's, reset after each row: no buffer
    /// outlives the row, however large it was).
    ///
    /// # Safety
    /// `slot` holds a row of the descriptor given to `new`, deformed.
    pub unsafe fn render(&mut self, slot: *mut pg_sys::TupleTableSlot) -> pg_sys::Datum {
        let mut text = std::mem::zeroed::<pg_sys::StringInfoData>();
        let buf: pg_sys::StringInfo = &mut text;
        pg_sys::initStringInfo(buf);
        // Room for the varlena header: the buffer becomes the json datum itself, uncopied.
        pg_sys::appendBinaryStringInfo(
            buf,
            [0 as c_char; pg_sys::VARHDRSZ].as_ptr(),
            pg_sys::VARHDRSZ as c_int,
        );
        if self.columns.is_empty() {
            pg_sys::appendStringInfoChar(buf, b'{' as c_char);
        }
        for c in self.columns.iter_mut() {
            pg_sys::appendBinaryStringInfo(buf, c.head.as_ptr().cast(), c.head.len() as c_int);
            if *(*slot).tts_isnull.add(c.index) {
                pg_sys::appendBinaryStringInfo(buf, c"null".as_ptr(), 4);
                continue;
            }
            let value = *(*slot).tts_values.add(c.index);
            match c.category {
                Category::Bool => {
                    let s: &CStr = if value.value() as u8 != 0 {
                        c"true"
                    } else {
                        c"false"
                    };
                    pg_sys::appendBinaryStringInfo(buf, s.as_ptr(), s.count_bytes() as c_int);
                }
                Category::DateTime(typid) => {
                    let mut date = [0 as c_char; pg_sys::MAXDATELEN as usize + 1];
                    pg_sys::JsonEncodeDateTime(date.as_mut_ptr(), value, typid, std::ptr::null());
                    pg_sys::appendStringInfoChar(buf, b'"' as c_char);
                    pg_sys::appendStringInfoString(buf, date.as_ptr());
                    pg_sys::appendStringInfoChar(buf, b'"' as c_char);
                }
                Category::Integer | Category::Json => {
                    let s = pg_sys::OutputFunctionCall(c.output.as_mut(), value);
                    pg_sys::appendStringInfoString(buf, s);
                }
                Category::Number => {
                    let s = pg_sys::OutputFunctionCall(c.output.as_mut(), value);
                    if IsValidJsonNumber(s, CStr::from_ptr(s).count_bytes() as c_int) {
                        pg_sys::appendStringInfoString(buf, s);
                    } else {
                        pg_sys::escape_json(buf, s);
                    }
                }
                Category::Other => {
                    let s = pg_sys::OutputFunctionCall(c.output.as_mut(), value);
                    pg_sys::escape_json(buf, s);
                }
            }
        }
        pg_sys::appendStringInfoChar(buf, b'}' as c_char);
        let datum = text.data as *mut pg_sys::varlena;
        pgrx::set_varsize_4b(datum, text.len);
        pg_sys::Datum::from(datum)
    }
}
