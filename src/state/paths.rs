//! Paths in job records, whatever bytes they hold: a file name need not be
//! UTF-8 on Linux (a share written by an old Windows or a Latin-1 Mac), and
//! JSON strings must be. A UTF-8 path is stored as a plain string, as
//! before; any other as `{"bytes": "<base64 of the raw bytes>"}`. Both are
//! read back exactly.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Stored {
    Text(String),
    Bytes { bytes: String },
}

fn store(path: &Path) -> Stored {
    match path.to_str() {
        Some(text) => Stored::Text(text.to_string()),
        None => Stored::Bytes {
            bytes: base64::engine::general_purpose::STANDARD.encode(path.as_os_str().as_bytes()),
        },
    }
}

fn load<E: serde::de::Error>(stored: Stored) -> Result<PathBuf, E> {
    match stored {
        Stored::Text(text) => Ok(PathBuf::from(text)),
        Stored::Bytes { bytes } => base64::engine::general_purpose::STANDARD
            .decode(bytes)
            .map(|raw| PathBuf::from(OsString::from_vec(raw)))
            .map_err(E::custom),
    }
}

/// `#[serde(with = "paths")]` for a `PathBuf`.
pub fn serialize<S: Serializer>(path: &Path, serializer: S) -> Result<S::Ok, S::Error> {
    store(path).serialize(serializer)
}

/// See [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    load(Stored::deserialize(deserializer)?)
}

/// `#[serde(with = "paths::optional")]` for an `Option<PathBuf>`.
pub mod optional {
    use super::*;

    /// See [`super::serialize`].
    pub fn serialize<S: Serializer>(
        path: &Option<PathBuf>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        path.as_deref().map(store).serialize(serializer)
    }

    /// See [`super::deserialize`].
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<PathBuf>, D::Error> {
        Option::<Stored>::deserialize(deserializer)?
            .map(load)
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Holder {
        #[serde(with = "super")]
        path: PathBuf,
        #[serde(with = "super::optional", default)]
        maybe: Option<PathBuf>,
    }

    #[test]
    fn any_bytes_round_trip_and_utf8_stays_a_string() {
        let odd = PathBuf::from(OsString::from_vec(b"latin1-\xe9t\xe9.mp4".to_vec()));
        let holder = Holder {
            path: PathBuf::from("plain/clip.mp4"),
            maybe: Some(odd),
        };
        let text = serde_json::to_string(&holder).unwrap();
        assert!(text.contains(r#""path":"plain/clip.mp4""#), "{text}");
        assert_eq!(serde_json::from_str::<Holder>(&text).unwrap(), holder);
        let old: Holder = serde_json::from_str(r#"{"path": "a"}"#).unwrap();
        assert_eq!(old.maybe, None);
    }
}
