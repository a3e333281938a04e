"""The mirrored tables of a run and the random statements the clients run on them.

Three layouts, each created once per (mode, format):

  acct  id int PK; default key template (acct_<mode>_<fmt>:<id>); every column; no filter.
        Columns: int, numeric(12,2), boolean, timestamptz, jsonb, bytea, float8 (NaN, ±Infinity,
        -0, 1e300 included), text with quotes/backslashes/newlines/unicode.
        Key changes: `SET id = <other>` and `SET id = -id` over a range (several keys at once).
  ord   PK (region, num); template 'ord:<m>:<f>:{region}/{num}' (region values with spaces,
        braces, non-ASCII); filter status <> 'archived' (rows move in and out); a column subset
        (updated, note not carried). Key changes of region, and num = -num over a range.
  usr   id int PK but keyed by a UNIQUE NOT NULL email: template 'usr/<m>/<f>/{email}'; filter
        `active` (nullable: NULL = outside); date, interval, json, varchar columns.
        Key changes: `SET email = <other>`.

Clients also call redis_fetch(tbl, key values) on random keys (read-through fills racing the
changes and their delivery).

Every layout's keys start with a distinct literal prefix, so one SCAN MATCH per mirror lists
exactly that mirror's keys.
"""

from __future__ import annotations

import datetime as dt
import decimal
import random
from dataclasses import dataclass, field

from psycopg.types.json import Json, Jsonb

MODES = ("queue", "commit", "sync")
FORMATS = ("json", "hash")
LAYOUTS = ("acct", "ord", "usr")

ACCT_IDS = 1500          # ids in [-ACCT_IDS, ACCT_IDS]
ORD_REGIONS = ["eu", "us", "ap south", "sa", "af{1}", "øst", "n'q"]
ORD_NUMS = 300           # nums in [-ORD_NUMS, ORD_NUMS]
USR_IDS = 1200
USR_EMAILS = 3000

_WORDS = ["alpha", "beta", "γάμμα", "δ", "naïve", "日本", "emoji 🚀", "quote ' \" ", "back\\slash",
          "new\nline", "tab\there", "{brace}", "}{", "%s", "$1", "", " ", "null", "NULL", "0", "true"]


def _text(rnd: random.Random, nullable=True):
    if nullable and rnd.random() < 0.1:
        return None
    n = rnd.randint(0, 3)
    s = " ".join(rnd.choice(_WORDS) for _ in range(n))
    if rnd.random() < 0.03:
        s = s + "x" * rnd.randint(100, 3000)
    return s


def _num(rnd: random.Random, nullable=True):
    if nullable and rnd.random() < 0.1:
        return None
    return decimal.Decimal(rnd.randint(-10**9, 10**9)) / 100


def _float(rnd: random.Random):
    r = rnd.random()
    if r < 0.08:
        return None
    if r < 0.12:
        return rnd.choice([float("nan"), float("inf"), float("-inf"), -0.0, 1e300, 5e-324, 0.1])
    return rnd.uniform(-1e6, 1e6)


def _ts(rnd: random.Random):
    if rnd.random() < 0.1:
        return None
    tz = dt.timezone(dt.timedelta(minutes=rnd.choice([0, 60, -330, 345, 600])))
    base = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    return (base + dt.timedelta(seconds=rnd.randint(0, 10**8), microseconds=rnd.randint(0, 999999))).astimezone(tz)


def _jdoc(rnd: random.Random, depth=0):
    r = rnd.random()
    if depth > 2 or r < 0.3:
        return rnd.choice([1, -2.5, "s", "ü\"q", True, False, None, 12345678901234567890, 0.1, []])
    if r < 0.6:
        return [_jdoc(rnd, depth + 1) for _ in range(rnd.randint(0, 3))]
    return {rnd.choice(["a", "b", "c d", "é", "k\"q"]) + str(i): _jdoc(rnd, depth + 1) for i in range(rnd.randint(0, 3))}


def _bytes(rnd: random.Random):
    if rnd.random() < 0.15:
        return None
    return bytes(rnd.randint(0, 255) for _ in range(rnd.randint(0, 24)))


@dataclass
class Stmt:
    sql: str
    params: tuple = ()
    copy_rows: list | None = None   # COPY ... FROM STDIN rows
    kind: str = ""


@dataclass
class Table:
    layout: str
    mode: str
    fmt: str
    name: str = ""
    key_prefix: str = ""       # the literal text before the first placeholder
    key_sql: str = ""          # SQL expression of a row's key (over alias t)
    template: str | None = None
    filter: str | None = None
    columns: list[str] | None = None
    ddl: str = ""
    all_columns: list[str] = field(default_factory=list)

    def __post_init__(self):
        m, f = self.mode, self.fmt
        if self.layout == "acct":
            self.name = f"acct_{m}_{f}"
            self.key_prefix = f"{self.name}:"
            self.key_sql = f"'{self.name}:' || t.id"
            self.all_columns = ["id", "grp", "name", "amount", "flag", "ts", "doc", "blob", "score"]
            self.ddl = (f"CREATE TABLE {self.name} (id int PRIMARY KEY, grp int NOT NULL, name text, "
                        f"amount numeric(12,2), flag boolean, ts timestamptz, doc jsonb, blob bytea, score float8)")
        elif self.layout == "ord":
            self.name = f"ord_{m}_{f}"
            self.key_prefix = f"ord:{m}:{f}:"
            self.template = self.key_prefix + "{region}/{num}"
            self.key_sql = f"'{self.key_prefix}' || t.region || '/' || t.num"
            self.filter = "status <> 'archived'"
            self.columns = ["region", "num", "status", "qty", "price", "tags"]
            self.all_columns = ["region", "num", "status", "qty", "price", "tags", "updated", "note"]
            self.ddl = (f"CREATE TABLE {self.name} (region text NOT NULL, num int NOT NULL, status text NOT NULL, "
                        f"qty int, price numeric, tags text[], updated timestamptz, note text, PRIMARY KEY (region, num))")
        elif self.layout == "usr":
            self.name = f"usr_{m}_{f}"
            self.key_prefix = f"usr/{m}/{f}/"
            self.template = self.key_prefix + "{email}"
            self.key_sql = f"'{self.key_prefix}' || t.email"
            self.filter = "active"
            self.all_columns = ["id", "email", "active", "nick", "born", "dur", "meta"]
            self.ddl = (f"CREATE TABLE {self.name} (id int PRIMARY KEY, email text NOT NULL UNIQUE, active boolean, "
                        f"nick varchar(40), born date, dur interval, meta json)")
        else:
            raise ValueError(self.layout)

    # -- the mirror
    def mirror_sql(self) -> tuple[str, tuple]:
        args = ["%s::regclass"]
        params: list = [self.name]
        if self.template:
            args.append("key_template => %s")
            params.append(self.template)
        args.append("format => %s")
        params.append(self.fmt)
        args.append("mode => %s")
        params.append(self.mode)
        if self.filter:
            args.append("filter => %s")
            params.append(self.filter)
        if self.columns:
            args.append("columns => %s")
            params.append(self.columns)
        return f"SELECT redis_mirror({', '.join(args)})", tuple(params)

    def payload_sql(self) -> str:
        """The row as the mirror renders it (json text), over alias t."""
        if self.columns is None:
            return "row_to_json(t)::text"
        return "json_build_object(" + ", ".join(f"'{c}', t.{c}" for c in self.columns) + ")::text"

    def where_sql(self) -> str:
        return f"coalesce(({self.filter}), false)" if self.filter else "true"

    # -- random statements
    def random_stmt(self, rnd: random.Random, truncate_weight: float, fetch_weight: float = 0) -> Stmt:
        kinds = [("insert1", 12), ("insert_many", 4), ("upsert", 10), ("update1", 15), ("update_range", 6),
                 ("filter", 5 if self.filter else 0), ("key_change", 8), ("key_shift", 4), ("delete1", 9),
                 ("delete_range", 4), ("copy", 4), ("truncate", truncate_weight), ("fetch", fetch_weight)]
        total = sum(w for _, w in kinds)
        x = rnd.uniform(0, total)
        for kind, w in kinds:
            if x < w:
                break
            x -= w
        if kind == "fetch":
            st = Stmt("SELECT redis_fetch(%s::regclass, VARIADIC %s::text[])", (self.name, self.random_key_values(rnd)))
        else:
            st = getattr(self, f"_{self.layout}")(rnd, kind)
        st.kind = kind
        return st

    def random_key_values(self, rnd: random.Random) -> list[str]:
        """The values of a random key, in the order of the template's placeholders."""
        if self.layout == "acct":
            return [str(rnd.randint(-ACCT_IDS, ACCT_IDS))]
        if self.layout == "ord":
            return [rnd.choice(ORD_REGIONS), str(rnd.randint(-ORD_NUMS, ORD_NUMS))]
        return [self._email(rnd)]

    # acct -----------------------------------------------------------------------------
    def _acct_row(self, rnd, id_=None):
        return (id_ if id_ is not None else rnd.randint(1, ACCT_IDS), rnd.randint(0, 9), _text(rnd), _num(rnd),
                rnd.choice([True, False, None]), _ts(rnd), Jsonb(_jdoc(rnd)) if rnd.random() < 0.9 else None,
                _bytes(rnd), _float(rnd))

    def _acct(self, rnd, kind) -> Stmt:
        t = self.name
        cols = "id, grp, name, amount, flag, ts, doc, blob, score"
        ph = ", ".join(["%s"] * 9)
        rid = lambda: rnd.randint(-ACCT_IDS, ACCT_IDS)  # noqa: E731
        if kind == "insert1":
            return Stmt(f"INSERT INTO {t} ({cols}) VALUES ({ph}) ON CONFLICT DO NOTHING", self._acct_row(rnd))
        if kind == "insert_many":
            a = rnd.randint(1, ACCT_IDS)
            return Stmt(f"INSERT INTO {t} ({cols}) SELECT g, g %% 10, 'bulk ' || g, g * 1.25, g %% 2 = 0, "
                        f"now() - g * interval '1 minute', jsonb_build_object('g', g, 'l', ARRAY[g, -g]), "
                        f"decode(lpad(to_hex(g), 8, '0'), 'hex'), g / 7.0 "
                        f"FROM generate_series(%s::int, %s::int) g ON CONFLICT DO NOTHING", (a, a + rnd.randint(2, 25)))
        if kind == "upsert":
            return Stmt(f"INSERT INTO {t} AS x ({cols}) VALUES ({ph}) ON CONFLICT (id) DO UPDATE SET "
                        f"name = EXCLUDED.name, amount = coalesce(x.amount, 0) + coalesce(EXCLUDED.amount, 0), "
                        f"doc = EXCLUDED.doc, score = EXCLUDED.score, ts = EXCLUDED.ts", self._acct_row(rnd, rid()))
        if kind == "update1":
            row = self._acct_row(rnd)
            picks = rnd.sample(range(1, 9), rnd.randint(1, 4))
            names = cols.split(", ")
            sets = ", ".join(f"{names[i]} = %s" for i in picks)
            return Stmt(f"UPDATE {t} SET {sets} WHERE id = %s", tuple(row[i] for i in picks) + (rid(),))
        if kind == "update_range":
            a = rid()
            return Stmt(f"UPDATE {t} SET amount = coalesce(amount, 0) + 1, grp = (grp + 1) %% 10, flag = NOT flag "
                        f"WHERE id BETWEEN %s AND %s", (a, a + rnd.randint(1, 30)))
        if kind in ("filter",):
            return Stmt(f"UPDATE {t} SET flag = NOT flag WHERE id = %s", (rid(),))
        if kind == "key_change":
            return Stmt(f"UPDATE {t} SET id = %s WHERE id = %s", (rid(), rid()))
        if kind == "key_shift":
            a = rid()
            return Stmt(f"UPDATE {t} SET id = -id WHERE id BETWEEN %s AND %s AND id <> 0", (a, a + rnd.randint(1, 6)))
        if kind == "delete1":
            return Stmt(f"DELETE FROM {t} WHERE id = %s", (rid(),))
        if kind == "delete_range":
            a = rid()
            return Stmt(f"DELETE FROM {t} WHERE id BETWEEN %s AND %s", (a, a + rnd.randint(1, 20)))
        if kind == "copy":
            ids = rnd.sample(range(-ACCT_IDS, ACCT_IDS + 1), rnd.randint(1, 12))
            return Stmt(f"COPY {t} ({cols}) FROM STDIN", copy_rows=[self._acct_row(rnd, i) for i in ids])
        if kind == "truncate":
            return Stmt(f"TRUNCATE {t}")
        raise ValueError(kind)

    # ord ------------------------------------------------------------------------------
    def _ord_row(self, rnd, region=None, num=None):
        tags = None if rnd.random() < 0.2 else [rnd.choice(["a", "b c", None, "ä", "{x}", '"q"']) for _ in range(rnd.randint(0, 3))]
        return (region or rnd.choice(ORD_REGIONS), num if num is not None else rnd.randint(1, ORD_NUMS),
                rnd.choice(["open", "open", "paid", "archived"]), rnd.choice([None, rnd.randint(-5, 1000)]),
                _num(rnd), tags, _ts(rnd), _text(rnd))

    def _ord(self, rnd, kind) -> Stmt:
        t = self.name
        cols = "region, num, status, qty, price, tags, updated, note"
        ph = ", ".join(["%s"] * 8)
        reg = lambda: rnd.choice(ORD_REGIONS)  # noqa: E731
        rnum = lambda: rnd.randint(-ORD_NUMS, ORD_NUMS)  # noqa: E731
        if kind == "insert1":
            return Stmt(f"INSERT INTO {t} ({cols}) VALUES ({ph}) ON CONFLICT DO NOTHING", self._ord_row(rnd))
        if kind == "insert_many":
            a = rnd.randint(1, ORD_NUMS)
            return Stmt(f"INSERT INTO {t} ({cols}) SELECT %s, g, CASE WHEN g %% 4 = 0 THEN 'archived' ELSE 'open' END, "
                        f"g, g * 0.5, ARRAY['bulk', g::text], now(), NULL FROM generate_series(%s::int, %s::int) g "
                        f"ON CONFLICT DO NOTHING", (reg(), a, a + rnd.randint(2, 20)))
        if kind == "upsert":
            return Stmt(f"INSERT INTO {t} AS x ({cols}) VALUES ({ph}) ON CONFLICT (region, num) DO UPDATE SET "
                        f"status = EXCLUDED.status, qty = coalesce(x.qty, 0) + 1, tags = EXCLUDED.tags, note = EXCLUDED.note",
                        self._ord_row(rnd, num=rnum()))
        if kind == "update1":
            row = self._ord_row(rnd)
            picks = rnd.sample(range(2, 8), rnd.randint(1, 4))
            names = cols.split(", ")
            sets = ", ".join(f"{names[i]} = %s" for i in picks)
            return Stmt(f"UPDATE {t} SET {sets} WHERE region = %s AND num = %s",
                        tuple(row[i] for i in picks) + (reg(), rnum()))
        if kind == "update_range":
            a = rnum()
            return Stmt(f"UPDATE {t} SET qty = coalesce(qty, 0) + 1, price = price * 2, updated = now() "
                        f"WHERE region = %s AND num BETWEEN %s AND %s", (reg(), a, a + rnd.randint(1, 25)))
        if kind == "filter":
            a = rnum()
            return Stmt(f"UPDATE {t} SET status = CASE WHEN status = 'archived' THEN 'open' ELSE 'archived' END "
                        f"WHERE region = %s AND num BETWEEN %s AND %s", (reg(), a, a + rnd.randint(0, 5)))
        if kind == "key_change":
            return Stmt(f"UPDATE {t} SET region = %s WHERE region = %s AND num = %s", (reg(), reg(), rnum()))
        if kind == "key_shift":
            a = rnum()
            return Stmt(f"UPDATE {t} SET num = -num WHERE region = %s AND num BETWEEN %s AND %s AND num <> 0",
                        (reg(), a, a + rnd.randint(1, 5)))
        if kind == "delete1":
            return Stmt(f"DELETE FROM {t} WHERE region = %s AND num = %s", (reg(), rnum()))
        if kind == "delete_range":
            a = rnum()
            return Stmt(f"DELETE FROM {t} WHERE region = %s AND num BETWEEN %s AND %s", (reg(), a, a + rnd.randint(1, 15)))
        if kind == "copy":
            region = reg()
            nums = rnd.sample(range(-ORD_NUMS, ORD_NUMS + 1), rnd.randint(1, 10))
            return Stmt(f"COPY {t} ({cols}) FROM STDIN", copy_rows=[self._ord_row(rnd, region, n) for n in nums])
        if kind == "truncate":
            return Stmt(f"TRUNCATE {t}")
        raise ValueError(kind)

    # usr ------------------------------------------------------------------------------
    @staticmethod
    def _email(rnd):
        n = rnd.randint(1, USR_EMAILS)
        return rnd.choice([f"u{n}@example.org", f"U{n} space@x", f"ü{n}@é.fr", f"{{b}}{n}", f"q'{n}\""])

    def _usr_row(self, rnd, id_=None):
        return (id_ if id_ is not None else rnd.randint(1, USR_IDS), self._email(rnd),
                rnd.choice([True, True, False, None]), (_text(rnd) or "")[:40] if rnd.random() < 0.9 else None,
                None if rnd.random() < 0.1 else dt.date(1950, 1, 1) + dt.timedelta(days=rnd.randint(0, 30000)),
                None if rnd.random() < 0.2 else dt.timedelta(days=rnd.randint(0, 900), seconds=rnd.randint(0, 86399)),
                None if rnd.random() < 0.2 else Json(_jdoc(rnd)))

    def _usr(self, rnd, kind) -> Stmt:
        t = self.name
        cols = "id, email, active, nick, born, dur, meta"
        ph = ", ".join(["%s"] * 7)
        rid = lambda: rnd.randint(1, USR_IDS)  # noqa: E731
        if kind == "insert1":
            return Stmt(f"INSERT INTO {t} ({cols}) VALUES ({ph}) ON CONFLICT DO NOTHING", self._usr_row(rnd))
        if kind == "insert_many":
            a = rnd.randint(1, USR_IDS)
            return Stmt(f"INSERT INTO {t} ({cols}) SELECT g, 'bulk' || g || '@' || %s, g %% 3 <> 0, 'n' || g, "
                        f"date '2000-01-01' + g, g * interval '1 hour', json_build_object('g', g) "
                        f"FROM generate_series(%s::int, %s::int) g ON CONFLICT DO NOTHING",
                        (rnd.randint(0, 9), a, a + rnd.randint(2, 20)))
        if kind == "upsert":
            return Stmt(f"INSERT INTO {t} AS x ({cols}) VALUES ({ph}) ON CONFLICT (id) DO UPDATE SET "
                        f"active = EXCLUDED.active, nick = EXCLUDED.nick, dur = EXCLUDED.dur, meta = EXCLUDED.meta",
                        self._usr_row(rnd))
        if kind == "update1":
            row = self._usr_row(rnd)
            picks = rnd.sample(range(2, 7), rnd.randint(1, 3))
            names = cols.split(", ")
            sets = ", ".join(f"{names[i]} = %s" for i in picks)
            return Stmt(f"UPDATE {t} SET {sets} WHERE id = %s", tuple(row[i] for i in picks) + (rid(),))
        if kind == "update_range":
            a = rid()
            return Stmt(f"UPDATE {t} SET dur = coalesce(dur, interval '0') + interval '1 minute', born = born + 1 "
                        f"WHERE id BETWEEN %s AND %s", (a, a + rnd.randint(1, 25)))
        if kind == "filter":
            a = rid()
            return Stmt(f"UPDATE {t} SET active = CASE WHEN active IS NULL THEN true WHEN active THEN false ELSE NULL END "
                        f"WHERE id BETWEEN %s AND %s", (a, a + rnd.randint(0, 5)))
        if kind == "key_change":
            return Stmt(f"UPDATE {t} SET email = %s WHERE id = %s", (self._email(rnd), rid()))
        if kind == "key_shift":
            a = rid()
            return Stmt(f"UPDATE {t} SET email = email || '.x' WHERE id BETWEEN %s AND %s AND length(email) < 40",
                        (a, a + rnd.randint(1, 5)))
        if kind == "delete1":
            return Stmt(f"DELETE FROM {t} WHERE id = %s", (rid(),))
        if kind == "delete_range":
            a = rid()
            return Stmt(f"DELETE FROM {t} WHERE id BETWEEN %s AND %s", (a, a + rnd.randint(1, 15)))
        if kind == "copy":
            ids = rnd.sample(range(1, USR_IDS + 1), rnd.randint(1, 10))
            return Stmt(f"COPY {t} ({cols}) FROM STDIN", copy_rows=[self._usr_row(rnd, i) for i in ids])
        if kind == "truncate":
            return Stmt(f"TRUNCATE {t}")
        raise ValueError(kind)


def make_tables(modes, formats, layouts=LAYOUTS) -> list[Table]:
    return [Table(layout=l, mode=m, fmt=f) for m in modes for f in formats for l in layouts]
