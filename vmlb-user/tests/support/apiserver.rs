//! A scripted Kubernetes API server on loopback: an in-memory object store that speaks the
//! real list/watch protocol over HTTP/1.1 (lists with a resourceVersion, chunked watch streams
//! of JSON lines, `ERROR` events with a 410 Status), create/replace with optimistic
//! concurrency, merge and apply patches, deletes. Tests script it (add, change and delete
//! objects, expire every watch, fail some writes) and read back what vmlb wrote.
//!
//! Only what vmlb uses is implemented: label selectors of the form `k=v`, no field selectors,
//! no pagination (one page holds everything), server-side apply as "replace the fields given".

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::Method,
    response::Response,
    Router,
};
use futures::StreamExt as _;
use serde_json::{json, Value};
use tokio::sync::{broadcast, Notify};

/// `(api prefix, plural)`, e.g. `("api/v1", "services")`.
type Collection = (String, String);

#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub body: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Watches asking for a resourceVersion older than this get 410 Gone.
    oldest_rv: u64,
    objects: BTreeMap<(Collection, String, String), Value>,
    /// Every change, for watches that resume from a resourceVersion.
    events: Vec<(u64, Collection, &'static str, Value)>,
    log: Vec<Logged>,
    /// Writes whose path contains one of these fail with 503.
    failing: Vec<String>,
}

#[derive(Clone)]
pub struct ApiServer {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    changes: broadcast::Sender<()>,
    expire: broadcast::Sender<()>,
    changed: Arc<Notify>,
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::start_on(listener).await
    }

    /// Serves on a listener bound by the caller (a test binds it inside a network namespace,
    /// so that a daemon in that namespace reaches it on its loopback).
    pub async fn start_on(listener: std::net::TcpListener) -> ApiServer {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (changes, _) = broadcast::channel(1024);
        let (expire, _) = broadcast::channel(16);
        let server = ApiServer {
            addr: "127.0.0.1:0".parse().unwrap(),
            store: Arc::default(),
            changes,
            expire,
            changed: Arc::new(Notify::new()),
        };
        let addr = listener.local_addr().unwrap();
        let server = ApiServer { addr, ..server };
        let app = Router::new().fallback(handle).with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        server
    }

    /// Serves the same objects on a second listener (a second node's namespace); returns its
    /// URL.
    pub fn serve_also(&self, listener: std::net::TcpListener) -> String {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new().fallback(handle).with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self, namespace: &str) -> String {
        kubeconfig(&self.url(), namespace)
    }

    /// Add or replace an object, as another client would. Its path is derived from apiVersion,
    /// kind's plural (given) and namespace.
    pub fn put(&self, plural: &str, obj: Value) -> Value {
        let coll = (prefix_of(&obj), plural.to_string());
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        self.write(coll, ns, name, obj)
    }

    pub fn delete(&self, plural: &str, api_version: &str, ns: &str, name: &str) {
        let coll = (
            prefix_of(&json!({"apiVersion": api_version})),
            plural.to_string(),
        );
        self.remove(&coll, ns, name);
    }

    pub fn get(&self, plural: &str, api_version: &str, ns: &str, name: &str) -> Option<Value> {
        let coll = (
            prefix_of(&json!({"apiVersion": api_version})),
            plural.to_string(),
        );
        let st = self.store.lock().unwrap();
        st.objects.get(&(coll, ns.into(), name.into())).cloned()
    }

    pub fn list(&self, plural: &str) -> Vec<Value> {
        let st = self.store.lock().unwrap();
        st.objects
            .iter()
            .filter(|((c, _, _), _)| c.1 == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every watch gets `ERROR 410 Expired` and every older resourceVersion is gone: the
    /// clients must re-list.
    pub fn expire_watches(&self) {
        let mut st = self.store.lock().unwrap();
        st.oldest_rv = st.rv + 1;
        drop(st);
        let _ = self.expire.send(());
    }

    /// Writes to paths containing `part` fail with 503 until `heal`.
    pub fn fail_writes(&self, part: &str) {
        self.store.lock().unwrap().failing.push(part.to_string());
    }

    pub fn heal(&self) {
        self.store.lock().unwrap().failing.clear();
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.store.lock().unwrap().log.clone()
    }

    /// Waits until `cond` holds on the server's state, re-checking after every change; fails
    /// the test after `secs` seconds.
    pub async fn wait_for<T>(
        &self,
        secs: u64,
        what: &str,
        mut cond: impl FnMut(&ApiServer) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let notified = self.changed.notified();
            if let Some(v) = cond(self) {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                if let Some(v) = cond(self) {
                    return v;
                }
                panic!("timed out after {secs}s waiting for {what}");
            }
        }
    }

    fn write(&self, coll: Collection, ns: String, name: String, mut obj: Value) -> Value {
        let mut st = self.store.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let key = (coll.clone(), ns.clone(), name.clone());
        let old = st.objects.get(&key).cloned();
        let meta = obj["metadata"].as_object_mut().unwrap();
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        if !ns.is_empty() {
            meta.insert("namespace".into(), json!(ns));
        }
        let keep = |f: &str| old.as_ref().and_then(|o| o["metadata"].get(f).cloned());
        let uid = keep("uid").unwrap_or_else(|| json!(format!("uid-{}-{name}-{rv}", coll.1)));
        meta.insert("uid".into(), uid);
        let created = keep("creationTimestamp")
            .unwrap_or_else(|| json!(format!("2026-11-29T00:00:{:02}Z", rv % 60)));
        meta.entry("creationTimestamp").or_insert(created);
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        st.objects.insert(key, obj.clone());
        st.events.push((rv, coll, kind, obj.clone()));
        drop(st);
        let _ = self.changes.send(());
        self.changed.notify_waiters();
        obj
    }

    fn remove(&self, coll: &Collection, ns: &str, name: &str) -> Option<Value> {
        let mut st = self.store.lock().unwrap();
        let mut obj = st.objects.remove(&(coll.clone(), ns.into(), name.into()))?;
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push((rv, coll.clone(), "DELETED", obj.clone()));
        drop(st);
        let _ = self.changes.send(());
        self.changed.notify_waiters();
        Some(obj)
    }
}

fn prefix_of(obj: &Value) -> String {
    match obj["apiVersion"].as_str().unwrap() {
        "v1" => "api/v1".into(),
        gv => format!("apis/{gv}"),
    }
}

/// `(collection, namespace or "", name, subresource)` from a request path.
fn route(path: &str) -> Option<(Collection, String, Option<String>, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("api/v1".to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (p, None, None),
        [p, n] => (p, Some(n.to_string()), None),
        [p, n, s] => (p, Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    Some(((prefix, plural.to_string()), ns, name, sub))
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "code": code, "reason": reason, "message": message});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn ok_json(v: &Value) -> Response {
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

fn query(req: &Request) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn selects(sel: Option<&String>, obj: &Value) -> bool {
    let Some(sel) = sel.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => obj["metadata"]["labels"][k].as_str() == Some(v),
        None => !obj["metadata"]["labels"][term].is_null(),
    })
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

async fn handle(State(s): State<ApiServer>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let q = query(&req);
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes: Bytes = axum::body::to_bytes(req.into_body(), 1 << 22)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    {
        let mut st = s.store.lock().unwrap();
        st.log.push(Logged {
            method: method.to_string(),
            path: path.clone(),
            body: body.clone(),
        });
        let failing = st.failing.iter().any(|f| path.contains(f.as_str()));
        drop(st);
        s.changed.notify_waiters();
        if method != Method::GET && failing {
            return status(503, "ServiceUnavailable", "scripted failure");
        }
    }
    let Some((coll, ns, name, sub)) = route(&path) else {
        return status(404, "NotFound", "no such path");
    };
    match (method, name) {
        (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(s, coll, ns, q)
        }
        (Method::GET, None) => {
            let st = s.store.lock().unwrap();
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|((c, n, _), o)| {
                    *c == coll && (ns.is_empty() || *n == ns) && selects(q.get("labelSelector"), o)
                })
                .map(|(_, o)| o.clone())
                .collect();
            ok_json(&json!({"kind": "List", "apiVersion": "v1",
                             "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}))
        }
        (Method::GET, Some(name)) => match s.get_raw(&coll, &ns, &name) {
            Some(o) => ok_json(&o),
            None => status(404, "NotFound", &format!("{} {name} not found", coll.1)),
        },
        (Method::POST, _) => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if s.get_raw(&coll, &ns, &name).is_some() {
                return status(409, "AlreadyExists", &format!("{name} already exists"));
            }
            ok_json(&s.write(coll, ns, name, body))
        }
        (Method::PUT, Some(name)) => {
            let Some(old) = s.get_raw(&coll, &ns, &name) else {
                return status(404, "NotFound", "not found");
            };
            let want = body["metadata"]["resourceVersion"].as_str();
            if want.is_some_and(|w| Some(w) != old["metadata"]["resourceVersion"].as_str()) {
                return status(409, "Conflict", "the object has been modified");
            }
            ok_json(&s.write(coll, ns, name, body))
        }
        (Method::PATCH, Some(name)) => {
            let old = s.get_raw(&coll, &ns, &name);
            let apply = content_type.contains("apply-patch");
            let mut obj = match (old, apply) {
                (Some(o), _) => o,
                (None, true) => json!({"metadata": {}}),
                (None, false) => return status(404, "NotFound", "not found"),
            };
            let mut patch = body;
            if sub.as_deref() == Some("status") {
                // The status subresource changes status only.
                patch = json!({"status": patch["status"].clone()});
            }
            if apply {
                // Fields vmlb manages are replaced whole (enough for its own objects).
                for (k, v) in patch.as_object().cloned().unwrap_or_default() {
                    if k == "metadata" {
                        merge(&mut obj["metadata"], &v);
                    } else {
                        obj[k] = v;
                    }
                }
            } else {
                merge(&mut obj, &patch);
            }
            ok_json(&s.write(coll, ns, name, obj))
        }
        (Method::DELETE, Some(name)) => match s.remove(&coll, &ns, &name) {
            Some(o) => ok_json(&o),
            None => status(404, "NotFound", "not found"),
        },
        _ => status(405, "MethodNotAllowed", "not scripted"),
    }
}

impl ApiServer {
    fn get_raw(&self, coll: &Collection, ns: &str, name: &str) -> Option<Value> {
        let st = self.store.lock().unwrap();
        st.objects
            .get(&(coll.clone(), ns.into(), name.into()))
            .cloned()
    }
}

/// A watch: the changes after `resourceVersion`, then new ones as they happen, as JSON lines.
fn watch(s: ApiServer, coll: Collection, ns: String, q: BTreeMap<String, String>) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let sel = q.get("labelSelector").cloned();
    let mut changes = s.changes.subscribe();
    let mut expire = s.expire.subscribe();
    let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
        "status": "Failure", "code": 410, "reason": "Expired", "message": "too old resource version"}});
    let stream = async_stream_lines(move |tx| async move {
        let mut sent = from;
        loop {
            let (lines, expired) = {
                let st = s.store.lock().unwrap();
                if sent + 1 < st.oldest_rv {
                    (Vec::new(), true)
                } else {
                    let lines: Vec<(u64, Value)> = st
                        .events
                        .iter()
                        .filter(|(rv, c, _, o)| {
                            *rv > sent
                                && *c == coll
                                && (ns.is_empty()
                                    || o["metadata"]["namespace"].as_str() == Some(ns.as_str()))
                                && selects(sel.as_ref(), o)
                        })
                        .map(|(rv, _, t, o)| (*rv, json!({"type": t, "object": o})))
                        .collect();
                    sent = st.rv.max(sent);
                    (lines, false)
                }
            };
            if expired {
                let _ = tx.send(gone.clone()).await;
                return;
            }
            for (_, l) in lines {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                r = changes.recv() => if matches!(r, Err(broadcast::error::RecvError::Closed)) { return },
                _ = expire.recv() => {
                    let _ = tx.send(gone.clone()).await;
                    return;
                }
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Runs `f` with a sender; what it sends becomes the body, one JSON document per line.
fn async_stream_lines<F, Fut>(f: F) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Value>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    futures::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        Some((Ok(Bytes::from(format!("{v}\n"))), rx))
    })
    .boxed()
}

/// A kubeconfig for `url` (plain HTTP, no credentials).
pub fn kubeconfig(url: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: scripted\n\
         clusters:\n- name: scripted\n  cluster:\n    server: {url}\n\
         contexts:\n- name: scripted\n  context:\n    cluster: scripted\n    user: nobody\n    namespace: {namespace}\n\
         users:\n- name: nobody\n  user: {{}}\n"
    )
}
