//! The lab of DESIGN.md in network namespaces: a client, the "VLAN 1512" segment (a Linux bridge
//! in its own namespace), the node whose VLAN-side veth runs vmlb, and VMs serving real Apache
//! httpd. Every address lives only inside these namespaces; deleting them (on drop, also on
//! panic) removes everything.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::PathBuf,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf,
};
use vmlb_user::loader::TOOLS_OBJ;

use crate::netns::{sweep_stale, veth, Netns};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 128);
/// The node's address on the VLAN: SNAT source towards the VMs (the EgressIP's role).
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 125);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 50);
const VM1_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
const VM2_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 3);
/// The node's VLAN-side interface (untagged: this kernel has no 802.1Q devices).
pub const NODE_DEV: &str = "vlan1512";
pub const NODE_MAC: &str = "02:00:0a:0a:01:7d";
/// The bridge-side end of the node's veth: where the node's XDP_TX frames arrive.
pub const NODE_PEER: &str = "p-node";
const CLIENT_MAC: &str = "02:00:0a:0a:01:32";
const BRIDGE: &str = "br1512";

pub struct Vm {
    pub name: &'static str,
    pub addr: Ipv4Addr,
    pub ns: Netns,
}

/// Field order is drop order: the peer's XDP link, then the namespaces, the segment last.
pub struct Lab {
    _peer_xdp: Ebpf,
    pub client: Netns,
    pub node: Netns,
    pub vms: Vec<Vm>,
    pub segment: Netns,
}

/// Join a veth whose other end is `dev` in `ns` to the segment's bridge. Transmit checksum
/// offload is turned off on `dev`: a veth otherwise sends TCP with a partial (pseudo-header only)
/// checksum and metadata saying so, which XDP cannot see; once the node rewrites and XDP_TXes
/// such a frame the metadata is gone and the receiver rightly drops it. Real NICs on the VLAN put
/// complete checksums on the wire, which is what vmlb updates incrementally.
/// The bridge port's MAC is `mac` with its second byte set to 0x15.
fn plug(segment: &Netns, ns: &Netns, dev: &str, mac: &str, port: &str) -> anyhow::Result<()> {
    let port_mac = format!("02:15{}", &mac[5..]);
    veth(ns, dev, mac, segment, port, &port_mac)?;
    segment.ip(&["link", "set", port, "master", BRIDGE])?;
    ns.exec(&["ethtool", "-K", dev, "tx", "off"])
        .context("turning off checksum offload (needs ethtool)")?;
    Ok(())
}

fn permanent_neigh(ns: &Netns, addr: Ipv4Addr, mac: &str, dev: &str) -> anyhow::Result<()> {
    let cmd = format!("neigh replace {addr} lladdr {mac} dev {dev} nud permanent");
    ns.ip(&cmd.split(' ').collect::<Vec<_>>())?;
    Ok(())
}

/// Attach the tools object's `xdp_pass` in native mode to `dev` in the calling thread's
/// namespace; dropping the returned object detaches it.
fn attach_xdp_pass(dev: &str) -> anyhow::Result<Ebpf> {
    let mut obj = Ebpf::load(TOOLS_OBJ).context("loading the tools object")?;
    let prog: &mut Xdp = obj
        .program_mut("xdp_pass")
        .context("xdp_pass missing")?
        .try_into()?;
    prog.load()?;
    prog.attach(dev, XdpMode::Driver)?;
    Ok(obj)
}

impl Lab {
    pub fn new() -> anyhow::Result<Self> {
        sweep_stale();
        let segment = Netns::new("seg")?;
        // STP is off by default, so ports forward as soon as they are up.
        segment.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        segment.ip(&["link", "set", BRIDGE, "up"])?;

        let client = Netns::new("client")?;
        plug(&segment, &client, "eth0", CLIENT_MAC, "p-client")?;
        client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "eth0"])?;
        // Nothing answers ARP for the VIP yet (a later issue): point it at the node by hand.
        permanent_neigh(&client, VIP, NODE_MAC, "eth0")?;

        let node = Netns::new("node")?;
        plug(&segment, &node, NODE_DEV, NODE_MAC, NODE_PEER)?;
        node.ip(&["addr", "add", &format!("{NODE_ADDR}/24"), "dev", NODE_DEV])?;
        // bpf_fib_lookup answers FWD_DISABLED unless the ingress device forwards.
        node.sysctl("net.ipv4.ip_forward", "1")?;
        // A veth's XDP_TX queues the frame on its peer's XDP ring, but only wakes the peer's
        // NAPI if the peer has an XDP program itself (veth_xdp_flush checks rcv_rq->xdp_prog).
        // Enabling GRO on the peer gives it NAPI and a ring, so XDP_TX "succeeds" (xdp_tx
        // counts, no xdp_tx_errors), yet on 6.18 the frames then sit in the ring and never
        // reach the bridge. An XDP_PASS program on the peer makes them flow.
        let peer_xdp = {
            let _in_segment = segment.enter()?;
            attach_xdp_pass(NODE_PEER).context("native XDP_PASS on the node's peer veth")?
        };

        let mut vms = Vec::new();
        for (name, addr) in [("vm1", VM1_ADDR), ("vm2", VM2_ADDR)] {
            let ns = Netns::new(name)?;
            let mac = format!("02:00:0a:0a:01:{:02x}", addr.octets()[3]);
            plug(&segment, &ns, "eth0", &mac, &format!("p-{name}"))?;
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            // User space keeps backend neighbours resolved (the program passes a new flow to the
            // kernel while they are not): here, by hand.
            permanent_neigh(&node, addr, &mac, NODE_DEV)?;
            vms.push(Vm { name, addr, ns });
        }
        Ok(Self {
            _peer_xdp: peer_xdp,
            client,
            node,
            vms,
            segment,
        })
    }

    /// Interface statistics, neighbour tables, veth XDP counters (xdp_tx, xdp_tx_errors) and TCP
    /// checksum errors of every namespace, for failure reports.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let mut show = |ns: &Netns, cmd: &[&str]| {
            let text = match ns.exec(cmd) {
                Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
                Err(e) => format!("{e:#}\n"),
            };
            out += &format!("--- {}: {}\n{text}", ns.name(), cmd.join(" "));
        };
        for ns in [&self.client, &self.node, &self.segment]
            .into_iter()
            .chain(self.vms.iter().map(|v| &v.ns))
        {
            show(ns, &["ip", "-s", "link"]);
            show(ns, &["ip", "neigh"]);
            show(ns, &["nstat", "-asz", "TcpInCsumErrors", "TcpInSegs"]);
        }
        show(&self.node, &["ethtool", "-S", NODE_DEV]);
        show(&self.segment, &["ethtool", "-S", NODE_PEER]);
        out
    }
}

/// `curl -sS --max-time <secs> <url>` inside `ns`: the body, or an error with curl's stderr.
pub fn curl(ns: &Netns, url: &str, secs: u32) -> anyhow::Result<String> {
    let out = ns.exec(&["curl", "-sS", "--max-time", &secs.to_string(), url])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Apache httpd serving "<name>\n" on `addr:80` inside a namespace, with its own config, logs and
/// document root in a temporary directory. Dropping it stops the whole process group.
pub struct Httpd {
    pub name: String,
    dir: PathBuf,
    child: Child,
    /// Access log bytes written before the test's traffic (the readiness probe).
    log_start: usize,
}

impl Httpd {
    pub fn start(ns: &Netns, name: &str, addr: Ipv4Addr) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("vmlb-e2e-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let docs = dir.join("htdocs");
        fs::create_dir_all(&docs)?;
        fs::write(docs.join("index.html"), format!("{name}\n"))?;
        // The workers run as www-data and must read the document root whatever the umask.
        for (p, mode) in [
            (&dir, 0o755),
            (&docs, 0o755),
            (&docs.join("index.html"), 0o644),
        ] {
            fs::set_permissions(p, fs::Permissions::from_mode(mode))?;
        }
        let d = dir.display();
        // log_config and unixd are compiled into Debian's apache2; the rest are modules.
        // %a is the client address and %{remote}p its port: what the SNAT must rewrite.
        let conf = format!(
            r#"ServerRoot "{d}"
ServerName {name}
Listen {addr}:80
PidFile "{d}/httpd.pid"
DefaultRuntimeDir "{d}"
Mutex file:{d} default
ErrorLog "{d}/error.log"
LogLevel warn
LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule dir_module /usr/lib/apache2/modules/mod_dir.so
LoadModule mime_module /usr/lib/apache2/modules/mod_mime.so
User www-data
Group www-data
StartServers 1
ServerLimit 1
ThreadsPerChild 16
MaxRequestWorkers 16
MinSpareThreads 1
MaxSpareThreads 16
KeepAlive Off
TypesConfig /etc/mime.types
DocumentRoot "{d}/htdocs"
DirectoryIndex index.html
<Directory "{d}/htdocs">
    Require all granted
</Directory>
LogFormat "%a %{{remote}}p \"%r\" %>s" vmlb
CustomLog "{d}/access.log" vmlb
"#
        );
        let conf_path = dir.join("httpd.conf");
        fs::write(&conf_path, conf)?;
        let stderr = fs::File::create(dir.join("stderr.log"))?;
        // `ip netns exec` execs apache2, so the child is apache's parent process; with
        // -DFOREGROUND it neither forks away nor calls setsid, so its own process group holds
        // it and its workers.
        let child = ns
            .command("apache2")
            .args(["-f", &conf_path.to_string_lossy(), "-DFOREGROUND"])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("spawning apache2")?;
        let mut httpd = Self {
            name: name.to_string(),
            dir,
            child,
            log_start: 0,
        };
        httpd.wait_ready(ns, addr)?;
        Ok(httpd)
    }

    /// Poll until the server answers with its page from inside its own namespace (at most ~10 s),
    /// then until that request is logged, so the test's traffic is told apart from the probe.
    fn wait_ready(&mut self, ns: &Netns, addr: Ipv4Addr) -> anyhow::Result<()> {
        let url = format!("http://{addr}/");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "apache2 for {} exited ({status}): {}",
                    self.name,
                    self.logs()
                );
            }
            let last = match curl(ns, &url, 1) {
                Ok(body) if body.trim() == self.name => break,
                Ok(body) => format!("unexpected body {body:?}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "apache2 for {} not ready after 10 s ({last}): {}",
                    self.name,
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.read("access.log");
            if log.ends_with('\n') {
                self.log_start = log.len();
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the readiness request of {} was never logged", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn read(&self, file: &str) -> String {
        fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Access log lines written after readiness: "<client addr> <client port> \"<request>\" <status>".
    pub fn access_lines(&self) -> Vec<String> {
        let log = self.read("access.log");
        log.get(self.log_start..)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Everything the server logged, for failure reports.
    pub fn logs(&self) -> String {
        format!(
            "\n--- {0} access.log\n{1}--- {0} error.log\n{2}--- {0} stderr\n{3}",
            self.name,
            self.read("access.log"),
            self.read("error.log"),
            self.read("stderr.log"),
        )
    }
}

impl Drop for Httpd {
    fn drop(&mut self) {
        let pgid = -(self.child.id() as i32);
        // SIGTERM lets the parent stop its workers; SIGKILL the group if that takes over 5 s.
        // SAFETY: kill(2) with a process group id we created; no memory is involved.
        unsafe { libc::kill(pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; workers left behind by a dead parent are killed too.
        unsafe { libc::kill(pgid, libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
