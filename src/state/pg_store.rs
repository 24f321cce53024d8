//! The job store in PostgreSQL, for a fleet of nodes on one share: the
//! same records as the sled store (a job is one JSON document with a
//! version), in tables every node reads and writes. The schema comes from
//! versioned migrations applied at start inside one transaction, under an
//! advisory lock so that nodes starting together apply each once; a node
//! refuses a schema newer than it knows.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::{ContentEntry, Job, JobState, Notification, Page, StoreError, decode};

/// The schema, one migration per version, applied in order. Never edit a
/// released one: add the next.
const MIGRATIONS: &[&str] = &[
    // 1: jobs, the path index, content fingerprints, the installation id.
    "CREATE TABLE hotfolder_meta (key text PRIMARY KEY, value text NOT NULL);
     CREATE SEQUENCE hotfolder_job_ids;
     CREATE TABLE hotfolder_jobs (
         id bigint PRIMARY KEY,
         watch text NOT NULL,
         relpath bytea NOT NULL,
         state text NOT NULL,
         record jsonb NOT NULL,
         updated_at timestamptz NOT NULL DEFAULT now()
     );
     CREATE INDEX hotfolder_jobs_by_path ON hotfolder_jobs (watch, relpath, id);
     CREATE INDEX hotfolder_jobs_by_state ON hotfolder_jobs (state, id);
     CREATE TABLE hotfolder_content (
         provider text NOT NULL,
         fingerprint text NOT NULL,
         job bigint NOT NULL,
         PRIMARY KEY (provider, fingerprint, job)
     );",
    // 2: one job per version of a file fleet-wide; the nodes of the fleet.
    "ALTER TABLE hotfolder_jobs ADD COLUMN source_key text;
     CREATE UNIQUE INDEX hotfolder_jobs_one_per_version ON hotfolder_jobs (source_key)
         WHERE source_key IS NOT NULL;
     CREATE TABLE hotfolder_nodes (
         name text PRIMARY KEY,
         instance text NOT NULL,
         started_at timestamptz NOT NULL DEFAULT now(),
         heartbeat timestamptz NOT NULL DEFAULT now()
     );",
    // 3: claims: who holds a job, until when, and the epoch that fences
    // every write of an earlier holder.
    "ALTER TABLE hotfolder_jobs ADD COLUMN holder text;
     ALTER TABLE hotfolder_jobs ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
     ALTER TABLE hotfolder_jobs ADD COLUMN lease_until timestamptz;
     CREATE INDEX hotfolder_jobs_by_lease ON hotfolder_jobs (lease_until)
         WHERE state NOT IN ('done', 'failed', 'superseded');",
    // 4: the webhook outbox: one row per event and webhook.
    "CREATE TABLE hotfolder_outbox (
         key text PRIMARY KEY,
         next_at timestamptz NOT NULL,
         delivery jsonb NOT NULL
     );
     CREATE INDEX hotfolder_outbox_by_time ON hotfolder_outbox (next_at);",
    // 5: finished jobs by when they finished (the status page's "today").
    "CREATE INDEX hotfolder_jobs_finished_by_time ON hotfolder_jobs (updated_at)
         WHERE state IN ('done', 'failed');",
];

/// The SQL condition "the job is unfinished" (the states that are not
/// [`JobState::is_terminal`]), for the queries of claims and leases. A
/// macro, so that queries stay string literals.
macro_rules! unfinished {
    () => {
        "state NOT IN ('done', 'failed', 'superseded')"
    };
}

/// Any number: the advisory lock that serialises migrations across nodes.
const MIGRATION_LOCK: i64 = 0x686f_7466_6f6c_6472;

/// The PostgreSQL store. Cheap to clone (a pool).
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    installation: Arc<str>,
    /// This node's name and lease, when it runs jobs (not for `status`).
    claims: Option<(Arc<str>, std::time::Duration)>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("PgStore")
            .field("installation", &self.installation)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

impl PgStore {
    /// Connect, apply the migrations this build knows, read (or make) the
    /// installation id.
    ///
    /// # Errors
    /// [`StoreError::Open`] naming what failed (never the URL's password),
    /// or [`StoreError::SchemaTooNew`].
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(|e| StoreError::Open {
            path: "store.url".into(),
            reason: format!("not a PostgreSQL URL: {e}"),
        })?;
        let target = format!(
            "postgres://{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or_default()
        );
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Open {
                path: target.clone().into(),
                reason: format!(
                    "cannot connect: {e}; check store.url, the server and the role's password"
                ),
            })?;
        migrate(&pool).await.map_err(|e| match e {
            StoreError::Database(reason) => StoreError::Open {
                path: target.clone().into(),
                reason: format!("cannot prepare the schema: {reason}"),
            },
            other => other,
        })?;
        let fresh = format!("{:016x}", rand::random::<u64>());
        sqlx::query(
            "INSERT INTO hotfolder_meta (key, value) VALUES ('installation', $1) ON CONFLICT (key) DO NOTHING",
        )
        .bind(&fresh)
        .execute(&pool)
        .await
        .map_err(unavailable)?;
        let installation: String =
            sqlx::query_scalar("SELECT value FROM hotfolder_meta WHERE key = 'installation'")
                .fetch_one(&pool)
                .await
                .map_err(unavailable)?;
        Ok(PgStore {
            pool,
            installation: installation.into(),
            claims: None,
        })
    }

    /// The same store, writing as node `node` whose claims last `lease`.
    pub fn as_node(mut self, node: &str, lease: std::time::Duration) -> Self {
        self.claims = Some((node.into(), lease));
        self
    }

    fn lease_interval(&self) -> String {
        let lease = self
            .claims
            .as_ref()
            .map_or(std::time::Duration::ZERO, |c| c.1);
        format!("{} milliseconds", lease.as_millis())
    }

    /// Renew the lease of the unfinished jobs among `jobs` (the ones this
    /// node runs) that it still holds. A job another node took over
    /// meanwhile is not renewed (its holder changed); nor is one this node
    /// holds but runs nothing for, which lapses and is claimed again.
    ///
    /// # Errors
    /// A database failure.
    pub async fn renew_claims(&self, jobs: &[u64]) -> Result<u64, StoreError> {
        let Some((node, _)) = &self.claims else {
            return Ok(0);
        };
        let ids: Vec<i64> = jobs.iter().map(|id| *id as i64).collect();
        let renewed = sqlx::query(concat!(
            "UPDATE hotfolder_jobs SET lease_until = now() + $2::interval
             WHERE holder = $1 AND id = ANY($3) AND ",
            unfinished!()
        ))
        .bind(&**node)
        .bind(self.lease_interval())
        .bind(ids)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(renewed.rows_affected())
    }

    /// Before an act that cannot be fenced afterwards (deleting a remote
    /// upload): prove this node still holds `job` under its epoch and
    /// renew the lease, so no other node can take the job for one more
    /// lease while the act is done.
    ///
    /// # Errors
    /// [`StoreError::Fenced`] when another node holds it now, or a
    /// database failure.
    pub async fn confirm_hold(&self, job: &Job) -> Result<(), StoreError> {
        let Some((node, _)) = &self.claims else {
            return Ok(());
        };
        if job.epoch == 0 {
            return Ok(());
        }
        let held = sqlx::query(
            "UPDATE hotfolder_jobs SET lease_until = now() + $4::interval
             WHERE id = $1 AND epoch = $2 AND holder = $3",
        )
        .bind(job.id as i64)
        .bind(job.epoch as i64)
        .bind(&**node)
        .bind(self.lease_interval())
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        if held.rows_affected() == 0 {
            return Err(StoreError::Fenced(job.id));
        }
        Ok(())
    }

    /// A failed job about to be retried by this process: it claims the job
    /// (a new epoch; the node that failed it runs nothing for it any more),
    /// so the retry's own writes are fenced against a second retry elsewhere.
    ///
    /// # Errors
    /// [`StoreError::Fenced`] when the job is no longer failed (retried
    /// meanwhile elsewhere), or a database failure.
    pub async fn claim_for_retry(&self, job: &mut Job) -> Result<(), StoreError> {
        let Some((node, _)) = &self.claims else {
            return Ok(());
        };
        let epoch: Option<i64> = sqlx::query_scalar(
            "UPDATE hotfolder_jobs SET holder = $2, epoch = epoch + 1,
                 lease_until = now() + $3::interval
             WHERE id = $1 AND state = 'failed' RETURNING epoch",
        )
        .bind(job.id as i64)
        .bind(&**node)
        .bind(self.lease_interval())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        let epoch = epoch.ok_or(StoreError::Fenced(job.id))?;
        job.epoch = epoch as u64;
        job.node = Some(node.to_string());
        Ok(())
    }

    /// Let go of a job this process claimed but will not run (a `retry`
    /// with no daemon behind it): any node's next heartbeat claims it.
    ///
    /// # Errors
    /// A database failure.
    pub async fn release_claim(&self, job: &Job) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE hotfolder_jobs SET holder = NULL, lease_until = NULL
             WHERE id = $1 AND epoch = $2",
        )
        .bind(job.id as i64)
        .bind(job.epoch as i64)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    /// At start: claim again the unfinished jobs this node held before it
    /// stopped (its name is its own again, so that instance is gone).
    ///
    /// # Errors
    /// A database failure.
    pub async fn claim_own(&self) -> Result<Vec<Job>, StoreError> {
        self.claim("holder = $1", i64::MAX).await
    }

    /// Claim up to `limit` unfinished jobs whose lease ran out (their node
    /// died or froze): each gets this node as holder and a new epoch, so
    /// the earlier holder's writes are refused from now on.
    ///
    /// # Errors
    /// A database failure.
    pub async fn claim_expired(&self, limit: i64) -> Result<Vec<Job>, StoreError> {
        self.claim("(lease_until IS NULL OR lease_until < now())", limit)
            .await
    }

    /// Claim at most `limit` of the unfinished jobs `condition` selects
    /// (`$1` is this node), oldest first.
    async fn claim(&self, condition: &str, limit: i64) -> Result<Vec<Job>, StoreError> {
        let Some((node, _)) = &self.claims else {
            return Ok(Vec::new());
        };
        let sql = format!(
            "UPDATE hotfolder_jobs SET holder = $1, epoch = epoch + 1,
                 lease_until = now() + $2::interval
             WHERE id IN (
                 SELECT id FROM hotfolder_jobs
                 WHERE {unfinished} AND {condition}
                 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
             RETURNING record::text AS record, epoch",
            unfinished = unfinished!()
        );
        let rows = sqlx::query(&sql)
            .bind(&**node)
            .bind(self.lease_interval())
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let mut job = decode_row(row)?;
                let epoch: i64 = row.try_get("epoch").map_err(unavailable)?;
                job.epoch = epoch as u64;
                job.node = Some(node.to_string());
                Ok(job)
            })
            .collect()
    }

    /// Job `id` for this node to work on: `None` when another node holds
    /// it now. This node's own claim stands while it holds the job (its name
    /// is its own), so the copy carries the claim's current epoch.
    ///
    /// # Errors
    /// A database failure.
    pub async fn get_held(&self, id: u64) -> Result<Option<Job>, StoreError> {
        let Some((node, _)) = &self.claims else {
            return self.get(id).await.map(Some);
        };
        let row = sqlx::query(
            "SELECT record::text AS record, epoch, holder FROM hotfolder_jobs WHERE id = $1",
        )
        .bind(id as i64)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?
        .ok_or(StoreError::NotFound(id))?;
        let holder: Option<String> = row.try_get("holder").map_err(unavailable)?;
        if holder.as_deref() != Some(&**node) {
            return Ok(None);
        }
        let mut job = decode_row(&row)?;
        let epoch: i64 = row.try_get("epoch").map_err(unavailable)?;
        job.epoch = epoch as u64;
        Ok(Some(job))
    }

    /// The nodes of the fleet: name, seconds since the last heartbeat,
    /// when it started, and how many unfinished jobs it holds.
    ///
    /// # Errors
    /// A database failure.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT n.name, extract(epoch FROM now() - n.heartbeat)::float8 AS ago,
                 n.started_at::text AS started_at,
                 (SELECT count(*) FROM hotfolder_jobs j WHERE j.holder = n.name AND j.",
            unfinished!(),
            ") AS held
             FROM hotfolder_nodes n ORDER BY n.name"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                Ok(NodeView {
                    name: row.try_get("name").map_err(unavailable)?,
                    heartbeat_seconds_ago: row
                        .try_get::<f64, _>("ago")
                        .map_err(unavailable)?
                        .max(0.0),
                    started_at: row.try_get("started_at").map_err(unavailable)?,
                    jobs_held: row.try_get::<i64, _>("held").map_err(unavailable)? as u64,
                })
            })
            .collect()
    }

    /// Does the database answer?
    ///
    /// # Errors
    /// A database failure.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) fn installation(&self) -> &str {
        &self.installation
    }

    pub(super) async fn next_id(&self) -> Result<u64, StoreError> {
        let id: i64 = sqlx::query_scalar("SELECT nextval('hotfolder_job_ids')")
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(id as u64)
    }

    /// Durable when the statement returns (the commit is synchronous). A
    /// job held under a claim is written only while the claim's epoch is
    /// current: otherwise nothing changes and [`StoreError::Fenced`] stops
    /// this node's work on it.
    pub(super) async fn put(&self, job: &mut Job) -> Result<(), StoreError> {
        job.updated_at = jiff::Timestamp::now();
        let record = serde_json::to_string(job).map_err(|source| StoreError::Decode {
            key: job.id.to_string(),
            source,
        })?;
        if job.epoch > 0 {
            let written = sqlx::query(
                "UPDATE hotfolder_jobs SET watch = $2, relpath = $3, state = $4,
                     record = $5::jsonb, updated_at = now()
                 WHERE id = $1 AND epoch = $6",
            )
            .bind(job.id as i64)
            .bind(&job.watch)
            .bind(job.relpath.as_os_str().as_bytes())
            .bind(job.state.as_str())
            .bind(record)
            .bind(job.epoch as i64)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            if written.rows_affected() == 0 {
                return Err(StoreError::Fenced(job.id));
            }
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO hotfolder_jobs (id, watch, relpath, state, record, updated_at)
             VALUES ($1, $2, $3, $4, $5::jsonb, now())
             ON CONFLICT (id) DO UPDATE SET watch = EXCLUDED.watch, relpath = EXCLUDED.relpath,
                 state = EXCLUDED.state, record = EXCLUDED.record, updated_at = now()",
        )
        .bind(job.id as i64)
        .bind(&job.watch)
        .bind(job.relpath.as_os_str().as_bytes())
        .bind(job.state.as_str())
        .bind(record)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    /// The same as [`PgStore::put`]: every commit is durable.
    pub(super) async fn put_buffered(&self, job: &mut Job) -> Result<(), StoreError> {
        self.put(job).await
    }

    /// Nothing to do: every statement was committed durably.
    pub(super) async fn outbox_add(
        &self,
        delivery: &Notification,
        job: &Job,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        if job.epoch > 0 {
            // The job's row is held until the commit: no claim moves its
            // epoch between this check and the insert.
            let epoch: Option<i64> =
                sqlx::query_scalar("SELECT epoch FROM hotfolder_jobs WHERE id = $1 FOR SHARE")
                    .bind(job.id as i64)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            if epoch != Some(job.epoch as i64) {
                return Err(StoreError::Fenced(job.id));
            }
        }
        sqlx::query(
            "INSERT INTO hotfolder_outbox (key, next_at, delivery) VALUES ($1, now(), $2::jsonb)
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(&delivery.key)
        .bind(delivery_json(delivery)?)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn outbox_due(&self, limit: usize) -> Result<Vec<Notification>, StoreError> {
        // Taken for a while, so that the other nodes leave them alone.
        let rows: Vec<String> = sqlx::query_scalar(
            "UPDATE hotfolder_outbox SET next_at = now() + make_interval(secs => $2)
             WHERE key IN (SELECT key FROM hotfolder_outbox WHERE next_at <= now()
                           ORDER BY next_at LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING delivery::text",
        )
        .bind(limit as i64)
        .bind(crate::notify::SENDING_FOR.as_secs_f64())
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(|r| delivery_of(r)).collect()
    }

    pub(super) async fn outbox_update(&self, delivery: &Notification) -> Result<(), StoreError> {
        sqlx::query("UPDATE hotfolder_outbox SET next_at = $2::timestamptz, delivery = $3::jsonb WHERE key = $1")
            .bind(&delivery.key)
            .bind(delivery.next_at.to_string())
            .bind(delivery_json(delivery)?)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn outbox_remove(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM hotfolder_outbox WHERE key = $1")
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn outbox(&self, limit: usize) -> Result<Vec<Notification>, StoreError> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT delivery::text FROM hotfolder_outbox ORDER BY next_at LIMIT $1",
        )
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(|r| delivery_of(r)).collect()
    }

    pub(super) async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT value FROM hotfolder_meta WHERE key = $1")
            .bind(format!("setting/{key}"))
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)
    }

    pub(super) async fn swap_setting(
        &self,
        key: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<bool, StoreError> {
        let key = format!("setting/{key}");
        let done = match expected {
            None => {
                sqlx::query(
                    "INSERT INTO hotfolder_meta (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO NOTHING",
                )
                .bind(&key)
                .bind(value)
                .execute(&self.pool)
                .await
            }
            Some(expected) => {
                sqlx::query("UPDATE hotfolder_meta SET value = $3 WHERE key = $1 AND value = $2")
                    .bind(&key)
                    .bind(expected)
                    .bind(value)
                    .execute(&self.pool)
                    .await
            }
        }
        .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Record a new job unless one exists for this version of its file
    /// (two nodes saw it become stable at the same moment): `false` then,
    /// and nothing is written.
    pub(super) async fn create(&self, job: &mut Job) -> Result<bool, StoreError> {
        job.updated_at = jiff::Timestamp::now();
        // The creating node holds the new job under the first epoch.
        if let Some((node, _)) = &self.claims {
            job.epoch = 1;
            job.node = Some(node.to_string());
        }
        let record = serde_json::to_string(job).map_err(|source| StoreError::Decode {
            key: job.id.to_string(),
            source,
        })?;
        let holder = self.claims.as_ref().map(|(node, _)| node.to_string());
        let inserted = sqlx::query(
            "INSERT INTO hotfolder_jobs (id, watch, relpath, state, record, source_key,
                 holder, epoch, lease_until)
             VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8,
                 CASE WHEN $7::text IS NULL THEN NULL ELSE now() + $9::interval END)
             ON CONFLICT (source_key) WHERE source_key IS NOT NULL DO NOTHING",
        )
        .bind(job.id as i64)
        .bind(&job.watch)
        .bind(job.relpath.as_os_str().as_bytes())
        .bind(job.state.as_str())
        .bind(record)
        .bind(version_key(job))
        .bind(holder)
        .bind(job.epoch as i64)
        .bind(self.lease_interval())
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Join the fleet as `node`: refused while another live node (one whose
    /// heartbeat is younger than two leases) has the name.
    ///
    /// # Errors
    /// [`StoreError::NodeNameTaken`], or a database failure.
    pub async fn join(&self, node: &str, lease: std::time::Duration) -> Result<Member, StoreError> {
        // A node restarted after a crash finds its own last heartbeat: it
        // waits for it to go stale (two leases). A live twin keeps it fresh.
        let deadline = tokio::time::Instant::now() + lease * 2 + lease / 2;
        let mut said = false;
        loop {
            match self.try_join(node, lease).await {
                Err(StoreError::NodeNameTaken { seconds, .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    if !said {
                        tracing::info!(
                            node,
                            last_heartbeat_seconds_ago = seconds,
                            "this node name's last heartbeat is recent; waiting for it to go stale (a restart after a crash) or refusing if it stays alive"
                        );
                        said = true;
                    }
                    tokio::time::sleep(lease / 4).await;
                }
                other => return other,
            }
        }
    }

    async fn try_join(&self, node: &str, lease: std::time::Duration) -> Result<Member, StoreError> {
        let instance = format!("{:016x}", rand::random::<u64>());
        let stale = format!("{} milliseconds", lease.as_millis().saturating_mul(2));
        let joined = sqlx::query(
            "INSERT INTO hotfolder_nodes (name, instance) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET instance = EXCLUDED.instance,
                 started_at = now(), heartbeat = now()
             WHERE hotfolder_nodes.heartbeat < now() - $3::interval",
        )
        .bind(node)
        .bind(&instance)
        .bind(&stale)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        if joined.rows_affected() == 0 {
            let seconds: f64 = sqlx::query_scalar(
                "SELECT extract(epoch FROM now() - heartbeat)::float8 FROM hotfolder_nodes WHERE name = $1",
            )
            .bind(node)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
            return Err(StoreError::NodeNameTaken {
                node: node.to_string(),
                seconds: seconds.max(0.0),
            });
        }
        Ok(Member {
            pool: self.pool.clone(),
            node: node.to_string(),
            instance,
        })
    }

    pub(super) async fn get(&self, id: u64) -> Result<Job, StoreError> {
        let row =
            sqlx::query("SELECT record::text AS record, holder FROM hotfolder_jobs WHERE id = $1")
                .bind(id as i64)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?
                .ok_or(StoreError::NotFound(id))?;
        decode_row(&row)
    }

    pub(super) async fn page(&self, query: &Page) -> Result<Vec<Job>, StoreError> {
        let state = query.state.map(|s| s.as_str());
        let limit = query.limit.min(i64::MAX as usize) as i64;
        let sql = if query.newest_first {
            "SELECT record::text AS record, holder FROM hotfolder_jobs
             WHERE id < $1 AND ($2::text IS NULL OR state = $2) ORDER BY id DESC LIMIT $3"
        } else {
            "SELECT record::text AS record, holder FROM hotfolder_jobs
             WHERE id > $1 AND ($2::text IS NULL OR state = $2) ORDER BY id LIMIT $3"
        };
        let bound = match (query.newest_first, query.after) {
            (true, Some(after)) => after as i64,
            (true, None) => i64::MAX,
            (false, Some(after)) => after as i64,
            (false, None) => 0,
        };
        sqlx::query(sql)
            .bind(bound)
            .bind(state)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?
            .iter()
            .map(decode_row)
            .collect()
    }

    /// Per provider: unfinished jobs (the lease index covers exactly them)
    /// and those finished since `since` (through the finish-time index).
    pub(super) async fn provider_counts(
        &self,
        since: jiff::Timestamp,
    ) -> Result<BTreeMap<String, super::ProviderCounts>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT provider, state, count(*) AS n FROM (",
            " SELECT coalesce(record->>'provider', '') AS provider, state FROM hotfolder_jobs",
            " WHERE ",
            unfinished!(),
            " UNION ALL",
            " SELECT coalesce(record->>'provider', '') AS provider, state FROM hotfolder_jobs",
            " WHERE state IN ('done', 'failed') AND updated_at >= to_timestamp($1::float8)",
            ") AS counted GROUP BY provider, state"
        ))
        .bind(since.as_second() as f64)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let mut counts: BTreeMap<String, super::ProviderCounts> = BTreeMap::new();
        for row in rows {
            let state: String = row.get("state");
            let n: i64 = row.get("n");
            if let Some(state) = JobState::named(&state) {
                counts
                    .entry(row.get("provider"))
                    .or_default()
                    .add(state, n as u64);
            }
        }
        Ok(counts)
    }

    pub(super) async fn counts(&self) -> BTreeMap<JobState, u64> {
        let rows = sqlx::query("SELECT state, count(*) AS n FROM hotfolder_jobs GROUP BY state")
            .fetch_all(&self.pool)
            .await;
        let mut counts = BTreeMap::new();
        match rows {
            Ok(rows) => {
                for row in rows {
                    let state: String = row.get("state");
                    let n: i64 = row.get("n");
                    if let Some(state) = JobState::named(&state) {
                        counts.insert(state, n as u64);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot count jobs by state"),
        }
        counts
    }

    pub(super) async fn all(&self) -> Result<Vec<Job>, StoreError> {
        sqlx::query("SELECT record::text AS record, holder FROM hotfolder_jobs ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?
            .iter()
            .map(decode_row)
            .collect()
    }

    pub(super) async fn latest_for(
        &self,
        watch: &str,
        relpath: &Path,
    ) -> Result<Option<Job>, StoreError> {
        sqlx::query(
            "SELECT record::text AS record, holder FROM hotfolder_jobs
             WHERE watch = $1 AND relpath = $2 ORDER BY id DESC LIMIT 1",
        )
        .bind(watch)
        .bind(relpath.as_os_str().as_bytes())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(decode_row)
        .transpose()
    }

    pub(super) async fn record_content(
        &self,
        provider: &str,
        fingerprint: &str,
        job: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO hotfolder_content (provider, fingerprint, job) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(provider)
        .bind(fingerprint)
        .bind(job as i64)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn jobs_with_content(
        &self,
        provider: &str,
        fingerprint: &str,
    ) -> Result<Vec<u64>, StoreError> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT job FROM hotfolder_content WHERE provider = $1 AND fingerprint = $2 ORDER BY job",
        )
        .bind(provider)
        .bind(fingerprint)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(ids.into_iter().map(|id| id as u64).collect())
    }
}

/// What [`PgStore::import_history`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    /// Moved this many jobs and fingerprints.
    Moved {
        /// Jobs written.
        jobs: u64,
        /// Fingerprints that now point at them.
        fingerprints: u64,
    },
    /// This history was moved before (at this time): nothing was written.
    AlreadyMoved {
        /// When.
        at: String,
    },
}

/// Rows per statement when importing: few round trips, bounded memory.
const IMPORT_BATCH: usize = 1_000;

impl PgStore {
    /// Write another store's finished jobs and delivered fingerprints, in
    /// one transaction: all or nothing, and once per `origin` (that store's
    /// installation id). Jobs get ids from this store's sequence (the fleet
    /// numbers its own); fingerprints and `duplicate_of` follow them.
    ///
    /// # Errors
    /// A database failure (nothing is written then).
    pub async fn import_history(
        &self,
        origin: &str,
        jobs: &[Job],
        content: &[ContentEntry],
    ) -> Result<Imported, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let marker = format!("moved_from_sled:{origin}");
        let first = sqlx::query(
            "INSERT INTO hotfolder_meta (key, value) VALUES ($1, now()::text)
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(&marker)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if first.rows_affected() == 0 {
            let at: String = sqlx::query_scalar("SELECT value FROM hotfolder_meta WHERE key = $1")
                .bind(&marker)
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
            return Ok(Imported::AlreadyMoved { at });
        }
        let ids: Vec<i64> =
            sqlx::query_scalar("SELECT nextval('hotfolder_job_ids') FROM generate_series(1, $1)")
                .bind(jobs.len() as i64)
                .fetch_all(&mut *tx)
                .await
                .map_err(unavailable)?;
        let renumbered: BTreeMap<u64, u64> = jobs
            .iter()
            .zip(&ids)
            .map(|(job, id)| (job.id, *id as u64))
            .collect();
        for batch in jobs.chunks(IMPORT_BATCH) {
            let mut ids = Vec::with_capacity(batch.len());
            let mut watches = Vec::with_capacity(batch.len());
            let mut relpaths = Vec::with_capacity(batch.len());
            let mut states = Vec::with_capacity(batch.len());
            let mut records = Vec::with_capacity(batch.len());
            for job in batch {
                let mut job = job.clone();
                job.id = renumbered[&job.id];
                job.duplicate_of = job.duplicate_of.and_then(|id| renumbered.get(&id).copied());
                job.node = None;
                job.epoch = 0;
                records.push(
                    serde_json::to_string(&job).map_err(|source| StoreError::Decode {
                        key: job.id.to_string(),
                        source,
                    })?,
                );
                ids.push(job.id as i64);
                watches.push(job.watch);
                relpaths.push(job.relpath.as_os_str().as_bytes().to_vec());
                states.push(job.state.as_str().to_string());
            }
            sqlx::query(
                "INSERT INTO hotfolder_jobs (id, watch, relpath, state, record)
                 SELECT id, watch, relpath, state, record::jsonb
                 FROM UNNEST($1::bigint[], $2::text[], $3::bytea[], $4::text[], $5::text[])
                     AS t(id, watch, relpath, state, record)",
            )
            .bind(ids)
            .bind(watches)
            .bind(relpaths)
            .bind(states)
            .bind(records)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        let rows: Vec<(&str, &str, i64)> = content
            .iter()
            .flat_map(|entry| {
                entry.jobs.iter().filter_map(|id| {
                    let id = *renumbered.get(id)? as i64;
                    Some((entry.provider.as_str(), entry.fingerprint.as_str(), id))
                })
            })
            .collect();
        let fingerprints = content
            .iter()
            .filter(|e| e.jobs.iter().any(|id| renumbered.contains_key(id)))
            .count() as u64;
        for batch in rows.chunks(IMPORT_BATCH) {
            sqlx::query(
                "INSERT INTO hotfolder_content (provider, fingerprint, job)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[])
                 ON CONFLICT DO NOTHING",
            )
            .bind(batch.iter().map(|r| r.0).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.1).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.2).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(Imported::Moved {
            jobs: jobs.len() as u64,
            fingerprints,
        })
    }
}

/// One node of the fleet, for the API and the page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeView {
    /// Its name.
    pub name: String,
    /// Seconds since its last heartbeat.
    pub heartbeat_seconds_ago: f64,
    /// When it joined.
    pub started_at: String,
    /// Unfinished jobs it holds.
    pub jobs_held: u64,
}

/// This node's place in the fleet: its heartbeat keeps the name its own.
pub struct Member {
    pool: PgPool,
    node: String,
    instance: String,
}

impl Member {
    /// Say this node is alive. `false` when another node has taken the name
    /// (this one was presumed dead): it must stop.
    ///
    /// # Errors
    /// A database failure (retried by the caller).
    pub async fn heartbeat(&self) -> Result<bool, StoreError> {
        let beat = sqlx::query(
            "UPDATE hotfolder_nodes SET heartbeat = now() WHERE name = $1 AND instance = $2",
        )
        .bind(&self.node)
        .bind(&self.instance)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(beat.rows_affected() == 1)
    }

    /// Leave the fleet (a clean stop): the name is free at once.
    pub async fn leave(&self) {
        let _ = sqlx::query("DELETE FROM hotfolder_nodes WHERE name = $1 AND instance = $2")
            .bind(&self.node)
            .bind(&self.instance)
            .execute(&self.pool)
            .await;
    }
}

/// What makes a version of a file one job fleet-wide: watch, relative
/// path, size, mtime and inode (the device number differs from one NFS or
/// SMB client to the next; the server's inode does not).
fn version_key(job: &Job) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    hash.update(job.watch.as_bytes());
    hash.update([0]);
    hash.update(job.relpath.as_os_str().as_bytes());
    hash.update([0]);
    hash.update(job.signature.size.to_be_bytes());
    hash.update(job.signature.mtime_ns.to_be_bytes());
    hash.update(job.signature.ino.to_be_bytes());
    hex::encode(hash.finalize())
}

/// A job from a row; where the row has the claim's `holder`, that is the
/// job's node (the record names the node that last wrote it, which may have
/// lost the job since).
fn decode_row(row: &sqlx::postgres::PgRow) -> Result<Job, StoreError> {
    let record: String = row.try_get("record").map_err(unavailable)?;
    let mut job = decode(record.as_bytes())?;
    if let Ok(Some(holder)) = row.try_get::<Option<String>, _>("holder") {
        job.node = Some(holder);
    }
    Ok(job)
}

/// Apply the migrations the database has not seen, in one transaction under
/// an advisory lock; refuse a database migrated by a newer hotfolder.
async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    sqlx::query("CREATE TABLE IF NOT EXISTS hotfolder_schema (version integer NOT NULL)")
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    let current: Option<i32> = sqlx::query_scalar("SELECT max(version) FROM hotfolder_schema")
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
    let current = current.unwrap_or(0) as usize;
    if current > MIGRATIONS.len() {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: MIGRATIONS.len(),
        });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(current) {
        sqlx::raw_sql(migration)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query("INSERT INTO hotfolder_schema (version) VALUES ($1)")
            .bind(index as i32 + 1)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tracing::info!(version = index + 1, "store schema migrated");
    }
    tx.commit().await.map_err(unavailable)
}

fn delivery_json(delivery: &Notification) -> Result<String, StoreError> {
    serde_json::to_string(delivery).map_err(|source| StoreError::Decode {
        key: delivery.key.clone(),
        source,
    })
}

fn delivery_of(text: &str) -> Result<Notification, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Decode {
        key: "hotfolder_outbox".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use crate::lifecycle::STATES;

    #[test]
    fn the_unfinished_condition_names_exactly_the_terminal_states() {
        let condition = unfinished!();
        for state in STATES {
            let named = condition.contains(&format!("'{}'", state.as_str()));
            assert_eq!(named, state.is_terminal(), "{state:?} in {condition}");
        }
    }
}
