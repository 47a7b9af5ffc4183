//! The file source: Istio ServiceEntry YAML -> `model::ConfiguredService`; `watch` says when to
//! read again.
//!
//! Files hold Kubernetes manifests as `kubectl apply` takes them (several documents per file,
//! `kind: List` too); only ServiceEntries (networking.istio.io v1, v1beta1, v1alpha3) are read,
//! other kinds are skipped. Each (VIP, port) of a ServiceEntry becomes one service: the VIPs are
//! `spec.addresses`, the backends `spec.endpoints` (static IPv4 addresses). vmlb's own options
//! are `vmlb.io/` annotations, listed in [`ANNOTATIONS`].
//!
//! Errors are collected over all files, and each names its file, line and field path.

mod serviceentry;
pub mod watch;
mod yaml;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
};

use crate::model::{ConfiguredService, Mode, NodeConfig};
use serviceentry::Parsed;
pub use serviceentry::{ANNOTATIONS, API_VERSIONS};

/// One problem in the configuration, located as precisely as the input allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; `None` when the file itself is the problem (missing, unreadable).
    pub line: Option<usize>,
    /// Path of the field, e.g. `spec.endpoints[1].address`; empty for syntax and file errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `deploy/x.yaml:12: spec.endpoints[1].address: invalid IP address "10.10.1.300"`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every error found; never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Largest configuration file read, and most bytes read over all files: a ConfigMap holds at
/// most 1 MiB, and reading is bounded even if a file grows while it is read.
pub const MAX_FILE_BYTES: u64 = yaml::MAX_DOCUMENT_BYTES as u64;
pub const MAX_TOTAL_BYTES: u64 = 16 * MAX_FILE_BYTES;

/// What the data path can hold, checked before anything is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Entries of the MAGLEV array (`--maglev-entries`).
    pub ring_entries: u32,
    /// Service ids the maps hold, id 0 included (`loader::Sizes::services`).
    pub services: u32,
    /// Backend ids the maps hold, id 0 included (`loader::Sizes::backends`).
    pub backends: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            ring_entries: vmlb_common::DEFAULT_MAGLEV_ENTRIES,
            services: vmlb_common::MAX_SERVICES,
            backends: vmlb_common::MAX_BACKENDS,
        }
    }
}

/// What one file contributed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FileReport {
    pub file: PathBuf,
    /// YAML documents (items of a `kind: List` count one each).
    pub documents: usize,
    pub service_entries: usize,
    /// Services (VIP x port) defined; 0 when the file has errors.
    pub services: usize,
    /// Documents of other kinds, skipped.
    pub skipped: usize,
    pub errors: usize,
    pub warnings: usize,
}

/// Everything reading the configuration found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Valid only when `errors` is empty.
    pub services: Vec<ConfiguredService>,
    pub errors: Vec<ConfigError>,
    /// Valid but probably not meant: skipped documents, empty files and directories, services
    /// whose traffic is dropped, tight ring space.
    pub warnings: Vec<ConfigError>,
    /// Every file read, in order.
    pub files: Vec<FileReport>,
}

impl Report {
    pub fn into_result(self) -> Result<Vec<ConfiguredService>, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(self.services)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}

/// Every ServiceEntry in these files/directories (directories: *.yaml and *.yml, sorted, not
/// recursive), or every error.
pub fn load(paths: &[PathBuf], node: &NodeConfig) -> Result<Vec<ConfiguredService>, ConfigErrors> {
    read(paths, node, Capacity::default()).into_result()
}

/// Read and check everything, and say what each file contributed.
pub fn read(paths: &[PathBuf], node: &NodeConfig, capacity: Capacity) -> Report {
    let (files, mut errors, mut warnings) = expand(paths);
    let mut parsed = Vec::new();
    let mut reports = Vec::new();
    let mut budget = MAX_TOTAL_BYTES;
    for file in files {
        let (e0, w0) = (errors.len(), warnings.len());
        let mut report = FileReport {
            file: file.clone(),
            ..Default::default()
        };
        match read_text(&file, &mut budget) {
            Ok(text) => {
                let (services, contents) =
                    serviceentry::parse_file(&text, &file, node, &mut errors, &mut warnings);
                if contents.documents == 0 && errors.len() == e0 {
                    warnings.push(file_error(&file, "no YAML documents in this file".into()));
                }
                report.documents = contents.documents;
                report.service_entries = contents.service_entries;
                report.skipped = contents.skipped;
                report.services = services.len();
                parsed.extend(services);
            }
            Err(e) => errors.push(e),
        }
        report.errors = errors.len() - e0;
        report.warnings = warnings.len() - w0;
        reports.push(report);
    }
    errors.extend(duplicates(&parsed));
    errors.extend(capacity_errors(&parsed, capacity, &mut warnings));
    Report {
        services: parsed.into_iter().map(|p| p.svc).collect(),
        errors,
        warnings,
        files: reports,
    }
}

/// A file's text, at most `MAX_FILE_BYTES` and what is left of `budget`; invalid UTF-8 is
/// reported at its line.
fn read_text(file: &Path, budget: &mut u64) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let limit = MAX_FILE_BYTES.min(*budget);
    let mut bytes = Vec::new();
    let cannot = |e: std::io::Error| file_error(file, format!("cannot read: {e}"));
    let mut f = std::fs::File::open(file).map_err(cannot)?;
    // A file written in place while we read it could parse as a valid but partial
    // configuration: refuse a read during which the file changed (the watcher reports the
    // change, so the finished file is read again).
    let stamp = |f: &std::fs::File| f.metadata().map(|m| (m.len(), m.modified().ok()));
    let before = stamp(&f).map_err(cannot)?;
    (&mut f)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    let short = bytes.len() as u64 <= limit && bytes.len() as u64 != before.0;
    if short || stamp(&f).map_err(cannot)? != before {
        return Err(file_error(
            file,
            "changed while it was read; the finished file is read on the next change".into(),
        ));
    }
    if bytes.len() as u64 > limit {
        let why = if limit < MAX_FILE_BYTES {
            format!("the files read so far exceed {MAX_TOTAL_BYTES} bytes in all")
        } else {
            format!("the file is larger than {MAX_FILE_BYTES} bytes")
        };
        return Err(file_error(file, format!("{why}; vmlb does not read it")));
    }
    *budget -= bytes.len() as u64;
    String::from_utf8(bytes).map_err(|e| {
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = 1 + good.iter().filter(|&&b| b == b'\n').count();
        ConfigError {
            file: file.to_path_buf(),
            line: Some(line),
            field: String::new(),
            message: format!("not valid UTF-8 (byte {} of the file)", good.len() + 1),
        }
    })
}

/// One file's text (for tests and reload); `file` is used in errors.
pub fn parse_str(
    text: &str,
    file: &Path,
    node: &NodeConfig,
) -> Result<Vec<ConfiguredService>, ConfigErrors> {
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    let (parsed, _) = serviceentry::parse_file(text, file, node, &mut errors, &mut warnings);
    errors.extend(duplicates(&parsed));
    if errors.is_empty() {
        Ok(parsed.into_iter().map(|p| p.svc).collect())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The files `load` would read (for the file watcher).
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ConfigErrors> {
    match expand(paths) {
        (files, errors, _) if errors.is_empty() => Ok(files),
        (_, errors, _) => Err(ConfigErrors(errors)),
    }
}

/// Files as given (whatever their extension), directories expanded; each file once, so passing
/// a file and its directory does not report every service as defined twice.
fn expand(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<ConfigError>, Vec<ConfigError>) {
    let (mut files, mut errors, mut warnings) = (Vec::new(), Vec::new(), Vec::new());
    for path in paths {
        if !path.is_dir() {
            if path.exists() {
                files.push(path.clone());
            } else {
                errors.push(file_error(path, "no such file or directory".into()));
            }
            continue;
        }
        let entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) => {
                errors.push(file_error(path, format!("cannot read directory: {e}")));
                continue;
            }
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                // Hidden files are editor and ConfigMap-mount artefacts (`..data`); is_file
                // follows symlinks, which is how ConfigMap volumes present their keys.
                !name.starts_with('.')
                    && (name.ends_with(".yaml") || name.ends_with(".yml"))
                    && p.is_file()
            })
            .collect();
        found.sort();
        if found.is_empty() {
            warnings.push(file_error(
                path,
                "no *.yaml or *.yml files in this directory".into(),
            ));
        }
        files.extend(found);
    }
    let mut seen = HashSet::new();
    files.retain(|f| seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())));
    (files, errors, warnings)
}

fn file_error(file: &Path, message: String) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: None,
        field: String::new(),
        message,
    }
}

/// The data path's limits over all services, reported at the service that crosses each, with
/// the numbers.
fn capacity_errors(
    parsed: &[Parsed],
    capacity: Capacity,
    warnings: &mut Vec<ConfigError>,
) -> Vec<ConfigError> {
    let at = |p: &Parsed, message: String| ConfigError {
        file: p.svc.file.clone(),
        line: Some(p.svc.line),
        field: p.field.clone(),
        message,
    };
    let mut errors = Vec::new();
    // Id 0 is never assigned.
    let max_services = (capacity.services as usize).saturating_sub(1);
    let max_backends = (capacity.backends as usize).saturating_sub(1);
    if let Some(p) = parsed.get(max_services) {
        errors.push(at(
            p,
            format!(
                "{} services in all; the data path holds at most {max_services}",
                parsed.len()
            ),
        ));
    }
    let (mut backends, mut ring) = (0usize, 0u64);
    let (mut backends_reported, mut ring_reported) = (false, false);
    let total_backends: usize = parsed.iter().map(|p| p.svc.spec.backends.len()).sum();
    let total_ring: u64 = parsed.iter().map(|p| u64::from(p.svc.spec.ring_size)).sum();
    let entries = u64::from(capacity.ring_entries);
    for p in parsed {
        backends += p.svc.spec.backends.len();
        ring += u64::from(p.svc.spec.ring_size);
        if backends > max_backends && !backends_reported {
            backends_reported = true;
            errors.push(at(
                p,
                format!(
                    "{total_backends} backends in all (one per service and endpoint); the data \
                     path holds at most {max_backends}"
                ),
            ));
        }
        if ring > entries && !ring_reported {
            ring_reported = true;
            errors.push(at(
                p,
                format!(
                    "the Maglev tables need {total_ring} entries in all; the MAGLEV array has \
                     {entries} (--maglev-entries, or smaller vmlb.io/maglev-size)"
                ),
            ));
        }
    }
    // A changed table is written into free space before the old one is released.
    if !ring_reported && total_ring * 2 > entries {
        if let Some(p) = parsed.last() {
            warnings.push(at(
                p,
                format!(
                    "the Maglev tables use {total_ring} of {entries} entries: a reload that \
                     rebuilds tables needs that much free space again, and is refused when it \
                     is short (the running configuration keeps serving)"
                ),
            ));
        }
    }
    errors
}

/// The data path has one service per (VIP, port, protocol), and logs, metrics and the CLI name
/// services, so both must be unique. Reported at the second definition, naming the first.
fn duplicates(parsed: &[Parsed]) -> Vec<ConfigError> {
    let mut by_key: HashMap<_, &ConfiguredService> = HashMap::new();
    let mut by_name: HashMap<&str, &ConfiguredService> = HashMap::new();
    let mut errors = Vec::new();
    for p in parsed {
        let s = &p.svc;
        let key = (s.spec.vip, s.spec.port, s.spec.proto);
        let (what, first): (String, &ConfiguredService) = if let Some(first) = by_key.get(&key) {
            let proto = s.spec.proto.name();
            (format!("{}:{}/{proto}", s.spec.vip, s.spec.port), first)
        } else if let Some(first) = by_name.get(s.name.as_str()) {
            (format!("service name {}", s.name), first)
        } else {
            by_key.insert(key, s);
            by_name.insert(&s.name, s);
            continue;
        };
        errors.push(ConfigError {
            file: s.file.clone(),
            line: Some(s.line),
            field: p.field.clone(),
            message: format!(
                "{what} is defined twice: also by {} at {}:{}",
                first.name,
                first.file.display(),
                first.line
            ),
        });
    }
    errors.extend(dnat_conflicts(parsed));
    errors
}

/// A dnat service's replies are recognised by their source, the backend endpoint: one endpoint
/// can serve only one dnat service (its replies could not say which VIP to answer from).
fn dnat_conflicts(parsed: &[Parsed]) -> Vec<ConfigError> {
    let mut owner: HashMap<_, &ConfiguredService> = HashMap::new();
    let mut errors = Vec::new();
    for p in parsed.iter().filter(|p| p.svc.spec.mode == Mode::Dnat) {
        let s = &p.svc;
        for b in &s.spec.backends {
            let first = *owner.entry((b.addr, b.port, s.spec.proto)).or_insert(s);
            if std::ptr::eq(first, s) {
                continue;
            }
            errors.push(ConfigError {
                file: s.file.clone(),
                line: Some(s.line),
                field: p.field.clone(),
                message: format!(
                    "endpoint {}/{} already serves the dnat service {} ({}:{}); an endpoint \
                     can serve one dnat service only, since its replies name the service by \
                     their source",
                    std::net::SocketAddr::new(b.addr, b.port),
                    s.spec.proto.name(),
                    first.name,
                    first.file.display(),
                    first.line
                ),
            });
            break;
        }
    }
    errors
}
