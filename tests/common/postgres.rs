//! A private PostgreSQL server for the fleet tests: Debian's `postgresql`
//! binaries (scripts/test installs the package when it is missing), a new
//! cluster made by `initdb` in a temporary folder, run by `pg_ctl` on a free
//! loopback port as an unprivileged user (PostgreSQL refuses to run as
//! root), stopped when dropped. Each test asks for its own database.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::{is_root, wait_for};

/// The role every test database belongs to (trust authentication on
/// loopback: the server is private to this test process).
pub const ROLE: &str = "hotfolder";

/// Where Debian installs the server's programs (`/usr/lib/postgresql/N/bin`).
fn server_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
        .collect();
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "Debian's postgresql is not installed (no /usr/lib/postgresql/*/bin/initdb); \
             run scripts/test, which installs it with apt-get"
        )
    })
}

/// A running private server.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Its loopback port.
    pub port: u16,
}

impl Postgres {
    /// initdb and start a new cluster; panics with the server's own words
    /// when it cannot.
    pub fn start() -> Self {
        let bin = server_bin();
        let dir = tempfile::Builder::new()
            .prefix("hotfolder-pg-")
            .tempdir()
            .expect("temp dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let server = Postgres { dir, bin, port };
        if is_root() {
            // The cluster belongs to the user that runs it.
            let status = Command::new("chown")
                .args(["-R", "65534:65534"])
                .arg(server.dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster folder");
        }
        let data = server.data();
        server.run_checked(
            "initdb",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-U",
                ROLE,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        server.start_again();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// One of the server's programs, run as the cluster's owner.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = if is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(&path);
            c
        } else {
            Command::new(&path)
        };
        command.current_dir(self.dir.path());
        command
    }

    /// Run one of the server's programs as the cluster's owner.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    /// Run the psql script `file` as the superuser, connected to `db`, with
    /// `env` set (as an operator would run a setup script); answers psql's
    /// output, stdout and stderr together, and whether it succeeded.
    pub fn script(&self, db: &str, file: &Path, env: &[(&str, &str)]) -> (bool, String) {
        // A copy the cluster's owner can read, wherever the original is.
        let copy = self.dir.path().join("script.sql");
        std::fs::copy(file, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", file.display()));
        let _ = Command::new("chmod").arg("644").arg(&copy).status();
        let port = self.port.to_string();
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &port, "-U", ROLE, "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-f"])
            .arg(&copy)
            .envs(env.iter().copied())
            .output()
            .expect("run psql");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn run_checked(&self, program: &str, args: &[&str]) {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    /// Start the server (again, after [`Postgres::stop`]); waits until it
    /// accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let data = self.data();
        let log = self.log();
        self.run_checked(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-l",
                log.to_str().expect("utf-8 path"),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stop the server at once (in-flight transactions are rolled back).
    pub fn stop(&self) {
        let data = self.data();
        self.run_checked(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// A new, empty database; answers its URL.
    pub fn database(&self, name: &str) -> String {
        self.sql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{name}", self.port)
    }

    /// Run `statement` in database `db` with psql; answers its output
    /// (unaligned, tuples only).
    pub fn sql(&self, db: &str, statement: &str) -> String {
        let port = self.port.to_string();
        let mut last = String::new();
        // A server that just started may still refuse for a moment.
        wait_for("psql to answer", Duration::from_secs(30), || {
            let out = self.run(
                "psql",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    ROLE,
                    "-d",
                    db,
                    "-At",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    statement,
                ],
            );
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            if out.status.success() {
                Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
            } else if last.contains("could not connect") {
                None
            } else {
                panic!("{statement}: {last}")
            }
        })
    }

    /// Poll `query` in database `db` until it answers `expected` (within
    /// `deadline`).
    pub fn wait_for_answer(&self, db: &str, query: &str, expected: &str, deadline: Duration) {
        wait_for(&format!("{query} to answer {expected}"), deadline, || {
            (self.sql(db, query) == expected).then_some(())
        });
    }

    /// The folder holding the cluster (for a look after a failure).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}
