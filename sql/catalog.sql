-- pg_redis catalog: mirrors, the durable queue, dead letters, backfill progress, delivery stats.
-- All in redis_internal, which ordinary roles cannot read; the extension's functions reach these
-- tables as the extension's owner. The catalog is dumped by pg_dump (pg_extension_config_dump).

CREATE TABLE redis_internal.mirrors (
    id            serial PRIMARY KEY,
    tbl           regclass NOT NULL UNIQUE,   -- dumped by name, so it survives pg_dump/restore
    tbl_name      text NOT NULL,              -- schema-qualified name at creation, for restore
    key_template  text NOT NULL,
    key_prefix    text NOT NULL DEFAULT '',   -- pg_redis.key_prefix in force when created
    format        text NOT NULL CHECK (format IN ('json', 'hash')),
    columns       text[],
    ttl_seconds   int CHECK (ttl_seconds > 0),
    mode          text NOT NULL CHECK (mode IN ('queue', 'commit', 'sync')),
    action        text NOT NULL CHECK (action IN ('write', 'invalidate')),
    filter        text,
    stream        text,
    state         text NOT NULL DEFAULT 'active' CHECK (state IN ('backfilling', 'active', 'needs_resync')),
    key_pattern   text NOT NULL,              -- SCAN MATCH pattern covering every key of the layout
    created_by    oid NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE redis_internal.queue (
    id         bigserial PRIMARY KEY,
    mirror_id  int NOT NULL,
    op         "char" NOT NULL,               -- 's' write the row, 'd' delete the key, 't' delete every key of the layout, 'n' stream event only;
                                              -- 'S', 'D': several writes or deletes of one statement (key and payload JSON arrays)
    key        text NOT NULL,
    payload    text,                          -- the row as JSON (op 's'; and the event's data with a stream)
    ev         "char",                        -- stream event: 'i' insert, 'u' update, 'd' delete, 't' truncate; NULL: none
    old_key    text,                          -- the row's key before an update that changed it
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    queued_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts   int NOT NULL DEFAULT 0,
    last_error text
);
-- A packed row (several changes of one statement, src/mirror/native.rs) fills up to a page
-- without being compressed or moved to TOAST.
ALTER TABLE redis_internal.queue SET (toast_tuple_target = 8160);

CREATE TABLE redis_internal.dead_letters (
    id             bigint PRIMARY KEY,
    mirror_id      int NOT NULL,
    op             "char" NOT NULL,
    key            text NOT NULL,
    payload        text,
    error          text,
    attempts       int NOT NULL,
    first_failure  timestamptz NOT NULL,
    last_failure   timestamptz NOT NULL
);

CREATE TABLE redis_internal.backfills (
    mirror_id    int PRIMARY KEY REFERENCES redis_internal.mirrors(id) ON DELETE CASCADE,
    next_block   bigint NOT NULL DEFAULT 0,
    total_blocks bigint NOT NULL,
    rows_total   bigint NOT NULL,                -- estimate at scheduling time (reltuples)
    rows_done    bigint NOT NULL DEFAULT 0
);

-- No foreign key: the worker writes here while users may drop mirrors, and a lost race must not
-- fail its batch. Rows of dropped mirrors are deleted with them (views.sql, redis_unmirror).
CREATE TABLE redis_internal.mirror_stats (
    mirror_id      int PRIMARY KEY,
    delivered      bigint NOT NULL DEFAULT 0,
    failed         bigint NOT NULL DEFAULT 0,
    last_lag       interval,
    last_error     text,
    last_error_at  timestamptz,
    backfill_done  bigint,                   -- figures of the last (or running) backfill
    backfill_total bigint,
    redis_rows     bigint,                   -- as of the last backfill or redis_verify
    table_rows     bigint
);

SELECT pg_catalog.pg_extension_config_dump('redis_internal.mirrors', '');
SELECT pg_catalog.pg_extension_config_dump('redis_internal.mirrors_id_seq', '');
