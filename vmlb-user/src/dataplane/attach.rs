//! Getting the program onto the interface: adopt a pinned one (a restart), upgrade it in place
//! (a new version), or load, attach and pin a new one; and detaching at the end.

use std::path::Path;

use anyhow::Context as _;
use aya::{
    programs::{links::FdLink, links::PinnedLink, xdp::XdpLink, Xdp, XdpMode as AyaXdpMode},
    Ebpf,
};
use tracing::{info, warn};
use vmlb_common::PROGRAM_NAME;

use super::{
    layout::{self, Action},
    loader::{self, Sizes},
    maps::BpfMaps,
    migrate::Migration,
    pins::{create_private_dir, ensure_bpffs, PinLayout},
};
use crate::reconcile::Reconciler;

/// How to attach a newly loaded program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic (skb) mode with a warning.
    Auto,
    Native,
    Skb,
}

/// What to attach where.
#[derive(Clone, Debug)]
pub struct AttachSpec {
    pub iface: String,
    pub mode: XdpMode,
    /// Root of the pin directories; this interface's are in `<pin_root>/<iface>`.
    pub pin_root: std::path::PathBuf,
    /// Map sizes for a fresh load (an adopted program keeps its maps' sizes).
    pub flow_entries: u32,
    pub flow6_entries: u32,
    pub maglev_entries: u32,
    pub max_services: u32,
    pub max_backends: u32,
    /// Migrate from an older map layout even when its flows cannot be carried over.
    pub upgrade_drops_flows: bool,
}

/// How the program came to run, for logs and `vmlb inspect status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Loaded and attached by this daemon in native mode.
    LoadedNative,
    /// Loaded and attached by this daemon in generic (skb) mode.
    LoadedSkb,
    /// A previous daemon's program, same code: adopted as it was.
    Adopted,
    /// A previous daemon's program replaced in its link by this version's.
    Upgraded,
    /// A previous daemon's program on an older map layout, replaced in its link by this
    /// version's with its state migrated (`dataplane::migrate`).
    Migrated,
}

impl Origin {
    /// As the state file and `inspect status` spell it.
    pub fn label(self) -> &'static str {
        match self {
            Origin::LoadedNative => "loaded_native",
            Origin::LoadedSkb => "loaded_skb",
            Origin::Adopted => "adopted",
            Origin::Upgraded => "upgraded",
            Origin::Migrated => "migrated",
        }
    }

    /// "native" or "skb" when this daemon attached the program itself.
    pub fn xdp_mode(self) -> Option<&'static str> {
        match self {
            Origin::LoadedNative => Some("native"),
            Origin::LoadedSkb => Some("skb"),
            Origin::Adopted | Origin::Upgraded | Origin::Migrated => None,
        }
    }
}

/// What keeps the program attached while the daemon runs.
pub struct Attachment {
    /// Our own copy of the object when we loaded it (keeps program fds alive until the link
    /// holds them).
    _ebpf: Option<Ebpf>,
    link: PinnedLink,
    pub origin: Origin,
    layout: PinLayout,
}

impl Attachment {
    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// This daemon's own copy of the object, when it loaded the program (not when it adopted
    /// one).
    pub fn ebpf_mut(&mut self) -> Option<&mut Ebpf> {
        self._ebpf.as_mut()
    }

    /// Unpin the link (detaching the program once the last fd closes) and remove the pins.
    pub fn detach(self) -> anyhow::Result<()> {
        let fd_link: FdLink = self.link.unpin().context("unpinning the XDP link")?;
        drop(fd_link);
        let _ = self.layout.remove_maps();
        let _ = std::fs::remove_dir(self.layout.iface_dir());
        Ok(())
    }
}

/// Adopt a pinned program if one is attached to this interface; otherwise load, attach and pin.
///
/// Pins of another layout version are never opened as this version's maps: an older one in use
/// is migrated (the returned `Migration`, finished by the daemon once its configuration is in
/// this version's maps: until then the old program keeps serving), a newer one is refused.
pub fn attach_or_adopt(
    spec: &AttachSpec,
) -> anyhow::Result<(Attachment, BpfMaps, Option<Migration>)> {
    let layout = PinLayout::new(&spec.pin_root, &spec.iface);
    let present = layout.versions_present();
    let link = layout.link().exists();
    let live = if link {
        super::migrate::live_version(&layout, &present)
    } else {
        None
    };
    let (action, leftovers) = layout::decide(&present, link, live);
    if let Action::RefuseNewer { version } = action {
        anyhow::bail!(
            "the maps pinned in {} are of layout v{version}, newer than this vmlb's v{} (a \
             downgrade); a vmlb never opens a newer layout's maps. The running program keeps \
             serving. Keep running the newer vmlb, or detach it first (stop its daemon with \
             --detach-on-exit; every flow is lost), then start this one.",
            layout.with_version(version).dir().display(),
            vmlb_common::LAYOUT_VERSION
        );
    }
    for v in leftovers {
        let old = layout.with_version(v);
        warn!(pins = %old.dir().display(), "removing layout v{v}'s pins: no program uses them");
        old.remove_maps()
            .with_context(|| format!("removing {}", old.dir().display()))?;
    }
    match action {
        Action::Adopt => {
            // Pins made by an older version may be wider open.
            for dir in [spec.pin_root.as_path(), layout.iface_dir(), layout.dir()] {
                create_private_dir(dir)
                    .with_context(|| format!("making {} private", dir.display()))?;
            }
            let (a, m) = adopt_or_upgrade(spec, layout)?;
            return Ok((a, m, None));
        }
        Action::Migrate { from } => return prepare_migration(spec, layout, from),
        Action::Fresh | Action::RefuseNewer { .. } => {}
    }

    if ensure_bpffs(&spec.pin_root)
        .with_context(|| format!("mounting a BPF filesystem for {}", spec.pin_root.display()))?
    {
        info!(pin_dir = %spec.pin_root.display(), "mounted a BPF filesystem for the pins");
    }
    for dir in [spec.pin_root.as_path(), layout.iface_dir(), layout.dir()] {
        create_private_dir(dir).with_context(|| {
            format!(
                "creating {} (is bpffs mounted at /sys/fs/bpf?)",
                dir.display()
            )
        })?;
    }
    let mut ebpf = loader::load(Sizes {
        flows: Some(spec.flow_entries),
        flows6: Some(spec.flow6_entries),
        maglev: Some(spec.maglev_entries),
        services: Some(spec.max_services),
        backends: Some(spec.max_backends),
        pins: Some(layout.clone()),
        ..Default::default()
    })?;
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .context("program vmlb missing from the object")?
        .try_into()?;
    let iface = &spec.iface;
    let (link_id, origin) = match spec.mode {
        XdpMode::Native => (
            prog.attach(iface, AyaXdpMode::Driver).with_context(|| {
                format!(
                    "attaching in native mode to {iface} (try --xdp-mode skb if the driver lacks XDP)"
                )
            })?,
            Origin::LoadedNative,
        ),
        XdpMode::Skb => (
            prog.attach(iface, AyaXdpMode::Skb)
                .with_context(|| format!("attaching in generic (skb) mode to {iface}"))?,
            Origin::LoadedSkb,
        ),
        XdpMode::Auto => match prog.attach(iface, AyaXdpMode::Driver) {
            Ok(id) => {
                info!(%iface, "attached in native (driver) mode");
                (id, Origin::LoadedNative)
            }
            Err(e) => {
                warn!(%iface, "native XDP failed ({e}); falling back to generic (skb) mode");
                let id = prog.attach(iface, AyaXdpMode::Skb).with_context(|| {
                    format!("attaching to {iface} in native and in generic mode (does the interface exist in this namespace?)")
                })?;
                (id, Origin::LoadedSkb)
            }
        },
    };
    let link: FdLink = prog.take_link(link_id)?.try_into().context(
        "the kernel attached without a BPF link (netlink); vmlb needs bpf_link to pin it",
    )?;
    let link = link
        .pin(layout.link())
        .with_context(|| format!("pinning the link at {}", layout.link().display()))?;
    let maps = BpfMaps::from_ebpf(&mut ebpf)?;
    info!(%iface, pins = %layout.dir().display(), "loaded, attached and pinned");
    let attachment = Attachment {
        _ebpf: Some(ebpf),
        link,
        origin,
        layout,
    };
    Ok((attachment, maps, None))
}

/// The link runs on an older layout's maps: load this version against fresh maps of its own
/// (the old ones' sizes) and plan the migration; the old program keeps serving until the
/// daemon finishes it.
fn prepare_migration(
    spec: &AttachSpec,
    layout: PinLayout,
    from: u32,
) -> anyhow::Result<(Attachment, BpfMaps, Option<Migration>)> {
    let old = layout.with_version(from);
    let migration = Migration::prepare(old, layout.clone(), spec.upgrade_drops_flows)?;
    for dir in [spec.pin_root.as_path(), layout.iface_dir(), layout.dir()] {
        create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    use vmlb_common::map_names as n;
    let sized = |name, default| Some(migration.old_max_entries(name).unwrap_or(default));
    // The old flow capacity: its index's, or (layouts 1 and 2) its FLOWS/FLOWS6 hash's size.
    let capacity = |index, hash, default| {
        let old = migration
            .old_max_entries(index)
            .map(vmlb_common::index::index_capacity);
        Some(old.or(migration.old_max_entries(hash)).unwrap_or(default))
    };
    let mut ebpf = loader::load(Sizes {
        flows: capacity(n::FLOW_INDEX, "FLOWS", spec.flow_entries),
        // IPv6 is new in layout 2: from layout 1, sized by this daemon's flag.
        flows6: capacity(
            vmlb_common::map_names6::FLOW_INDEX6,
            "FLOWS6",
            spec.flow6_entries,
        ),
        flow_slots: migration.old_max_entries(n::FLOW_SLOTS),
        flow6_slots: migration.old_max_entries(vmlb_common::map_names6::FLOW_SLOTS6),
        maglev: sized(n::MAGLEV, spec.maglev_entries),
        services: sized(n::SVC_STATS, spec.max_services),
        backends: sized(n::BACKENDS, spec.max_backends),
        pins: Some(layout.clone()),
    })?;
    let maps = BpfMaps::from_ebpf(&mut ebpf)?;
    info!(
        iface = %spec.iface,
        from,
        to = vmlb_common::LAYOUT_VERSION,
        "the pinned program runs on an older map layout: loaded this version against maps of \
         its own; the old program serves until they hold the configuration"
    );
    let attachment = Attachment {
        _ebpf: Some(ebpf),
        link: open_link(&layout)?,
        origin: Origin::Migrated,
        layout,
    };
    Ok((attachment, maps, Some(migration)))
}

/// Replace the program in the pinned link with `ebpf`'s (BPF_LINK_UPDATE: no packet goes
/// unprocessed).
pub fn swap_into_link(ebpf: &mut Ebpf, layout: &PinLayout) -> anyhow::Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .context("program vmlb missing from the object")?
        .try_into()?;
    let link = XdpLink::try_from(FdLink::from(open_link(layout)?))
        .context("the pinned link is not an XDP link")?;
    let id = prog
        .attach_to_link(link)
        .context("replacing the program in the pinned link")?;
    // The link stays pinned; keep it out of the program's own list so nothing detaches it.
    drop(prog.take_link(id)?);
    Ok(())
}

impl Attachment {
    /// Finish a migration: carry the state over and swap this daemon's program into the link.
    pub fn finish_migration(
        &mut self,
        migration: Migration,
        maps: &mut BpfMaps,
    ) -> anyhow::Result<()> {
        let ebpf = self
            ._ebpf
            .as_mut()
            .context("a migration needs this daemon's own program")?;
        migration.finish(ebpf, maps)
    }
}

fn open_link(layout: &PinLayout) -> anyhow::Result<PinnedLink> {
    PinnedLink::from_pin(layout.link())
        .with_context(|| format!("opening the pinned link {}", layout.link().display()))
}

/// Id of the program the pinned link runs, and its tag when this process may look programs
/// up by id (that takes CAP_SYS_ADMIN).
pub fn pinned_program(link: &Path) -> anyhow::Result<(u32, Option<u64>)> {
    let link = PinnedLink::from_pin(link)
        .with_context(|| format!("opening the pinned link {}", link.display()))?;
    let id = FdLink::from(link).info()?.program_id();
    let tag = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .map(|p| p.tag());
    Ok((id, tag))
}

/// A program is pinned on this interface. If it is this version's code (same kernel tag), adopt
/// it: nothing reloaded, flows keep going. Otherwise load this version against the same pinned
/// maps and swap it into the pinned link in one step (BPF_LINK_UPDATE): no packet goes
/// unprocessed and the conntrack entries stay. If this version cannot use the pinned maps
/// (their layout changed), keep the running program and say so.
fn adopt_or_upgrade(spec: &AttachSpec, layout: PinLayout) -> anyhow::Result<(Attachment, BpfMaps)> {
    let iface = &spec.iface;
    // Without CAP_SYS_ADMIN programs cannot be looked up by id: no tag, so the program is
    // replaced in its link (still invisible to traffic) rather than adopted.
    let (attached_id, attached_tag) = pinned_program(&layout.link())?;

    let adopt = |layout: PinLayout| -> anyhow::Result<(Attachment, BpfMaps)> {
        // Pins of another map layout (an older or newer vmlb) are never written to.
        let maps = BpfMaps::from_pins(&layout).with_context(|| {
            format!(
                "the maps pinned under {} do not fit this vmlb's program although they carry \
                 its layout version ({}): detach the running version first (its daemon with \
                 --detach-on-exit; every flow is lost), then start this one",
                layout.dir().display(),
                vmlb_common::LAYOUT_VERSION
            )
        })?;
        info!(%iface, "adopted the pinned XDP program: nothing reloaded, flows keep going");
        let attachment = Attachment {
            _ebpf: None,
            link: open_link(&layout)?,
            origin: Origin::Adopted,
            layout,
        };
        Ok((attachment, maps))
    };
    let mut ebpf = match loader::load(Sizes {
        pins: Some(layout.clone()),
        ..Default::default()
    }) {
        Ok(ebpf) => ebpf,
        Err(e) => {
            warn!("this version's program cannot use the pinned maps ({e:#}); keeping the running program (restart with --detach-on-exit once to replace it)");
            return adopt(layout);
        }
    };
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .context("program vmlb missing from the object")?
        .try_into()?;
    if Some(prog.info()?.tag()) == attached_tag {
        // Same code: the copy just loaded is dropped (the pinned maps stay).
        return adopt(layout);
    }
    swap_into_link(&mut ebpf, &layout)?;
    let maps = BpfMaps::from_ebpf(&mut ebpf)?;
    info!(%iface, old_program = attached_id, "replaced the pinned program with this version's in place: flows keep going");
    let attachment = Attachment {
        _ebpf: Some(ebpf),
        link: open_link(&layout)?,
        origin: Origin::Upgraded,
        layout,
    };
    Ok((attachment, maps))
}

/// Whatever the maps hold (a previous daemon's services, or nothing) as a reconciler, so
/// applying the same configuration again writes nothing.
pub fn adopt_reconciler(maps: &BpfMaps, ring_entries: u32) -> anyhow::Result<Reconciler> {
    let services: Vec<_> = maps.services.iter().collect::<Result<_, _>>()?;
    let backends: Vec<_> = (0u32..)
        .zip(maps.read_backends()?)
        .filter(|(_, b)| b.addr != 0)
        .collect();
    let ring_entries = ring_entries.max(maps.maglev.len());
    // The id spaces are the maps' own sizes (pinned maps keep the sizes they were made with).
    let limits = (maps.svc_stats.len(), maps.backends.len());
    let dnat: Vec<_> = maps.dnat_endpoints.iter().collect::<Result<_, _>>()?;
    let r = Reconciler::adopt(
        ring_entries,
        limits,
        &services,
        &backends,
        &dnat,
        |base, len| maps.read_ring(base, len),
    )?;
    let services6 = maps.v6.read_services()?;
    let r = r.adopt6(
        &services6,
        &maps.v6.read_backends()?,
        &maps.v6.read_dnat_endpoints()?,
        |base, len| maps.read_ring(base, len),
    )?;
    if !services.is_empty() || !services6.is_empty() {
        info!(
            services = services.len(),
            services6 = services6.len(),
            "adopted the services found in the pinned maps"
        );
    }
    Ok(r)
}

/// The interface's MAC address: the source of every frame vmlb sends to clients.
pub fn iface_mac(iface: &str) -> anyhow::Result<[u8; 6]> {
    let path = format!("/sys/class/net/{iface}/address");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let parts: Vec<&str> = text.trim().split(':').collect();
    anyhow::ensure!(parts.len() == 6, "{path}: not a MAC address: {text:?}");
    let mut mac = [0u8; 6];
    for (o, p) in mac.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).with_context(|| format!("{path}: bad MAC {text:?}"))?;
    }
    Ok(mac)
}

/// The ifindex of `parent`'s 802.1Q sub-interface for `vid`, if the kernel has one: the 8021q
/// module's own table (`/proc/net/vlan/config`, absent without the module). Read as text
/// because it is three columns the kernel has kept stable since 2.4; a netlink link dump
/// would say the same at the cost of an async round trip before attaching.
pub fn vlan_device(parent: &str, vid: u16) -> anyhow::Result<Option<u32>> {
    let text = match std::fs::read_to_string("/proc/net/vlan/config") {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("reading /proc/net/vlan/config"),
    };
    match vlan_device_in(&text, parent, vid) {
        Some(dev) => Ok(Some(
            nix::net::if_::if_nametoindex(dev).with_context(|| format!("no interface {dev}"))?,
        )),
        None => Ok(None),
    }
}

/// The device named in a `/proc/net/vlan/config` table for `parent` and `vid`.
fn vlan_device_in<'a>(table: &'a str, parent: &str, vid: u16) -> Option<&'a str> {
    // "VLAN Dev name | VLAN ID" / "Name-Type: ..." header, then "dev | vid | parent" rows.
    table.lines().find_map(|line| {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        match cols[..] {
            [dev, id, p] if p == parent && id.parse() == Ok(vid) => Some(dev),
            _ => None,
        }
    })
}

#[cfg(test)]
mod vlan_tests {
    use super::vlan_device_in;

    #[test]
    fn finds_the_sub_interface_of_the_parent_and_vid() {
        let table = "VLAN Dev name\t | VLAN ID\nName-Type: VLAN_NAME_TYPE_RAW_PLUS_VID_NO_PAD\n\
                     ens1.1512      | 1512  | ens1\nvlan1513       | 1513  | ens1\n\
                     ens2.1512      | 1512  | ens2\n";
        assert_eq!(vlan_device_in(table, "ens1", 1512), Some("ens1.1512"));
        assert_eq!(vlan_device_in(table, "ens2", 1512), Some("ens2.1512"));
        assert_eq!(vlan_device_in(table, "ens1", 1513), Some("vlan1513"));
        assert_eq!(vlan_device_in(table, "ens1", 7), None);
        assert_eq!(vlan_device_in("", "ens1", 1512), None);
    }
}
