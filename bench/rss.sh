#!/usr/bin/env bash
# Peak memory of `hotfolder upload` sending big files at once to the local
# tus sandbox: the claim to check is that memory stays flat (pieces streamed
# from disk), whatever the file and chunk sizes.
#
#   bench/rss.sh                       # 4 files of 1 GiB, chunk 32MiB, workers 4
#   FILES=2 SIZE_MIB=256 bench/rss.sh  # smaller run
#
# Environment: FILES (4), SIZE_MIB (1024), CHUNK (32MiB), WORKERS (4),
# BENCH_DIR (parent of the temporary folder; default $TMPDIR or /tmp: it needs
# room for the sources and the sandbox's copies, 2 x FILES x SIZE),
# CARGO_TARGET_DIR (as cargo uses it).
#
# The sources are random bytes (AES-CTR keystream from openssl when present,
# else /dev/urandom): incompressible, and hashing costs what it costs on real
# media. The sandbox runs without throttle on 127.0.0.1:0 with its data on
# disk. RSS is sampled from /proc/PID/status every 50 ms; VmHWM is the
# kernel's own high-water mark of the process, so short peaks between
# samples are counted too (up to the last sample before the exit).
set -euo pipefail
cd "$(dirname "$0")/.."

FILES=${FILES:-4}
SIZE_MIB=${SIZE_MIB:-1024}
CHUNK=${CHUNK:-32MiB}
WORKERS=${WORKERS:-4}
target_dir=${CARGO_TARGET_DIR:-$PWD/target}

echo "building the release binary (target dir $target_dir)..." >&2
cargo build --release --locked --quiet
bin="$target_dir/release/hotfolder"

work=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/hotfolder-rss.XXXXXX")
sandbox_pid=""
upload_pid=""
cleanup() {
  [ -n "$upload_pid" ] && kill "$upload_pid" 2>/dev/null || true
  if [ -n "$sandbox_pid" ]; then
    kill "$sandbox_pid" 2>/dev/null || true
    wait "$sandbox_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- sources -----------------------------------------------------------------
mkdir -p "$work/src" "$work/watch"
gen_kind="/dev/urandom"
command -v openssl >/dev/null 2>&1 && gen_kind="openssl AES-128-CTR keystream"
echo "writing $FILES x $SIZE_MIB MiB of random bytes ($gen_kind)..." >&2
files=()
for i in $(seq 1 "$FILES"); do
  f="$work/src/clip-$i.mp4"
  if command -v openssl >/dev/null 2>&1; then
    # A different key per file; the keystream is indistinguishable from random.
    # openssl dies of SIGPIPE when head has enough: not an error (size checked below).
    { openssl enc -aes-128-ctr -nosalt -pass "pass:hotfolder-rss-$i-$RANDOM" -pbkdf2 \
      </dev/zero 2>/dev/null || true; } | head -c "$((SIZE_MIB * 1024 * 1024))" >"$f"
  else
    head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom >"$f"
  fi
  if [ "$(stat -c %s "$f")" -ne "$((SIZE_MIB * 1024 * 1024))" ]; then
    echo "bench/rss.sh: could not write $f (disk full?)" >&2
    exit 1
  fi
  files+=("$f")
done
sync

# --- sandbox -----------------------------------------------------------------
"$bin" sandbox --listen 127.0.0.1:0 --data "$work/sandbox" >"$work/sandbox.out" 2>"$work/sandbox.err" &
sandbox_pid=$!
endpoint=""
for _ in $(seq 1 200); do # up to 10 s
  endpoint=$(sed -n 's/.*(tus: \(http[^)]*\)).*/\1/p' "$work/sandbox.out")
  [ -n "$endpoint" ] && break
  kill -0 "$sandbox_pid" 2>/dev/null || break
  sleep 0.05
done
if [ -z "$endpoint" ]; then
  echo "bench/rss.sh: the sandbox did not start:" >&2
  cat "$work/sandbox.err" >&2
  exit 1
fi

cat >"$work/hotfolder.yaml" <<EOF
state_dir: ./state
workers: $WORKERS
log: { level: warn }
watches:
  - { name: unused, path: ./watch }
providers:
  bench: { type: tus, endpoint: "$endpoint", chunk_size: $CHUNK, max_concurrent: $WORKERS }
rules:
  - { match: {}, provider: bench }
EOF

# --- upload, sampling memory -------------------------------------------------
start=$(date +%s.%N)
"$bin" upload -c "$work/hotfolder.yaml" --provider bench "${files[@]}" \
  >"$work/upload.out" 2>"$work/upload.err" &
upload_pid=$!
hwm_kib=0
rss_kib=0
while [ -r "/proc/$upload_pid/status" ]; do
  while read -r key value _; do
    case "$key" in
      VmHWM:) [ "$value" -gt "$hwm_kib" ] && hwm_kib=$value ;;
      VmRSS:) [ "$value" -gt "$rss_kib" ] && rss_kib=$value ;;
    esac
  done 2>/dev/null <"/proc/$upload_pid/status" || true
  # A zombie has no VmRSS line left; stop sampling once it exited.
  grep -q '^State:.*Z' "/proc/$upload_pid/status" 2>/dev/null && break
  sleep 0.05
done
status=0
wait "$upload_pid" || status=$?
upload_pid=""
end=$(date +%s.%N)

if [ "$status" -ne 0 ]; then
  echo "bench/rss.sh: hotfolder upload failed (exit $status):" >&2
  cat "$work/upload.out" "$work/upload.err" >&2
  exit 1
fi
received=$(find "$work/sandbox/tus" -name '*.bin' -printf '%s\n' | awk '{s += $1} END {printf "%.0f\n", s}')
expected=$((FILES * SIZE_MIB * 1024 * 1024))
if [ "$received" -ne "$expected" ]; then
  echo "bench/rss.sh: the sandbox holds $received bytes, expected $expected" >&2
  exit 1
fi

awk -v files="$FILES" -v size="$SIZE_MIB" -v chunk="$CHUNK" -v workers="$WORKERS" \
  -v hwm="$hwm_kib" -v rss="$rss_kib" -v start="$start" -v end="$end" 'BEGIN {
  wall = end - start
  printf "%-6s %-10s %-7s %-8s %-15s %-19s %-9s %s\n", "files", "file size", "chunk", "workers", "peak RSS (MiB)", "max sampled VmRSS", "wall (s)", "throughput (MiB/s)"
  printf "%-6d %-10s %-7s %-8d %-15.1f %-19.1f %-9.1f %.0f\n", files, size " MiB", chunk, workers, hwm / 1024, rss / 1024, wall, files * size / wall
}'
