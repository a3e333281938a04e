-- pg_redis bootstrap: the extension's internal schema. Ordinary roles cannot read it; the
-- extension's functions reach it with their own privileges.
CREATE SCHEMA redis_internal;
REVOKE ALL ON SCHEMA redis_internal FROM PUBLIC;
COMMENT ON SCHEMA redis_internal IS 'pg_redis internals (mirror catalog, queue); not for direct use';
