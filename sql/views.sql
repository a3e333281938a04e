-- Views over the catalog. They run with the extension owner's privileges on the internal tables;
-- who may read them is decided by GRANT (grants.sql: pg_monitor).

CREATE VIEW redis_mirrors AS
SELECT m.tbl AS mirror, m.key_template, m.key_prefix, m.format, m.columns, m.ttl_seconds,
       m.mode, m.action, m.filter, m.stream, m.state, m.key_pattern,
       m.created_by::regrole AS created_by, m.created_at
  FROM redis_internal.mirrors m;

CREATE VIEW redis_stats AS
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
  CROSS JOIN redis_worker_info() w;

CREATE VIEW redis_dead_letters AS
SELECT m.tbl AS mirror, d.key, CASE d.op WHEN 's' THEN 'write' WHEN 'd' THEN 'delete' ELSE 'purge' END AS op,
       d.error, d.attempts, d.first_failure, d.last_failure
  FROM redis_internal.dead_letters d LEFT JOIN redis_internal.mirrors m ON m.id = d.mirror_id;

-- DROP TABLE of a mirrored table drops its mirror and removes its keys once the DROP commits.
CREATE FUNCTION redis_internal.on_sql_drop() RETURNS event_trigger
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
CREATE EVENT TRIGGER pg_redis_sql_drop ON sql_drop EXECUTE FUNCTION redis_internal.on_sql_drop();

-- Capture keeps each table's mirror in backend memory: any change of a catalog row invalidates
-- the table's relcache entry, which makes every backend read the row again.
CREATE FUNCTION redis_internal.on_mirrors_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN PERFORM redis_internal.forget_mirror(OLD.tbl::oid); END IF;
  IF TG_OP <> 'DELETE' THEN PERFORM redis_internal.forget_mirror(NEW.tbl::oid); END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER pg_redis_mirrors_change AFTER INSERT OR UPDATE OR DELETE ON redis_internal.mirrors
  FOR EACH ROW EXECUTE FUNCTION redis_internal.on_mirrors_change();

CREATE PROCEDURE redis_backfill(tbl regclass)
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

-- ALTER TABLE that breaks a mirror's template, column list or filter is refused.
CREATE FUNCTION redis_internal.on_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  r record;
BEGIN
  FOR r IN
    SELECT DISTINCT c.objid
      FROM pg_event_trigger_ddl_commands() c
      JOIN redis_internal.mirrors m ON m.tbl::oid = c.objid
     WHERE c.command_tag IN ('ALTER TABLE', 'DROP INDEX', 'ALTER INDEX', 'DROP TRIGGER')
  LOOP
    PERFORM redis_internal.revalidate(r.objid);
  END LOOP;
END $$;
CREATE EVENT TRIGGER pg_redis_ddl_end ON ddl_command_end
  WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION redis_internal.on_ddl_end();

-- A hand-written CREATE TRIGGER ... EXECUTE FUNCTION redis_mirror_trigger(...) registers a mirror.
CREATE FUNCTION redis_internal.on_create_trigger() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  r record;
BEGIN
  FOR r IN
    SELECT c.objid
      FROM pg_event_trigger_ddl_commands() c
      JOIN pg_trigger t ON t.oid = c.objid
      JOIN pg_proc p ON p.oid = t.tgfoid
     WHERE c.object_type = 'trigger' AND p.proname = 'redis_mirror_trigger'
  LOOP
    PERFORM redis_internal.register_trigger(r.objid);
  END LOOP;
END $$;
CREATE EVENT TRIGGER pg_redis_create_trigger ON ddl_command_end
  WHEN TAG IN ('CREATE TRIGGER') EXECUTE FUNCTION redis_internal.on_create_trigger();
