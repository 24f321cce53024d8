#!/usr/bin/env python3
"""Fleet figures (issue 13): several `hotfolder run` nodes on one folder,
their jobs in one PostgreSQL database that this script starts itself
(Debian's postgresql: initdb + pg_ctl in a scratch folder, fsync on, as an
unprivileged user when run as root). Nothing here is part of the test suite.

Prints, for 1, 2 and 3 nodes on this machine (they share its cores: the
figures show the cost of coordination, not scaling):
- files/s: FILES small files renamed into the watch at once, delivered by the
  `folder` provider onto tmpfs, from the rename until every file is in done/
  (`stable_for` 1s included);
- GiB/s: BIG files of BIG_MIB each, the same way (chunk_size 8 MiB);
- statements (each one round trip) and rows written per job, from
  pg_stat_statements; the fleet's upkeep (heartbeats, lease renewals, claims)
  is told apart by its statements and reported per second;
and the lease takeover time: two nodes, one uploading a file to a throttled
`hotfolder sandbox` is killed with SIGKILL; the time until the other logs
that it resumes the upload, and the bytes it sends again.

    bench/fleet.py                         # about 4 minutes
    bench/fleet.py --files 500 --big 2 --big-mib 64 --trials 1   # a quick look

Environment: BENCH_DIR (scratch parent, default /tmp), CARGO_TARGET_DIR.
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


def log(message):
    print(f"[fleet] {message}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, deadline_s, check, every=0.05):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"bench/fleet.py: timed out after {deadline_s}s waiting for {what}")


# --- PostgreSQL -------------------------------------------------------------


class Postgres:
    """A private server, as tests/common/postgres.rs starts one, with fsync on."""

    def __init__(self, scratch):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise SystemExit("bench/fleet.py: install Debian's postgresql (apt-get install postgresql)")
        self.bin = Path(bins[-1]).parent
        self.dir = Path(scratch) / "pg"
        self.dir.mkdir()
        self.port = free_port()
        self.root = os.geteuid() == 0
        if self.root:
            os.chown(self.dir, NOBODY, NOBODY)
        self.run("initdb", "-D", str(self.dir / "data"), "-U", "hotfolder", "--auth=trust", "-E", "UTF8")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=200 "
            "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track_utility=on"
        )
        self.run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-o", options, "-w", "start")

    def run(self, program, *args):
        command = [str(self.bin / program), *args]
        if self.root:
            command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *command]
        out = subprocess.run(command, cwd=self.dir, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"bench/fleet.py: {program} failed: {out.stdout}{out.stderr}")
        return out.stdout.strip()

    def sql(self, db, statement):
        return self.run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "hotfolder", "-d", db, "-At", "-c", statement)

    def database(self, name):
        self.sql("postgres", f'CREATE DATABASE "{name}"')
        self.sql(name, "CREATE EXTENSION pg_stat_statements")
        return f"postgres://hotfolder@127.0.0.1:{self.port}/{name}"

    def statements(self, db):
        """Statements the nodes ran in `db` so far (each one a round trip),
        and rows they wrote, per statement text; from pg_stat_statements,
        which counts at each statement's end (pg_stat_database lags)."""
        out = self.sql(
            db,
            "SELECT calls, CASE WHEN query ~* '^\\s*(insert|update|delete)' THEN rows ELSE 0 END, "
            "regexp_replace(left(query, 60), '\\s+', ' ', 'g') FROM pg_stat_statements s "
            f"JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '{db}' "
            "AND query !~* 'pg_stat_statements|CREATE EXTENSION|hotfolder_jobs GROUP BY holder'",
        )
        counts = {}
        for line in out.splitlines():
            calls, rows, query = line.split("|", 2)
            total = counts.setdefault(query, [0, 0])
            total[0] += int(calls)
            total[1] += int(rows)
        return counts

    def stop(self):
        self.run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")


# --- nodes ------------------------------------------------------------------


class Node:
    def __init__(self, binary, work, name, config):
        self.name = name
        self.log_path = work / f"{name}.log"
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(binary), "run", "-c", str(config)], cwd=work,
            stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=self.log_file,
        )
        wait_until(f"{name} to start (log: {self.log_path})", 30, lambda: "hotfolder running" in self.log() or self.process.poll() is not None)
        if self.process.poll() is not None:
            raise SystemExit(f"bench/fleet.py: {name} exited: {self.log()}")

    def log(self):
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))

    def cpu_seconds(self):
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)
        self.log_file.close()


def node_config(work, name, url, lease, provider, chunk):
    config = work / f"{name}.yaml"
    config.write_text(
        f"state_dir: ./state-{name}\nworkers: 4\nlog: {{ level: info, format: text }}\n"
        f"store: {{ type: postgres, url: \"{url}\", node: {name}, lease: {lease} }}\n"
        "defaults: { stable_for: 1s, rescan_every: 60s }\n"
        "watches:\n  - name: drop\n    path: ./drop\n    recursive: true\n"
        f"providers:\n  out: {{ {provider}, chunk_size: {chunk} }}\n"
        "rules:\n  - match: {}\n    provider: out\n"
    )
    return config


def done_count(work):
    done = work / "done" / "drop" / "batch"
    if not done.is_dir():
        return 0
    return sum(1 for e in os.scandir(done) if not e.name.endswith(".receipt.json"))


def write_sources(folder, count, size, prefix):
    folder.mkdir(parents=True)
    block = os.urandom(min(size, 1 << 20))
    for n in range(count):
        with open(folder / f"{prefix}{n:05d}.mp4", "wb") as f:
            left = size
            f.write(n.to_bytes(8, "little"))
            left -= 8
            while left > 0:
                piece = block[: min(left, len(block))]
                f.write(piece)
                left -= len(piece)


# The fleet's upkeep, not a job's work: heartbeats, lease renewals, claims.
UPKEEP = re.compile(r"hotfolder_nodes|SET lease_until = now\(\) \+|SET holder = \$1, epoch")


def total(statements):
    return sum(c for c, _ in statements.values()), sum(r for _, r in statements.values())


def drop_run(binary, pg, scratch, nodes, count, size, label):
    """Deliver `count` files of `size` with `nodes` nodes; answers the figures."""
    db = f"{label}_{nodes}"
    url = pg.database(db)
    work = Path(tempfile.mkdtemp(prefix=f"{db}-", dir=scratch))
    outbox = Path(tempfile.mkdtemp(prefix=f"hotfolder-fleet-{db}-", dir="/dev/shm"))
    (work / "drop").mkdir()
    write_sources(work / "staged" / "batch", count, size, "f")
    provider = f"type: folder, path: \"{outbox}\""
    running = [Node(binary, work, f"node-{i + 1}", node_config(work, f"node-{i + 1}", url, "30s", provider, "8MiB")) for i in range(nodes)]
    try:
        before = pg.statements(db)
        cpu_before = sum(n.cpu_seconds() for n in running)
        start = time.monotonic()
        os.rename(work / "staged" / "batch", work / "drop" / "batch")
        wait_until(f"{count} files done", 600, lambda: done_count(work) >= count, every=0.02)
        wall = time.monotonic() - start
        cpu = sum(n.cpu_seconds() for n in running) - cpu_before
        after = pg.statements(db)
        seconds = time.monotonic() - start
        row_bytes = float(pg.sql(db, "SELECT avg(pg_column_size(record)) FROM hotfolder_jobs"))
        table_bytes = int(pg.sql(db, "SELECT pg_total_relation_size('hotfolder_jobs') + pg_total_relation_size('hotfolder_content')"))
        per_node = pg.sql(db, "SELECT string_agg(holder || ' ' || n, ', ' ORDER BY holder) FROM (SELECT holder, count(*) n FROM hotfolder_jobs GROUP BY holder) t")
        delivered = len(os.listdir(outbox / "batch"))
        if delivered != count:
            raise SystemExit(f"bench/fleet.py: {delivered} of {count} files in the outbox")
        used = {q: (c - before.get(q, [0, 0])[0], r - before.get(q, [0, 0])[1]) for q, (c, r) in after.items()}
        upkeep = {q: v for q, v in used.items() if UPKEEP.search(q)}
        work = {q: v for q, v in used.items() if not UPKEEP.search(q)}
        calls, rows = total(work)
        return {
            "wall": wall,
            "files_per_s": count / wall,
            "gib_per_s": count * size / wall / (1 << 30),
            "statements_per_job": calls / count,
            "rows_per_job": rows / count,
            "cpu_per_job_ms": cpu / count * 1000,
            "upkeep_per_s": total(upkeep)[0] / seconds,
            "per_node": per_node,
            "row_bytes": row_bytes,
            "table_bytes_per_job": table_bytes / count,
            "top": sorted(work.items(), key=lambda kv: -kv[1][0])[:8],
        }
    finally:
        for n in running:
            n.stop()
        shutil.rmtree(outbox, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def sandbox_offset(base, name):
    with urllib.request.urlopen(base + "/_sandbox/tus", timeout=5) as r:
        uploads = json.loads(r.read())
    return max((u["offset"] for u in uploads if u.get("metadata", {}).get("filename") == name), default=0)


def takeover_trial(binary, pg, scratch, trial, lease_s):
    db = f"takeover_{trial}"
    url = pg.database(db)
    work = Path(tempfile.mkdtemp(prefix=f"{db}-", dir=scratch))
    (work / "drop").mkdir()
    sandbox_log = open(work / "sandbox.log", "wb")
    sandbox = subprocess.Popen(
        [str(binary), "sandbox", "--listen", "127.0.0.1:0", "--data", str(work / "sandbox"), "--throttle", "16MiB"],
        cwd=work, stdout=subprocess.PIPE, stderr=sandbox_log,
    )
    line = sandbox.stdout.readline().decode()
    match = re.search(r"\(tus: (\S+)\)", line)
    if not match:
        raise SystemExit(f"bench/fleet.py: the sandbox did not start: {line!r}")
    endpoint = match.group(1)
    base = endpoint.split("/tus/")[0]
    provider = f"type: tus, endpoint: \"{endpoint}\""
    chunk = 4 << 20
    lease = f"{lease_s}s"
    first = Node(binary, work, "node-1", node_config(work, "node-1", url, lease, provider, "4MiB"))
    second = None
    try:
        write_sources(work / "staged" / "batch", 1, 256 << 20, "big")
        os.rename(work / "staged" / "batch", work / "drop" / "batch")
        wait_until("node-1 to hold the job", 30, lambda: pg.sql(db, "SELECT holder FROM hotfolder_jobs") == "node-1")
        second = Node(binary, work, "node-2", node_config(work, "node-2", url, lease, provider, "4MiB"))
        wait_until("16 MiB at the sandbox", 60, lambda: sandbox_offset(base, "big00000.mp4") >= 16 << 20)
        at_kill = sandbox_offset(base, "big00000.mp4")
        killed = time.monotonic()
        first.stop(signal.SIGKILL)
        wait_until("node-2 to resume", lease_s * 4 + 30, lambda: " resuming " in second.log(), every=0.02)
        took = time.monotonic() - killed
        resumed = int(re.search(r" resuming .*offset=(\d+)", second.log()).group(1))
        return took, (at_kill - resumed) / chunk
    finally:
        first.stop(signal.SIGKILL)
        if second:
            second.stop(signal.SIGKILL)
        sandbox.kill()
        sandbox.wait()
        sandbox_log.close()
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--file-kib", type=int, default=16)
    parser.add_argument("--big", type=int, default=6)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--lease", type=int, default=5, help="seconds, for the takeover trials")
    parser.add_argument("binary", nargs="?")
    args = parser.parse_args()
    if args.binary:
        binary = Path(args.binary).resolve()
    else:
        log("cargo build --release ...")
        subprocess.run(["cargo", "build", "--release", "--locked", "--quiet"], cwd=ROOT, check=True)
        target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        binary = (target / "release" / "hotfolder").resolve()
    scratch = Path(tempfile.mkdtemp(prefix="hotfolder-fleet-", dir=os.environ.get("BENCH_DIR")))
    if os.geteuid() == 0:
        os.chmod(scratch, 0o755)
    pg = Postgres(scratch)
    rows = []
    try:
        for nodes in (1, 2, 3):
            log(f"{nodes} node(s): {args.files} x {args.file_kib} KiB ...")
            small = drop_run(binary, pg, scratch, nodes, args.files, args.file_kib << 10, "small")
            log(f"{nodes} node(s): {args.big} x {args.big_mib} MiB ...")
            big = drop_run(binary, pg, scratch, nodes, args.big, args.big_mib << 20, "big")
            rows.append((nodes, small, big))
        takeovers = []
        for trial in range(args.trials):
            log(f"takeover trial {trial + 1} (lease {args.lease}s) ...")
            takeovers.append(takeover_trial(binary, pg, scratch, trial, args.lease))
    finally:
        pg.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    cores = os.cpu_count()
    print(f"\nhotfolder fleet on this machine ({cores} cores shared by every node and PostgreSQL; fsync on)\n")
    chunks = args.big_mib / 8
    print(f"| nodes | {args.files} x {args.file_kib} KiB: files/s | statements per job | rows written per job | node CPU ms per job | {args.big} x {args.big_mib} MiB: GiB/s | statements per big job ({chunks:.0f} chunks of 8 MiB) | jobs per node (small) |")
    print("|---|---|---|---|---|---|---|---|")
    for nodes, small, big in rows:
        print(
            f"| {nodes} | {small['files_per_s']:.0f} ({small['wall']:.1f} s) | {small['statements_per_job']:.1f} | "
            f"{small['rows_per_job']:.1f} | {small['cpu_per_job_ms']:.2f} | {big['gib_per_s']:.2f} ({big['wall']:.1f} s) | "
            f"{big['statements_per_job']:.1f} | {small['per_node']} |"
        )
    print(
        f"\na job's record: {rows[0][1]['row_bytes']:.0f} bytes (jsonb, compressed as stored); "
        f"tables and indexes: {rows[0][1]['table_bytes_per_job'] / 1024:.1f} KiB per job after {args.files} jobs (dead row versions included)"
    )
    print(f"\nupkeep (heartbeats, renewals, claims; not counted above): {rows[-1][1]['upkeep_per_s']:.2f} statements/s with 3 nodes (lease 30s)")
    print("\nstatements of the small drop with 3 nodes, by count (calls, rows written):")
    for query, (calls, written) in rows[-1][1]["top"]:
        print(f"  {calls:7d} {written:7d}  {query}")
    print("statements of the small drop with 1 node:")
    for query, (calls, written) in rows[0][1]["top"]:
        print(f"  {calls:7d} {written:7d}  {query}")
    print("statements of the big drop with 1 node:")
    for query, (calls, written) in rows[0][2]["top"]:
        print(f"  {calls:7d} {written:7d}  {query}")
    times = [t for t, _ in takeovers]
    resent = [r for _, r in takeovers]
    print(
        f"\nlease takeover (lease {args.lease}s, kill -9 mid-upload, 4 MiB chunks): "
        f"resumed after {', '.join(f'{t:.1f}' for t in times)} s (median {statistics.median(times):.1f} s); "
        f"chunks sent again: {', '.join(f'{r:.2f}' for r in resent)}"
    )


if __name__ == "__main__":
    main()
