-- pg_redis 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_redis UPDATE). Released upgrade scripts are never
-- edited: a later change gets a script of its own. The 0.2.0 library must be installed first
-- (it runs the 0.1.0 objects correctly until this script has run).

-- Capture keeps each table's mirror in backend memory: a change of a catalog row invalidates the
-- table's relcache entry, which makes every backend read the row again.
CREATE FUNCTION redis_internal."forget_mirror"(
	"tbl" oid /* pg_sys :: Oid */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'forget_mirror_wrapper';
REVOKE ALL ON FUNCTION redis_internal.forget_mirror(oid) FROM PUBLIC;

CREATE FUNCTION redis_internal.on_mirrors_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN PERFORM redis_internal.forget_mirror(OLD.tbl::oid); END IF;
  IF TG_OP <> 'DELETE' THEN PERFORM redis_internal.forget_mirror(NEW.tbl::oid); END IF;
  RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION redis_internal.on_mirrors_change() FROM PUBLIC;
CREATE TRIGGER pg_redis_mirrors_change AFTER INSERT OR UPDATE OR DELETE ON redis_internal.mirrors
  FOR EACH ROW EXECUTE FUNCTION redis_internal.on_mirrors_change();

-- CALL redis_backfill(NULL) is refused instead of looping.
CREATE OR REPLACE PROCEDURE redis_backfill(tbl regclass)
LANGUAGE plpgsql AS $$
DECLARE
  r record;
BEGIN
  IF tbl IS NULL THEN
    RAISE EXCEPTION 'pg_redis: redis_backfill: the table must not be NULL' USING ERRCODE = '22023';
  END IF;
  LOOP
    SELECT * INTO r FROM redis_backfill_step(tbl);
    PERFORM redis_drain();
    RAISE NOTICE 'pg_redis: backfill of %: % of about % rows queued and delivered', tbl, r.rows_done, r.rows_total;
    COMMIT;
    EXIT WHEN r.done IS NOT FALSE;
  END LOOP;
END $$;

-- DROP TABLE of a sync-mode mirror on a Redis Cluster purges its per-key version companions.
CREATE OR REPLACE FUNCTION redis_internal.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO redis_internal.queue (mirror_id, op, key)
  SELECT m.id, x.op, x.key
    FROM redis_internal.mirrors m
    JOIN pg_event_trigger_dropped_objects() d ON d.objid = m.tbl::oid
   CROSS JOIN LATERAL (SELECT current_setting('pg_redis.topology', true) = 'cluster' AS cluster) t
   CROSS JOIN LATERAL (VALUES ('t'::"char", m.key_pattern),
                              -- the versions of a sync mirror: its version hash, or on a cluster
                              -- its per-key companions (glob-escaped prefix, src/delivery/versioned.rs)
                              ('d'::"char", CASE WHEN m.mode = 'sync' AND t.cluster IS NOT TRUE
                                                 THEN m.key_prefix || 'pg_redis:ver:' || m.id END),
                              ('t'::"char", CASE WHEN m.mode = 'sync' AND t.cluster
                                                 THEN regexp_replace(m.key_prefix, E'([][*?\\\\])', E'\\\\\\1', 'g')
                                                      || 'pg_redis:ver:' || m.id || ':*' END)) x(op, key)
   WHERE d.object_type = 'table' AND x.key IS NOT NULL;
  DELETE FROM redis_internal.mirror_stats s
   USING redis_internal.mirrors m, pg_event_trigger_dropped_objects() d
   WHERE s.mirror_id = m.id AND d.objid = m.tbl::oid AND d.object_type = 'table';
  DELETE FROM redis_internal.mirrors m
   USING pg_event_trigger_dropped_objects() d
   WHERE d.objid = m.tbl::oid AND d.object_type = 'table';
  PERFORM redis_internal.wake_worker();
END $$;

-- A packed queue row fills up to a page without being compressed or moved to TOAST.
ALTER TABLE redis_internal.queue SET (toast_tuple_target = 8160);

-- Queue depth counts the changes of packed queue rows (several changes of one statement).
CREATE OR REPLACE VIEW redis_stats AS
SELECT m.tbl AS mirror,
       coalesce(s.delivered, 0) + coalesce(q.depth, 0) + coalesce(d.n, 0) AS captured,
       coalesce(s.delivered, 0) AS delivered,
       coalesce(s.failed, 0) AS failed,
       coalesce(q.depth, 0) AS queue_depth,
       clock_timestamp() - q.oldest AS oldest_queued_age,
       s.last_lag,
       s.last_error,
       s.last_error_at,
       coalesce(rt.hits, 0) AS hits,
       coalesce(rt.misses, 0) AS misses,
       CASE WHEN coalesce(rt.hits, 0) + coalesce(rt.misses, 0) > 0
            THEN rt.hits::float8 / (rt.hits + rt.misses) END AS hit_ratio,
       w.worker_pid,
       w.worker_state,
       m.state,
       coalesce(d.n, 0) AS dead_letters,
       coalesce(b.rows_done, s.backfill_done) AS backfill_done,
       coalesce(b.rows_total, s.backfill_total) AS backfill_total,
       s.redis_rows,
       s.table_rows
  FROM redis_internal.mirrors m
  LEFT JOIN redis_internal.mirror_stats s ON s.mirror_id = m.id
  -- a packed row ('S', 'D': several changes of one statement) holds a JSON array of keys
  LEFT JOIN LATERAL (SELECT sum(CASE WHEN qq.op IN ('S', 'D') THEN json_array_length(qq.key::json) ELSE 1 END)::int8 AS depth,
                            min(queued_at) AS oldest
                       FROM redis_internal.queue qq WHERE qq.mirror_id = m.id) q ON true
  LEFT JOIN LATERAL (SELECT count(*) AS n FROM redis_internal.dead_letters dl
                      WHERE dl.mirror_id = m.id) d ON true
  LEFT JOIN redis_internal.backfills b ON b.mirror_id = m.id
  LEFT JOIN redis_read_through_counts() rt ON rt.mirror_id = m.id
  CROSS JOIN redis_worker_info() w;;

-- Comments on the internal functions and tables (0.2.0 comments every object).
COMMENT ON FUNCTION redis_internal.register_trigger(oid) IS 'pg_redis internal: register a hand-written capture trigger as a mirror (called by an event trigger)';
COMMENT ON FUNCTION redis_internal.revalidate(oid) IS 'pg_redis internal: check a mirror again after ALTER TABLE (called by an event trigger)';
COMMENT ON FUNCTION redis_internal.wake_worker() IS 'pg_redis internal: wake the delivery worker at commit';
COMMENT ON FUNCTION redis_internal.forget_mirror(oid) IS 'pg_redis internal: make backends read a changed mirror again (relcache invalidation)';
COMMENT ON FUNCTION redis_internal.on_sql_drop() IS 'pg_redis internal: drop the mirrors (and their keys) of dropped tables';
COMMENT ON FUNCTION redis_internal.on_mirrors_change() IS 'pg_redis internal: trigger on the mirror catalog, see forget_mirror';
COMMENT ON FUNCTION redis_internal.on_ddl_end() IS 'pg_redis internal: refuse ALTER TABLE that breaks a mirror';
COMMENT ON FUNCTION redis_internal.on_create_trigger() IS 'pg_redis internal: register hand-written capture triggers';
COMMENT ON TABLE redis_internal.mirrors IS 'pg_redis internal: one row per mirrored table (read it through the view redis_mirrors)';
COMMENT ON TABLE redis_internal.queue IS 'pg_redis internal: committed changes waiting for delivery to Redis';
COMMENT ON TABLE redis_internal.dead_letters IS 'pg_redis internal: changes Redis refused for good (view redis_dead_letters, redis_retry)';
COMMENT ON TABLE redis_internal.mirror_stats IS 'pg_redis internal: delivery counters per mirror (view redis_stats)';
COMMENT ON TABLE redis_internal.backfills IS 'pg_redis internal: backfills in progress';

-- The shared read cache (docs/cache.md): what it holds and did.
CREATE FUNCTION "redis_cache_info"() RETURNS TABLE (
	"in_use" bool,
	"tracker_pid" INT,
	"size_bytes" bigint,
	"capacity" bigint,
	"entries" bigint,
	"hits" bigint,
	"misses" bigint,
	"fills" bigint,
	"invalidations" bigint,
	"flushes" bigint
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'redis_cache_info_wrapper';
-- As in a fresh install: revoked from PUBLIC, then granted (an explicit ACL).
REVOKE ALL ON FUNCTION redis_cache_info() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION redis_cache_info() TO PUBLIC;
COMMENT ON FUNCTION redis_cache_info() IS 'pg_redis: state and counters of the shared read cache (pg_redis.cache_size)';
