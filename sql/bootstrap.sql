-- pg_redis bootstrap: the extension's internal schema. Ordinary roles cannot read it; the
-- extension's functions reach it with their own privileges.

-- Redis keys and values travel as UTF-8 and pg_redis passes text through unconverted: in a
-- database of another encoding it would store or return wrongly encoded text. Refuse clearly.
DO $$
BEGIN
  IF pg_catalog.current_setting('server_encoding') <> 'UTF8' THEN
    RAISE EXCEPTION 'pg_redis: this database''s encoding is %; pg_redis needs a UTF8 database',
      pg_catalog.current_setting('server_encoding')
      USING ERRCODE = '0A000',
            HINT = 'CREATE DATABASE ... ENCODING ''UTF8'' TEMPLATE template0, and create the extension there.';
  END IF;
END $$;

CREATE SCHEMA redis_internal;
REVOKE ALL ON SCHEMA redis_internal FROM PUBLIC;
COMMENT ON SCHEMA redis_internal IS 'pg_redis internals (mirror catalog, queue); not for direct use';
