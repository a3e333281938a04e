-- No pg_redis function is executable by PUBLIC: Redis holds copies of rows, and a role must not
-- read through Redis what it may not SELECT. A DBA grants what an application role needs (README).
DO $$
DECLARE f regprocedure;
BEGIN
  FOR f IN
    SELECT p.oid::regprocedure FROM pg_proc p
    JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
    JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_redis'
  LOOP
    EXECUTE format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', f);
  END LOOP;
END $$;

-- The views are for monitoring: pg_monitor members may read them; redis_worker_info() and
-- redis_read_through_counts() are what redis_stats calls, harmless to anyone, as are the
-- shared read cache's counters (redis_cache_info()).
GRANT EXECUTE ON FUNCTION redis_worker_info() TO PUBLIC;
GRANT EXECUTE ON FUNCTION redis_read_through_counts() TO PUBLIC;
GRANT EXECUTE ON FUNCTION redis_cache_info() TO PUBLIC;
REVOKE ALL ON redis_mirrors, redis_stats, redis_dead_letters FROM PUBLIC;
GRANT SELECT ON redis_mirrors, redis_stats, redis_dead_letters TO pg_monitor;
