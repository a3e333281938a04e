"""The final comparison: every mirrored table against its keys in Redis.

For one mirror:
  expected  the rows inside the filter, each rendered by PostgreSQL itself under the settings the
            spec fixes (TimeZone UTC, DateStyle ISO, IntervalStyle postgres, extra_float_digits 1,
            bytea_output hex): row_to_json(t) (or json_build_object of the carried columns), and
            for the hash format its json_each_text fields with NULLs left out;
  actual    every key SCAN MATCH <the layout's literal prefix>* finds, read with GET or HGETALL.
Differences: missing (row, no key), extra (key, no row: also a row outside the filter), stale
(values differ: JSON compared parsed, numbers by their literal text so that 1.50 != 1.5; hash
fields compared as text, nested JSON values parsed), wrongtype (a hash where a string belongs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .tables import Table

RENDER_SETTINGS = ("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; "
                   "SET extra_float_digits = 1; SET bytea_output = 'hex'")


@dataclass
class Diff:
    table: str
    key: str
    kind: str        # missing, extra, stale, wrongtype
    expected: str | None = None
    actual: str | None = None
    info: str = ""   # the row's last writer: xmin and commit time (run clock)

    def __str__(self):
        s = f"{self.table}: {self.kind} {self.key!r}" + (f"  [{self.info}]" if self.info else "")
        if self.expected is not None or self.actual is not None:
            s += f"\n      table: {_short(self.expected)}\n      redis: {_short(self.actual)}"
        return s


def _short(v, n=400):
    if v is None:
        return "(none)"
    v = str(v)
    return v if len(v) <= n else v[:n] + f"... ({len(v)} chars)"


class Num:
    """A JSON number kept as its literal text: 1.50 and 1.5 differ (the spec says exact), and a
    number never equals a string."""

    __slots__ = ("s",)

    def __init__(self, s: str):
        self.s = s

    def __eq__(self, other):
        return isinstance(other, Num) and other.s == self.s

    def __hash__(self):
        return hash(self.s)

    def __repr__(self):
        return self.s


def strict_loads(s: str):
    return json.loads(s, parse_float=Num, parse_int=Num, parse_constant=Num)


def glob_escape(s: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)


def expected_rows(conn, t: Table, info: dict | None = None, pg_t0=None) -> dict[str, str]:
    """key -> expected value text (json) or json object text of the hash fields. `info` gets, per
    key, the row's xmin and (track_commit_timestamp) its commit time in seconds of the run clock
    (pg_t0: the server's clock_timestamp() at the run's t=0)."""
    conn.execute(RENDER_SETTINGS)
    ts = (f"extract(epoch FROM pg_xact_commit_timestamp(t.xmin) - %s::timestamptz)" if pg_t0 is not None
          else "NULL::float8")
    if t.fmt == "json":
        q = f"SELECT {t.key_sql}, {t.payload_sql()}, t.xmin::text, {ts} FROM {t.name} t WHERE {t.where_sql()}"
    else:
        # json/jsonb columns: the value's JSON text (a JSON string keeps its quotes); others as text
        jcols = (f"(SELECT attname FROM pg_attribute WHERE attrelid = '{t.name}'::regclass "
                 f"AND atttypid IN ('json'::regtype, 'jsonb'::regtype))")
        q = (f"SELECT k, (SELECT coalesce(json_object_agg(e.key, CASE WHEN e.key IN {jcols} THEN e.value::text "
             f"ELSE e.value #>> '{{}}' END) FILTER (WHERE json_typeof(e.value) <> 'null'), '{{}}') "
             f"FROM json_each(p::json) e)::text, x, c FROM (SELECT {t.key_sql} AS k, {t.payload_sql()} AS p, "
             f"t.xmin::text AS x, {ts} AS c FROM {t.name} t WHERE {t.where_sql()}) s")
    out = {}
    for k, v, x, c in conn.execute(q, (pg_t0,) if pg_t0 is not None else None).fetchall():
        out[k] = v
        if info is not None:
            info[k] = f"xmin {x}" + (f", committed at {float(c):.3f}s" if c is not None else "")
    return out


def redis_keys(rc, pattern: str) -> list[bytes]:
    return list(rc.scan_iter(match=pattern, count=1000))


def actual_values(rc, keys: list[bytes]) -> dict[bytes, tuple[str, object]]:
    out = {}
    for i in range(0, len(keys), 500):
        chunk = keys[i:i + 500]
        p = rc.pipeline(transaction=False)
        for k in chunk:
            p.type(k)
        types = p.execute()
        p = rc.pipeline(transaction=False)
        for k, ty in zip(chunk, types):
            ty = ty.decode() if isinstance(ty, bytes) else ty
            if ty == "string":
                p.get(k)
            elif ty == "hash":
                p.hgetall(k)
            else:
                p.type(k)
        vals = p.execute()
        for k, ty, v in zip(chunk, types, vals):
            ty = ty.decode() if isinstance(ty, bytes) else ty
            out[k] = (ty, v)
    return out


def _dec(b):
    return b.decode("utf-8", errors="backslashreplace") if isinstance(b, bytes) else b


def _json_equal(a: str, b: str) -> bool:
    try:
        return strict_loads(a) == strict_loads(b)
    except ValueError:
        return False


def compare_mirror(conn, rc, t: Table, notes: list[str], pg_t0=None) -> tuple[list[Diff], int, int]:
    """Returns (differences, rows expected, keys found)."""
    info: dict = {}
    exp = expected_rows(conn, t, info, pg_t0)
    keys = redis_keys(rc, glob_escape(t.key_prefix) + "*")
    act = actual_values(rc, keys)
    diffs: list[Diff] = []
    seen = set()
    for kb, (ty, v) in act.items():
        k = _dec(kb)
        seen.add(k)
        e = exp.get(k)
        if e is None:
            shown = _dec(v) if ty == "string" else (json.dumps({_dec(a): _dec(b) for a, b in v.items()}, ensure_ascii=False)
                                                    if ty == "hash" else ty)
            diffs.append(Diff(t.name, k, "extra", None, shown))
            continue
        if t.fmt == "json":
            if ty != "string":
                diffs.append(Diff(t.name, k, "wrongtype", e, f"<{ty}>"))
                continue
            a = _dec(v)
            if a != e and not _json_equal(a, e):
                diffs.append(Diff(t.name, k, "stale", e, a, info.get(k, "")))
        else:
            if ty != "hash":
                diffs.append(Diff(t.name, k, "wrongtype", e, f"<{ty}> {_dec(v) if ty == 'string' else ''}"))
                continue
            ef = json.loads(e)
            af = {_dec(a): _dec(b) for a, b in v.items()}
            bad = False
            for f in set(ef) | set(af):
                x, y = ef.get(f), af.get(f)
                if x == y:
                    continue
                if x is not None and y is not None and x[:1] in "[{\"" and _json_equal(x, y):
                    notes.append(f"hash field holds the same JSON as PostgreSQL renders, as different text "
                                 f"(e.g. {t.name} {k!r} field {f}: {x[:60]!r} vs {y[:60]!r})")
                    continue
                bad = True
            if bad:
                diffs.append(Diff(t.name, k, "stale", json.dumps(ef, ensure_ascii=False, sort_keys=True),
                                  json.dumps(af, ensure_ascii=False, sort_keys=True), info.get(k, "")))
    for k, e in exp.items():
        if k not in seen:
            diffs.append(Diff(t.name, k, "missing", e, None, info.get(k, "")))
    return diffs, len(exp), len(keys)


def unknown_keys(rc, tables: list[Table]) -> list[str]:
    """Keys of no mirror's layout (the extension's own pg_redis:* keys reported apart)."""
    prefixes = [t.key_prefix.encode() for t in tables]
    out = []
    for k in rc.scan_iter(count=1000):
        if any(k.startswith(p) for p in prefixes) or k.startswith(b"pg_redis:"):
            continue
        out.append(_dec(k))
    return out


def internal_keys(rc) -> list[tuple[str, str, int]]:
    """The extension's own keys (pg_redis:*): name, type, size (fields / members / length)."""
    out = []
    for k in sorted(rc.scan_iter(match="pg_redis:*", count=1000)):
        ty = _dec(rc.type(k))
        size = {"hash": rc.hlen, "set": rc.scard, "list": rc.llen, "zset": rc.zcard,
                "stream": rc.xlen}.get(ty, lambda _k: 1)(k)
        out.append((_dec(k), ty, size))
    return out
