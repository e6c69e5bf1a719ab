//! The on-disk cache of compiled policy components, so that a host restart
//! (or `cellhost policy check`) does not pay for compiling the same component
//! again.
//!
//! It owns the cache's layout, its file format and the checks that decide
//! whether a file may be handed to wasmtime. A compiled component is machine
//! code that wasmtime loads without verifying it, so this module is the one
//! place that vouches for those bytes.
//!
//! Layout: `<root>/<engine key>/<content hash>.cwasm`. The engine key is
//! derived from wasmtime's `precompile_compatibility_hash` (wasmtime version,
//! target, compiler flags, enabled features), so an artefact of another
//! wasmtime or another engine configuration is never even looked at; the
//! content hash is the SHA-256 of the component's bytes, as
//! [`super::content_hash`] computes it.
//!
//! File format: [`MAGIC`], the content hash in hex (64 bytes), the SHA-256 of
//! the payload (32 bytes), then the payload as `Component::serialize` wrote
//! it. Files are written to a temporary name in the same folder and renamed,
//! so a reader never sees a half-written file under the final name. Any
//! problem with a file (truncated, bit rot, misplaced, refused by wasmtime) is
//! logged, the file removed, and the component compiled again: the cache can
//! make a load faster, never make it fail.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Marks a cellhost cache file; the last digit is the format version.
const MAGIC: &[u8; 16] = b"cellhost-cwasm1\n";
/// Length of the content hash in hex.
const HASH_HEX_LEN: usize = 64;
const HEADER_LEN: usize = MAGIC.len() + HASH_HEX_LEN + 32;

/// Distinguishes the temporary files of concurrent writers in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Where the host keeps compiled policies unless configured otherwise:
/// `$XDG_CACHE_HOME/cellhost`, else `~/.cache/cellhost`. `None` when neither
/// variable is usable (e.g. a service with no home), which means no cache.
pub fn default_cache_dir() -> Option<PathBuf> {
    // The XDG spec says relative values are invalid and must be ignored.
    let absolute = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(xdg) = absolute("XDG_CACHE_HOME") {
        return Some(xdg.join("cellhost"));
    }
    absolute("HOME").map(|home| home.join(".cache").join("cellhost"))
}

/// One engine's folder in the compiled-component cache.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// Opens (creating it if needed) the folder under `root` for artefacts of
    /// `engine`. The error says why the folder cannot be used; the caller
    /// then runs without a disk cache.
    pub fn open(root: &Path, engine: &Engine) -> Result<DiskCache, String> {
        let dir = root.join(engine_key(engine));
        create_private_dir(&dir)
            .map_err(|e| format!("cannot create cache folder {}: {e}", dir.display()))?;
        // Files here are loaded as machine code: refuse a folder that anyone
        // but this user could have written to.
        check_private(root)?;
        check_private(&dir)?;
        Ok(DiskCache { dir })
    }

    /// The folder holding this engine's artefacts.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the artefact of the component with content hash `hash` lives.
    pub fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{hash}.cwasm"))
    }

    /// The cached compilation of the component whose content hash is
    /// `hash`, or `None` when there is none or it is unusable (then it is
    /// logged and removed). `source` names the policy in logs.
    pub fn load(&self, engine: &Engine, source: &str, hash: &str) -> Option<Component> {
        let path = self.path(hash);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(
                    policy = source,
                    file = %path.display(),
                    error = %e,
                    "cannot read the compiled policy from the cache; compiling it instead"
                );
                return None;
            }
        };
        let payload = match verified_payload(&bytes, hash) {
            Ok(payload) => payload,
            Err(problem) => {
                self.discard(&path, source, &problem);
                return None;
            }
        };
        // SAFETY: `Component::deserialize` runs the machine code in `payload`
        // as it is; wasmtime checks that the artefact's header matches this
        // engine (wasmtime version, target, flags) but not the code itself.
        // The bytes are trusted because:
        // - the folder is the host's own: `open` creates it private to this
        //   user and refuses it if another user owns it or group or others
        //   may write to it, so only this user (who can already run any code
        //   as the host) can put a file here;
        // - the only writer is `store`, which writes a temporary file and
        //   renames it, so a file under its final name is complete;
        // - the file's header names the content hash it was compiled from and
        //   carries a SHA-256 of the payload, both checked just above, so a
        //   truncated, damaged or misplaced file never reaches wasmtime;
        // - the folder name is the engine's compatibility hash, so the payload
        //   was produced by an engine configured like this one.
        // `deserialize` copies the payload, so nothing later done to the file
        // (another process replacing it) can change the loaded code.
        match unsafe { Component::deserialize(engine, payload) } {
            Ok(component) => Some(component),
            Err(e) => {
                self.discard(&path, source, &format!("wasmtime refused it: {e:#}"));
                None
            }
        }
    }

    /// Saves the compilation of the component with content hash `hash`.
    /// Failures are logged: the policy runs all the same, just compiled
    /// again next time.
    pub fn store(&self, source: &str, hash: &str, component: &Component) {
        let final_path = self.path(hash);
        let payload = match component.serialize() {
            Ok(payload) => payload,
            Err(e) => {
                tracing::warn!(policy = source, error = %format!("{e:#}"), "cannot serialize the compiled policy for the cache");
                return;
            }
        };
        // Same folder as the final file, so the rename is atomic; the leading
        // dot and the `.tmp` suffix keep it from ever matching a lookup.
        let temp_path = self.dir.join(format!(
            ".{hash}.{}.{}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = write_file(&temp_path, hash, &payload)
            .and_then(|()| fs::rename(&temp_path, &final_path));
        match written {
            Ok(()) => tracing::debug!(
                policy = source,
                file = %final_path.display(),
                bytes = payload.len(),
                "compiled policy cached"
            ),
            Err(e) => {
                tracing::warn!(
                    policy = source,
                    file = %final_path.display(),
                    error = %e,
                    "cannot write the compiled policy to the cache; it will be compiled again next time"
                );
                let _ = fs::remove_file(&temp_path);
            }
        }
    }

    /// Removes an unusable cache file so the next load does not trip on it.
    fn discard(&self, path: &Path, source: &str, problem: &str) {
        tracing::warn!(
            policy = source,
            file = %path.display(),
            problem,
            "unusable compiled policy in the cache; removing it and compiling again"
        );
        if let Err(e) = fs::remove_file(path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove the unusable cache file");
            }
        }
    }
}

/// The payload of a cache file, once its header has been checked against
/// `hash` and the payload against its digest.
fn verified_payload<'a>(bytes: &'a [u8], hash: &str) -> Result<&'a [u8], String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "the file is {} bytes long, shorter than its header",
            bytes.len()
        ));
    }
    let (magic, rest) = bytes.split_at(MAGIC.len());
    let (named_hash, rest) = rest.split_at(HASH_HEX_LEN);
    let (digest, payload) = rest.split_at(32);
    if magic != MAGIC {
        return Err("not a cellhost cache file (or an older format)".to_string());
    }
    if named_hash != hash.as_bytes() {
        return Err(format!(
            "it holds the compilation of another component ({})",
            String::from_utf8_lossy(named_hash)
        ));
    }
    if Sha256::digest(payload).as_slice() != digest {
        return Err("its checksum does not match: the file is damaged".to_string());
    }
    Ok(payload)
}

fn write_file(path: &Path, hash: &str, payload: &[u8]) -> io::Result<()> {
    if hash.len() != HASH_HEX_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("content hash {hash:?} is not 64 hex digits"),
        ));
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    file.write_all(MAGIC)?;
    file.write_all(hash.as_bytes())?;
    file.write_all(&Sha256::digest(payload))?;
    file.write_all(payload)?;
    // No fsync: after a crash a file may be empty or torn despite the rename,
    // and the checksum then sends it to `discard` like any damaged file.
    Ok(())
}

/// A short hex name for everything that makes an artefact loadable by
/// `engine`: wasmtime's own compatibility hash, fed through SHA-256 (std's
/// hashers promise no stable output across Rust versions).
fn engine_key(engine: &Engine) -> String {
    use std::hash::Hash as _;
    let mut hasher = Sha256Hasher(Sha256::new());
    // Bumped with the file format, so old files are simply never found.
    hasher
        .0
        .update(b"cellhost compiled-component cache, format 1");
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher.0.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Lets a `std::hash::Hash` value be digested with SHA-256.
struct Sha256Hasher(Sha256);

impl std::hash::Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        // Not used for the key (that is the full digest), but the trait wants it.
        let digest = self.0.clone().finalize();
        let mut first = [0_u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)
}

/// Refuses a folder another user owns or that group or others may write to.
#[cfg(unix)]
fn check_private(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(dir).map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "cache folder {} belongs to user id {}, not to this process's user id {me}",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "cache folder {} may be written by group or others (mode {:o}); make it private with `chmod go-w`",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_dir: &Path) -> Result<(), String> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks_catch_damage_and_misplaced_files() {
        let hash = "a".repeat(64);
        let payload = b"compiled code".to_vec();
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(hash.as_bytes());
        file.extend_from_slice(&Sha256::digest(&payload));
        file.extend_from_slice(&payload);
        assert_eq!(
            verified_payload(&file, &hash).expect("intact"),
            &payload[..]
        );

        let other = "b".repeat(64);
        let err = verified_payload(&file, &other).expect_err("other hash");
        assert!(err.contains("another component"), "{err}");

        let mut flipped = file.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let err = verified_payload(&flipped, &hash).expect_err("bit flip");
        assert!(err.contains("checksum"), "{err}");

        let err = verified_payload(&file[..20], &hash).expect_err("truncated");
        assert!(err.contains("shorter"), "{err}");
    }
}
