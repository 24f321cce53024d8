#!/usr/bin/env python3
"""Peak RSS of `hotfolder run` under a big drop (issue 11: memory stays flat).

Writes FILES small files (1 KiB) into a staging folder, renames the folder
into the watch at once, delivers them to the `folder` provider, and samples
the daemon's VmRSS every 0.5 s until every file is in the outbox. Prints the
peak RSS (VmHWM), the RSS when 10% and when 100% of the files were done, and
the wall time. Usage: bench/drop_rss.py [FILES] [BINARY]
"""
import os
import re
import shutil
import socket
import urllib.request
import subprocess
import sys
import tempfile
import time

files = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
binary = sys.argv[2] if len(sys.argv) > 2 else "target/debug/hotfolder"
binary = os.path.abspath(binary)
root = tempfile.mkdtemp(prefix="hotfolder-drop-rss-")
try:
    for d in ("drop", "outbox", "staged/batch"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(os.path.join(root, "hotfolder.yaml"), "w") as f:
        f.write(
            f"state_dir: ./state\nworkers: 4\nlog: {{ level: warn }}\nhttp: {{ listen: \"127.0.0.1:{port}\" }}\n"
            "defaults: { stable_for: 1s, rescan_every: 30s }\n"
            "watches:\n  - name: drop\n    path: ./drop\n"
            "providers:\n  archive: { type: folder, path: ./outbox }\n"
            "rules:\n  - match: {}\n    provider: archive\n"
        )
    block = os.urandom(1024)
    for n in range(files):
        with open(os.path.join(root, "staged/batch", f"f{n:06d}.mp4"), "wb") as f:
            f.write(block[:1000] + n.to_bytes(8, "little"))
    daemon = subprocess.Popen(
        [binary, "run", "-c", "hotfolder.yaml"], cwd=root,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(1)
    start = time.time()
    os.rename(os.path.join(root, "staged/batch"), os.path.join(root, "drop/batch"))

    def status():
        fields = {}
        with open(f"/proc/{daemon.pid}/status") as s:
            for line in s:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    def heap():
        # The allocator's own view (glibc): live heap vs what it holds.
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            return None
        values = dict(re.findall(r"^(hotfolder_heap_\w+) (\S+)$", text, re.M))
        if not values:
            return None
        return (float(values["hotfolder_heap_in_use_bytes"]), float(values["hotfolder_heap_held_bytes"]))

    at_tenth = None
    steps = {}
    outbox = os.path.join(root, "outbox/batch")
    while True:
        done = len(os.listdir(outbox)) if os.path.isdir(outbox) else 0
        rss, hwm = status()
        if at_tenth is None and done >= files // 10:
            at_tenth = rss
        tenth = done * 10 // files
        if tenth not in steps:
            steps[tenth] = (rss, heap())
        if done >= files:
            break
        if time.time() - start > 3600:
            raise SystemExit(f"not done after an hour: {done} of {files}")
        time.sleep(0.5)
    rss, hwm = status()
    wall = time.time() - start
    daemon.terminate()
    daemon.wait(timeout=60)
    print(f"{files} files of 1 KiB to the folder provider in {wall:.0f} s ({files / wall:.0f} files/s)")
    print(f"RSS at 10% done: {at_tenth / 1024:.1f} MiB; at 100%: {rss / 1024:.1f} MiB; peak (VmHWM): {hwm / 1024:.1f} MiB")
    print("by tenth done, MiB: RSS / live heap / heap held")
    for t, (v, h) in sorted(steps.items()):
        live = f"{h[0] / 2**20:.0f} / {h[1] / 2**20:.0f}" if h else "-"
        print(f"  {t * 10:3}%: {v / 1024:.0f} / {live}")
finally:
    shutil.rmtree(root, ignore_errors=True)
