//! Compiled components on disk, keyed by the module's sha256 and the engine's
//! compatibility hash, so each module is compiled once per weir version and config.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// Why a directory is refused as the compiled-policy cache.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}: refused as the compiled-policy cache: other users can write to it (mode {mode:o}, owner uid {owner}); compiled modules are loaded as trusted code, so weir compiles without a cache until it is private (chmod go-w, owned by uid {me}) or policies.cache_dir names another",
    dir.display()
)]
pub struct CacheError {
    pub dir: PathBuf,
    pub mode: u32,
    pub owner: u32,
    pub me: u32,
}

/// A directory of `<sha256>-<engine>.cwasm` files written by weir itself.
pub struct ArtifactCache {
    dir: PathBuf,
    engine_tag: String,
}

impl ArtifactCache {
    /// A cache in `dir`, unless someone other than weir's user can write there: what it
    /// holds is loaded as trusted machine code, so such a directory is refused.
    pub fn new(engine: &Engine, dir: &Path) -> Result<Self, CacheError> {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::metadata(dir) {
            let me = rustix::process::geteuid().as_raw();
            if meta.mode() & 0o022 != 0 || meta.uid() != me {
                return Err(CacheError {
                    dir: dir.to_path_buf(),
                    mode: meta.mode() & 0o7777,
                    owner: meta.uid(),
                    me,
                });
            }
        }
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(ArtifactCache {
            dir: dir.to_path_buf(),
            engine_tag: format!("{:016x}", hasher.finish()),
        })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_tag))
    }

    /// The cached compilation of the module with this digest, if weir wrote one for this
    /// engine. A file that fails to load is removed and treated as a miss.
    pub fn load(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        if !path.exists() {
            return None;
        }
        // SAFETY: `deserialize_file` trusts the file to be wasmtime's own output for a
        // compatible engine. Files here are written only by `store` below, from
        // `Component::serialize` of a module whose sha256 names the file, and the name also
        // carries the engine's compatibility hash; wasmtime still checks the header and
        // version, and a file it refuses is deleted. The cache directory must be private to
        // weir, as the README says.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(engine, &path) };
        match loaded {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "discarding unusable compiled policy");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores a compilation; failures only cost a recompile next time, so they are logged.
    pub fn store(&self, sha256: &str, component: &Component) {
        let result = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(&self.dir)?;
            let bytes = component.serialize().map_err(std::io::Error::other)?;
            let path = self.path(sha256);
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(error) = result {
            tracing::warn!(dir = %self.dir.display(), %error, "could not cache a compiled policy");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_cache_directory_others_can_write_to_is_refused() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(ArtifactCache::new(&engine, dir.path()).is_ok());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = ArtifactCache::new(&engine, dir.path())
            .err()
            .expect("refused");
        assert_eq!(error.mode, 0o777);
        let message = error.to_string();
        assert!(
            message.contains("other users can write") && message.contains("777"),
            "{message}"
        );
    }
}
