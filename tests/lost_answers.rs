//! `kill -9` while an answer is lost, made deterministic: a proxy between the
//! daemon and the sandbox lets one request through but withholds its answer,
//! so the server has acted and the daemon never learns it; the daemon is
//! killed there and restarted, and the file must arrive as one object.
//!
//! - Inside the create window (SPEC §4, "Nothing twice"): the restarted job
//!   finds the object it made (api.video lists by its tag) or, where no
//!   lookup exists, names the possible orphan in the log and the receipt.
//!   Every incomplete object left behind must be findable from what the
//!   daemon wrote: its id in a log or the receipt, or a `hotfolder_job` tag
//!   it carries that the receipt names.
//! - After the last chunk: the server holds every byte, the daemon's last
//!   acknowledgement is one chunk behind; the job must still end done.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::providers::{
    GENEROUS_RETRY, MIB, apivideo_provider, gcore_provider, id_of, movingimage_provider,
    okru_provider, wait_done,
};
use common::sandbox::{Sandbox, tus_provider};
use common::{Fixture, wait_for, write_random};
use serde_json::Value;

const FILE: &str = "window.mp4";
const STEM: &str = "window";

/// A TCP relay to the sandbox that, while armed, withholds the answer to
/// the first request whose bytes contain a marker (the request itself goes
/// through, so the server acts on it).
struct Proxy {
    addr: String,
    marker: Arc<Mutex<Option<Vec<u8>>>>,
    withheld: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let proxy = Proxy {
            addr,
            marker: Arc::default(),
            withheld: Arc::default(),
        };
        let (marker, withheld) = (Arc::clone(&proxy.marker), Arc::clone(&proxy.withheld));
        let upstream = upstream.to_string();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (upstream, marker, withheld) =
                    (upstream.clone(), Arc::clone(&marker), Arc::clone(&withheld));
                std::thread::spawn(move || relay(client, &upstream, &marker, &withheld));
            }
        });
        proxy
    }

    /// Withhold the answer to the next request containing `marker`.
    fn arm(&self, marker: &str) {
        *self.marker.lock().expect("marker lock") = Some(marker.as_bytes().to_vec());
    }

    /// Let every answer through again.
    fn disarm(&self) {
        *self.marker.lock().expect("marker lock") = None;
    }
}

/// Relay one connection; once a request carrying the armed marker passes,
/// answers on this connection are dropped.
fn relay(
    mut client: TcpStream,
    upstream: &str,
    marker: &Mutex<Option<Vec<u8>>>,
    withheld: &AtomicBool,
) {
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    let hold = Arc::new(AtomicBool::new(false));
    if let (Ok(mut from), Ok(mut to)) = (server.try_clone(), client.try_clone()) {
        let hold = Arc::clone(&hold);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if !hold.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut seen: Vec<u8> = Vec::new();
    while let Ok(n @ 1..) = client.read(&mut buf) {
        if let Some(wanted) = marker.lock().ok().and_then(|m| m.clone()) {
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(wanted.len()).any(|w| w == wanted.as_slice())
                && !withheld.swap(true, Ordering::SeqCst)
            {
                hold.store(true, Ordering::SeqCst);
            }
            let keep = seen.len().saturating_sub(wanted.len());
            seen.drain(..keep);
        }
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(std::net::Shutdown::Write);
}

/// A remote object of the file, as its simulator reports it.
#[derive(Debug)]
struct Object {
    what: &'static str,
    id: String,
    complete: bool,
    deleted: bool,
    /// Its `hotfolder_job` tag, where it carries one.
    tag: Option<String>,
    /// The name it carries (file name or title) that a person can search
    /// the provider's library for, where it carries no tag.
    name: String,
}

/// A provider at the sandbox: its `providers:` entry (named `p`) and how
/// its simulator reports the file's objects.
#[derive(Clone, Copy)]
struct Peer {
    entry: fn(&Sandbox) -> String,
    objects: fn(&Sandbox) -> Vec<Object>,
}

const TUS: Peer = Peer {
    entry: |s| tus_provider("p", &s.endpoint(), &settings()),
    objects: tus_uploads,
};
const OKRU: Peer = Peer {
    entry: |s| okru_provider("p", s, &settings()),
    objects: |s| {
        videos(s, "okru", ("file_name", FILE), "video_id", |_, v| {
            v["received"] == v["file_size"]
        })
    },
};
const APIVIDEO: Peer = Peer {
    entry: |s| apivideo_provider("p", s, &format!("chunk_size: 5MiB, {GENEROUS_RETRY}")),
    objects: |s| videos(s, "apivideo", ("title", STEM), "video_id", flagged_complete),
};
/// Gcore's videos; their bytes are on the tus upload each links.
const GCORE: Peer = Peer {
    entry: |s| gcore_provider("p", s, &settings()),
    objects: |s| {
        videos(s, "gcore", ("name", STEM), "id", |s, v| {
            let linked = v["upload"].as_str().unwrap_or_default();
            s.uploads().iter().any(|u| u.id == linked && u.complete())
        })
    },
};
/// Gcore's tus uploads (its upload leg).
const GCORE_TUS: Peer = Peer {
    entry: GCORE.entry,
    objects: tus_uploads,
};
const MOVINGIMAGE: Peer = Peer {
    entry: |s| movingimage_provider("p", s, &settings()),
    objects: |s| {
        videos(
            s,
            "movingimage",
            ("file_name", FILE),
            "id",
            flagged_complete,
        )
    },
};

/// The create request made an object.
const CREATED: fn(&[Object]) -> bool = |objects| !objects.is_empty();
/// The last chunk made an object complete.
const COMPLETED: fn(&[Object]) -> bool = |objects| objects.iter().any(|o| o.complete);

fn settings() -> String {
    format!("chunk_size: 1MiB, {GENEROUS_RETRY}")
}

fn tus_uploads(sandbox: &Sandbox) -> Vec<Object> {
    sandbox
        .uploads_named(FILE)
        .into_iter()
        .map(|u| Object {
            what: "tus upload",
            complete: u.complete(),
            deleted: u.terminated,
            tag: u.metadata.get("hotfolder_job").cloned(),
            name: u.filename().to_string(),
            id: u.id,
        })
        .collect()
}

/// The records of `simulator` with `key` = `value`, complete by `complete`.
fn videos(
    sandbox: &Sandbox,
    simulator: &'static str,
    (key, value): (&str, &str),
    id_key: &str,
    complete: fn(&Sandbox, &Value) -> bool,
) -> Vec<Object> {
    sandbox
        .records_where(simulator, key, value)
        .into_iter()
        .map(|v| Object {
            what: simulator,
            id: id_of(&v, id_key),
            complete: complete(sandbox, &v),
            deleted: v["deleted"] == true,
            tag: v["metadata"].as_array().and_then(|pairs| {
                let pair = pairs.iter().find(|p| p["key"] == "hotfolder_job")?;
                Some(pair["value"].as_str()?.to_string())
            }),
            name: value.to_string(),
        })
        .collect()
}

/// A record whose simulator says `complete: true`.
fn flagged_complete(_: &Sandbox, record: &Value) -> bool {
    record["complete"] == true
}

impl Peer {
    /// Drop a 3 MiB file, withhold the marked answer, `kill -9` once the
    /// server acted, restart, let it finish (done, not failed); then every
    /// incomplete object left must be findable from what the daemon wrote.
    fn lose_answer(self, marker: &str, acted: fn(&[Object]) -> bool) {
        let fx = Fixture::new();
        let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
        let proxy = Proxy::start(&sandbox.addr);
        let entry = (self.entry)(&sandbox).replace(&sandbox.addr, &proxy.addr);
        fx.write_provider_config(&entry, "p", r#"{ title: "{stem}" }"#);
        write_random(&fx.watch.join(FILE), 3 * MIB, 1);

        proxy.arm(marker);
        let mut first = fx.start();
        wait_for(
            "the sandbox to act on the request whose answer is withheld",
            Duration::from_secs(30),
            || {
                (proxy.withheld.load(Ordering::SeqCst) && acted(&(self.objects)(&sandbox)))
                    .then_some(())
            },
        );
        first.kill9();
        proxy.disarm();
        let objects_at_kill = (self.objects)(&sandbox);

        let second = fx.start();
        wait_done(&fx, &second, 1, Duration::from_secs(60));

        let receipt = fx.receipt(FILE);
        let named: Vec<String> = receipt["replaced"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect();
        let logs = format!("{}\n{}", first.log(), second.log());
        let objects = (self.objects)(&sandbox);
        let orphans: Vec<String> = objects
            .iter()
            .filter(|o| !o.complete && !o.deleted)
            .filter(|Object { id, tag, name, .. }| {
                let by_id =
                    logs.contains(id.as_str()) || named.iter().any(|n| n.contains(id.as_str()));
                let by_tag = tag.as_ref().is_some_and(|t| {
                    named
                        .iter()
                        .any(|n| n.contains(&format!("hotfolder_job={t}")))
                });
                // Where no tag or lookup exists, the note names the object
                // by what it carries, quoted, in the log and the receipt.
                let by_name = named.iter().any(|n| {
                    n.contains("interrupted create")
                        && n.contains(&format!("{name:?}"))
                        && logs.contains(n.as_str())
                });
                !by_id && !by_tag && !by_name
            })
            .map(|o| format!("{} {} (hotfolder_job tag: {:?})", o.what, o.id, o.tag))
            .collect();
        assert!(
            orphans.is_empty(),
            "kill -9 with a lost answer left {} object(s) that nothing the daemon wrote finds:\n  {}\n\
             objects at the kill: {objects_at_kill:?}\nall objects now: {objects:?}\n\
             receipt `replaced`: {named:?}\nlog lines about it:\n{}",
            orphans.len(),
            orphans.join("\n  "),
            logs.lines()
                .filter(|l| l.contains("interrupted create")
                    || l.contains("resuming")
                    || l.contains("new remote upload"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// tus: the upload carries `hotfolder_job`, and the restarted job's
/// possible-orphan note (log and receipt) names that tag.
#[test]
fn tus_create_window_orphan_is_named() {
    TUS.lose_answer("POST /tus/files/ HTTP", CREATED);
}

/// api.video: the restarted job lists videos by its tag, finds the one the
/// interrupted create made and resumes it: no orphan.
#[test]
fn apivideo_create_window_video_is_found_and_resumed() {
    APIVIDEO.lose_answer("POST /videos HTTP", CREATED);
}

/// OK.ru: `video.getUploadUrl` carries no tag and OK.ru has no lookup, so
/// the note names the video by its file name and size.
#[test]
fn okru_create_window_orphan_is_named() {
    OKRU.lose_answer("video.getUploadUrl", CREATED);
}

/// Gcore: the video (create) carries no tag and is not looked up; the note
/// names it by its name.
#[test]
fn gcore_create_window_orphan_is_named() {
    GCORE.lose_answer("POST /streaming/videos HTTP", CREATED);
}

/// Gcore's second create: the tus upload made in `offset` (start_tus)
/// before the engine persists its URL. That leg is recorded as a create
/// intent first, so the restart names the tus upload by its tag.
#[test]
fn gcore_tus_create_window_orphan_is_named() {
    GCORE_TUS.lose_answer("POST /upload/ HTTP", CREATED);
}

/// movingimage: the video carries no tag and is not looked up; the note
/// names it by its file name.
#[test]
fn movingimage_create_window_orphan_is_named() {
    MOVINGIMAGE.lose_answer("POST /v1/vms/1234/videos HTTP", CREATED);
}

/// tus, the last PATCH's answer lost: HEAD says every byte is there.
#[test]
fn tus_last_chunk_answer_lost_still_delivers() {
    TUS.lose_answer("upload-offset: 2097152\r\n", COMPLETED);
}

/// OK.ru, the last chunk's answer lost: the status GET says complete.
#[test]
fn okru_last_chunk_answer_lost_still_delivers() {
    OKRU.lose_answer("content-range: bytes 2097152-3145727/3145728", COMPLETED);
}

/// api.video, the (only) chunk's answer lost: the status says uploaded.
#[test]
fn apivideo_last_chunk_answer_lost_still_delivers() {
    APIVIDEO.lose_answer("content-range: bytes 0-3145727/3145728", COMPLETED);
}

/// movingimage, the last chunk's answer lost: no offset query, so the job
/// sends chunk 3/3 again; the server answers 400 "the upload is complete",
/// which is the acknowledgement that was lost (this failed the job before).
#[test]
fn movingimage_last_chunk_answer_lost_still_delivers() {
    MOVINGIMAGE.lose_answer("mi24-upload-current-chunk: 3\r\n", COMPLETED);
}
