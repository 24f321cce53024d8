-- The PostgreSQL side of a hotfolder fleet, with the least rights a node
-- needs: it may log in, connect to one database, and own one schema in it
-- (hotfolder creates and migrates its tables there at start). No superuser,
-- no CREATEDB or CREATEROLE, nothing in `public`.
--
-- Run once, as a superuser, with the nodes' password in the environment:
--
--   HOTFOLDER_NODE_PASSWORD='...' psql -v ON_ERROR_STOP=1 -U postgres -f deploy/fleet/init.sql
--
-- (deploy/fleet/docker-compose.yml mounts it where the postgres image runs
-- it on first start.) Running it again changes nothing: a role, database or
-- schema that exists is left as it is (the password too). The nodes then use
--   postgres://hotfolder_node:PASSWORD@HOST:5432/hotfolder
-- (percent-encode characters such as @ : / in the password).

\getenv node_password HOTFOLDER_NODE_PASSWORD
\if :{?node_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'set HOTFOLDER_NODE_PASSWORD to the password the nodes will use'; END $$;
\endif

SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hotfolder_node') AS new_role,
       NOT EXISTS (SELECT FROM pg_database WHERE datname = 'hotfolder') AS new_database
\gset
\if :new_role
  CREATE ROLE hotfolder_node LOGIN PASSWORD :'node_password'
      NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
\endif
\if :new_database
  CREATE DATABASE hotfolder;
\endif
REVOKE ALL ON DATABASE hotfolder FROM PUBLIC;
GRANT CONNECT ON DATABASE hotfolder TO hotfolder_node;
ALTER ROLE hotfolder_node IN DATABASE hotfolder SET search_path = hotfolder;

\connect hotfolder
REVOKE ALL ON SCHEMA public FROM PUBLIC;
CREATE SCHEMA IF NOT EXISTS hotfolder AUTHORIZATION hotfolder_node;
