//! Watching files by polling their metadata: what changed since the last look, whatever
//! the editor or tool did (write in place, atomic rename, a ConfigMap volume's symlink
//! swap). Polling a few stat calls every 250 ms costs nothing and needs no inotify limits.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::files::{Diagnostic, Objects, collect_files, load_str, read_text};
use crate::model::{self, ServiceKey};

/// What a change touches: the ports of some Services, or everything (a Node changed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Changed {
    #[default]
    Nothing,
    Services(BTreeSet<ServiceKey>),
    Everything,
}

impl Changed {
    /// What objects that were, or are now, in a file touch.
    pub fn of(objects: &Objects) -> Changed {
        match model::services_of(objects) {
            Some(keys) if keys.is_empty() => Changed::Nothing,
            Some(keys) => Changed::Services(keys),
            None => Changed::Everything,
        }
    }

    pub fn merge(&mut self, other: Changed) {
        *self = match (std::mem::take(self), other) {
            (Changed::Everything, _) | (_, Changed::Everything) => Changed::Everything,
            (Changed::Nothing, other) | (other, Changed::Nothing) => other,
            (Changed::Services(mut a), Changed::Services(b)) => {
                a.extend(b);
                Changed::Services(a)
            }
        };
    }

    pub fn is_nothing(&self) -> bool {
        *self == Changed::Nothing
    }
}

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

/// The files of one directory with one extension (a policies directory's `NAME.wasm`),
/// watched by fingerprint. A file is settled once its owner has handled its current
/// version; one left unsettled (unreadable, or still being compiled) is offered again at
/// the next look.
#[derive(Debug)]
pub struct DirWatch {
    dir: PathBuf,
    extension: &'static str,
    settled: BTreeMap<PathBuf, Fingerprint>,
}

/// What one look at a directory found.
#[derive(Debug, Default)]
pub struct DirLook {
    /// New files and files whose version is not the one settled, with that version.
    pub changed: Vec<(PathBuf, Fingerprint)>,
    /// Settled files that are gone (forgotten by this look).
    pub gone: Vec<PathBuf>,
}

impl DirWatch {
    pub fn new(dir: PathBuf, extension: &'static str) -> Self {
        DirWatch {
            dir,
            extension,
            settled: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What changed since the files were settled. An unreadable directory is an error,
    /// and forgets nothing.
    pub fn look(&mut self) -> std::io::Result<DirLook> {
        let mut found = BTreeMap::new();
        for path in std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
        {
            if path.extension().is_some_and(|e| e == self.extension)
                && let Ok(fingerprint) = Fingerprint::of(&path)
            {
                found.insert(path, fingerprint);
            }
        }
        let gone: Vec<PathBuf> = (self.settled.keys())
            .filter(|p| !found.contains_key(*p))
            .cloned()
            .collect();
        for path in &gone {
            self.settled.remove(path);
        }
        let changed = found
            .into_iter()
            .filter(|(path, fingerprint)| self.settled.get(path) != Some(fingerprint))
            .collect();
        Ok(DirLook { changed, gone })
    }

    /// The file's version `fingerprint` is handled: not offered again until it changes.
    pub fn settle(&mut self, path: PathBuf, fingerprint: Fingerprint) {
        self.settled.insert(path, fingerprint);
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
    /// The file became empty at the last look, and the objects it had keep serving until
    /// it is seen empty again: a writer that truncates before writing is not applied
    /// half-way.
    emptied: bool,
}

/// What one look at the files found.
#[derive(Debug, Default)]
pub struct Poll {
    /// Whether the objects changed.
    pub changed: bool,
    /// What the change touches.
    pub touched: Changed,
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
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|f| !present.contains(*f))
            .cloned()
            .collect();
        for file in gone {
            if let Some(objects) = self.files.remove(&file).and_then(|f| f.good) {
                poll.touched.merge(Changed::of(&objects));
                poll.changed = true;
            }
        }
        for file in present {
            let fingerprint = Fingerprint::of(&file).ok();
            let watched = self.files.entry(file.clone()).or_insert(WatchedFile {
                fingerprint: None,
                good: None,
                diagnostics: Vec::new(),
                emptied: false,
            });
            let same = watched.fingerprint == fingerprint;
            if same && !watched.emptied && (watched.good.is_some() || fingerprint.is_some()) {
                // Applied, or the same broken version: reported already.
                continue;
            }
            watched.fingerprint = fingerprint;
            let mut objects = Objects::default();
            let mut diagnostics = Vec::new();
            match read_text(&file) {
                Ok(text) => load_str(&file, &text, &mut objects, &mut diagnostics),
                Err(error) => diagnostics.push(Diagnostic::error(file.display(), None, error)),
            }
            let had = watched.good.as_ref().map_or(0, Objects::len);
            let errors = diagnostics.iter().any(Diagnostic::is_error);
            if !errors && objects.is_empty() && had > 0 && !(watched.emptied && same) {
                watched.emptied = true;
                diagnostics.push(Diagnostic::warning(
                    file.display(),
                    None,
                    format!(
                        "the file is empty now; its {had} objects keep serving until it is still empty at the next look"
                    ),
                ));
                watched.diagnostics = diagnostics.clone();
                poll.diagnostics.extend(diagnostics);
                continue;
            }
            watched.emptied = false;
            if errors {
                if watched.good.is_some() {
                    diagnostics.push(Diagnostic::warning(
                        file.display(),
                        None,
                        "ignored this version; the objects of its last good version keep serving",
                    ));
                }
            } else {
                let mut touched = Changed::of(&objects);
                if let Some(previous) = watched.good.replace(objects) {
                    touched.merge(Changed::of(&previous));
                }
                poll.touched.merge(touched);
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

    /// The good objects the ports of `services` are built from (and every Node), without
    /// copying the rest.
    pub fn objects_for(&self, services: &BTreeSet<ServiceKey>) -> Objects {
        let mut all = Objects::default();
        for file in self.files.values() {
            if let Some(objects) = &file.good {
                let some = model::objects_for(objects, services);
                all.services.extend(some.services);
                all.endpoint_slices.extend(some.endpoint_slices);
                all.nodes.extend(some.nodes);
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
        let poll = source.poll();
        assert!(poll.changed);
        let touched = |names: &[&str]| {
            Changed::Services(
                names
                    .iter()
                    .map(|n| ("default".to_string(), n.to_string()))
                    .collect(),
            )
        };
        assert_eq!(
            poll.touched,
            touched(&["api", "web"]),
            "the old and the new Service"
        );
        let objects = source.objects();
        assert_eq!(
            objects.services[0].object.metadata.name.as_deref(),
            Some("api")
        );
        let some = source.objects_for(&[("default".to_string(), "api".to_string())].into());
        assert_eq!(some.services.len(), 1);
        assert!(
            source
                .objects_for(&[("default".to_string(), "web".to_string())].into())
                .services
                .is_empty()
        );

        std::fs::write(
            dir.path().join("node.yaml"),
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n",
        )
        .unwrap();
        assert_eq!(
            source.poll().touched,
            Changed::Everything,
            "a Node reaches every port"
        );
        std::fs::remove_file(&file).unwrap();
        let poll = source.poll();
        assert!(poll.changed);
        assert_eq!(poll.touched, touched(&["api"]));
        assert!(source.objects().services.is_empty());
    }

    /// A file truncated to nothing (a writer that truncates before it writes, or a torn
    /// copy) keeps its objects until it is still empty at the next look; one cut mid-line
    /// stops parsing and keeps them until it is fixed. Emptying a file on purpose still
    /// withdraws its objects, one look later.
    #[test]
    fn a_torn_or_emptied_file_keeps_its_objects_until_it_stays_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        std::fs::write(&file, SERVICE).unwrap();
        let mut source = FileSource::new(vec![dir.path().to_path_buf()]);
        assert!(source.poll().changed);

        std::fs::write(&file, "").unwrap();
        let poll = source.poll();
        assert!(!poll.changed, "not applied at the first look");
        assert!(
            poll.diagnostics
                .iter()
                .any(|d| d.message.contains("empty") && d.message.contains("1 objects")),
            "{:?}",
            poll.diagnostics
        );
        assert_eq!(source.objects().services.len(), 1);
        // The writer finishes: the new version is applied, nothing was withdrawn.
        std::fs::write(&file, SERVICE.replace("80", "81")).unwrap();
        assert!(source.poll().changed);
        assert_eq!(source.objects().services.len(), 1);

        // Cut in the middle of a line: malformed, the last good version keeps serving.
        std::fs::write(&file, &SERVICE[..SERVICE.len() - 12]).unwrap();
        let poll = source.poll();
        assert!(!poll.changed);
        assert!(poll.diagnostics.iter().any(Diagnostic::is_error));
        assert_eq!(source.objects().services.len(), 1);

        // Emptied on purpose: withdrawn once it is still empty at the second look.
        std::fs::write(&file, "# nothing here now\n").unwrap();
        assert!(!source.poll().changed);
        assert_eq!(source.objects().services.len(), 1);
        let poll = source.poll();
        assert!(poll.changed);
        assert!(source.objects().services.is_empty());
        assert!(!source.poll().changed, "and then settled");
    }

    #[test]
    fn duplicate_keys_keep_the_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        std::fs::write(&file, SERVICE).unwrap();
        let mut source = FileSource::new(vec![dir.path().to_path_buf()]);
        assert!(source.poll().changed);
        std::fs::write(
            &file,
            SERVICE.replace("spec: {", "spec: {clusterIP: 127.0.0.11, "),
        )
        .unwrap();
        let poll = source.poll();
        assert!(!poll.changed);
        let error = poll.diagnostics.iter().find(|d| d.is_error()).unwrap();
        assert!(error.message.contains("duplicate"), "{error}");
        assert!(error.message.contains("clusterIP"), "{error}");
        assert!(error.message.contains("line 4"), "{error}");
    }
}
