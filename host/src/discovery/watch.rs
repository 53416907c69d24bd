//! Watching files by polling their metadata: what changed since the last look, whatever
//! the editor or tool did (write in place, atomic rename, a ConfigMap volume's symlink
//! swap). Polling a few stat calls every 250 ms costs nothing and needs no inotify limits.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::files::{Diagnostic, Objects, collect_files, load_str};

/// What identifies one version of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Fingerprint {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path)?;
        Ok(Fingerprint {
            modified: metadata.modified().ok(),
            len: metadata.len(),
            inode: metadata.ino(),
        })
    }
}

/// Objects from files, watched. A file that fails to parse is reported and the objects of
/// its last good version keep serving; a file deleted from a watched directory takes its
/// objects with it. A path named in the config that cannot be read (deleted, or a volume
/// being remounted) is reported and keeps the objects it had.
#[derive(Debug)]
pub struct FileSource {
    paths: Vec<PathBuf>,
    files: BTreeMap<PathBuf, WatchedFile>,
    /// Paths that could not be listed at the last look, with the reason.
    unreadable: BTreeMap<PathBuf, String>,
}

#[derive(Debug)]
struct WatchedFile {
    fingerprint: Option<Fingerprint>,
    /// The last version that parsed without errors.
    good: Option<Objects>,
    /// Problems found in the file's current version.
    diagnostics: Vec<Diagnostic>,
}

/// What one look at the files found.
#[derive(Debug, Default)]
pub struct Poll {
    /// Whether the objects changed.
    pub changed: bool,
    /// Problems in the files that changed (and paths that became unreadable).
    pub diagnostics: Vec<Diagnostic>,
}

impl FileSource {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        FileSource {
            paths,
            files: BTreeMap::new(),
            unreadable: BTreeMap::new(),
        }
    }

    /// Looks at every file and re-reads those that changed.
    pub fn poll(&mut self) -> Poll {
        let mut poll = Poll::default();
        let mut present = BTreeSet::new();
        for path in &self.paths {
            let mut found = Vec::new();
            match collect_files(path, true, &mut found) {
                Ok(()) => {
                    self.unreadable.remove(path);
                    present.extend(found);
                }
                Err(error) => {
                    // Keep what this path served: a directory being replaced, or a volume
                    // remounting, must not withdraw its Services.
                    present.extend(self.files.keys().filter(|f| f.starts_with(path)).cloned());
                    let reason = error.to_string();
                    if self.unreadable.get(path) != Some(&reason) {
                        poll.diagnostics.push(Diagnostic::error(
                            path.display(),
                            None,
                            format!("cannot read: {reason}; the objects it had keep serving"),
                        ));
                        self.unreadable.insert(path.clone(), reason);
                    }
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|file, _| present.contains(file));
        poll.changed |= self.files.len() != before;
        for file in present {
            let fingerprint = Fingerprint::of(&file).ok();
            let watched = self.files.entry(file.clone()).or_insert(WatchedFile {
                fingerprint: None,
                good: None,
                diagnostics: Vec::new(),
            });
            if watched.good.is_some() && watched.fingerprint == fingerprint {
                continue;
            }
            if watched.good.is_none() && watched.fingerprint == fingerprint && fingerprint.is_some()
            {
                // Still the same broken version: reported already.
                continue;
            }
            watched.fingerprint = fingerprint;
            let mut objects = Objects::default();
            let mut diagnostics = Vec::new();
            match std::fs::read_to_string(&file) {
                Ok(text) => load_str(&file, &text, &mut objects, &mut diagnostics),
                Err(error) => diagnostics.push(Diagnostic::error(
                    file.display(),
                    None,
                    format!("cannot read: {error}"),
                )),
            }
            if diagnostics.iter().any(Diagnostic::is_error) {
                if watched.good.is_some() {
                    diagnostics.push(Diagnostic::warning(
                        file.display(),
                        None,
                        "ignored this version; the objects of its last good version keep serving",
                    ));
                }
            } else {
                watched.good = Some(objects);
                poll.changed = true;
            }
            watched.diagnostics = diagnostics.clone();
            poll.diagnostics.extend(diagnostics);
        }
        poll
    }

    /// Every good object, files in name order.
    pub fn objects(&self) -> Objects {
        let mut all = Objects::default();
        for file in self.files.values() {
            if let Some(objects) = &file.good {
                all.services.extend(objects.services.iter().cloned());
                all.endpoint_slices
                    .extend(objects.endpoint_slices.iter().cloned());
                all.nodes.extend(objects.nodes.iter().cloned());
            }
        }
        all
    }

    /// Problems in the files as they are now.
    pub fn diagnostics(&self) -> impl Iterator<Item = &Diagnostic> {
        self.files.values().flat_map(|f| f.diagnostics.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 127.0.0.10, ports: [{port: 80}]}\n";

    #[test]
    fn edits_renames_breakage_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        std::fs::write(&file, SERVICE).unwrap();
        let mut source = FileSource::new(vec![dir.path().to_path_buf()]);
        assert!(source.poll().changed);
        assert_eq!(source.objects().services.len(), 1);
        assert!(!source.poll().changed, "nothing changed");

        // A broken version is reported; the last good one keeps serving.
        std::fs::write(&file, "kind: Service\nmetadata: [").unwrap();
        let poll = source.poll();
        assert!(!poll.changed);
        assert!(poll.diagnostics.iter().any(Diagnostic::is_error));
        assert_eq!(source.objects().services.len(), 1);

        // An atomic rename over it, as editors and kubectl do.
        let tmp = dir.path().join(".web.yaml.tmp");
        std::fs::write(&tmp, SERVICE.replace("web", "api")).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert!(source.poll().changed);
        let objects = source.objects();
        assert_eq!(
            objects.services[0].object.metadata.name.as_deref(),
            Some("api")
        );

        std::fs::remove_file(&file).unwrap();
        assert!(source.poll().changed);
        assert!(source.objects().services.is_empty());
    }
}
