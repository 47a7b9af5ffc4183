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

use crate::model::{ConfiguredService, NodeConfig};
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
    /// `deploy/x.yaml:12: spec.endpoints[1].address: invalid IPv4 address "10.10.1.300"`
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

/// Every ServiceEntry in these files/directories (directories: *.yaml and *.yml, sorted, not
/// recursive).
pub fn load(paths: &[PathBuf], node: &NodeConfig) -> Result<Vec<ConfiguredService>, ConfigErrors> {
    let (files, mut errors) = expand(paths);
    let mut parsed = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => parsed.extend(serviceentry::parse_file(&text, &file, node, &mut errors)),
            Err(e) => errors.push(file_error(&file, format!("cannot read: {e}"))),
        }
    }
    finish(parsed, errors)
}

/// One file's text (for tests and reload); `file` is used in errors.
pub fn parse_str(
    text: &str,
    file: &Path,
    node: &NodeConfig,
) -> Result<Vec<ConfiguredService>, ConfigErrors> {
    let mut errors = Vec::new();
    let parsed = serviceentry::parse_file(text, file, node, &mut errors);
    finish(parsed, errors)
}

/// The files `load` would read (for the file watcher).
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ConfigErrors> {
    match expand(paths) {
        (files, errors) if errors.is_empty() => Ok(files),
        (_, errors) => Err(ConfigErrors(errors)),
    }
}

/// Files as given (whatever their extension), directories expanded; each file once, so passing
/// a file and its directory does not report every service as defined twice.
fn expand(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<ConfigError>) {
    let (mut files, mut errors) = (Vec::new(), Vec::new());
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
        files.extend(found);
    }
    let mut seen = HashSet::new();
    files.retain(|f| seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())));
    (files, errors)
}

fn file_error(file: &Path, message: String) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: None,
        field: String::new(),
        message,
    }
}

/// Checks that need every service at once, then the result.
fn finish(
    parsed: Vec<Parsed>,
    mut errors: Vec<ConfigError>,
) -> Result<Vec<ConfiguredService>, ConfigErrors> {
    errors.extend(duplicates(&parsed));
    if errors.is_empty() {
        Ok(parsed.into_iter().map(|p| p.svc).collect())
    } else {
        Err(ConfigErrors(errors))
    }
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
    errors
}
