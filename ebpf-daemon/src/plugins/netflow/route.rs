//! The local address of a UDP socket that was never bound to one (`bind(0.0.0.0:0)`, then
//! `sendto`): the kernel keeps 0.0.0.0 (or ::) for it and picks a source address per datagram by
//! routing. We ask the same routing: a UDP socket created in the flow's network namespace and
//! `connect()`ed to the peer (nothing is sent) has, by `getsockname()`, the source the kernel
//! would use.
//!
//! A socket belongs to the namespace of the thread that created it, so for another namespace a
//! short-lived thread enters it (`setns`) and creates the probe sockets; they are reused from
//! here for every peer of that namespace during one interval.

use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    net::{IpAddr, SocketAddrV4, SocketAddrV6},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    thread,
};

use nix::{
    sched::{CloneFlags, setns},
    sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, connect, getsockname, socket,
    },
};
use tracing::debug;

/// Where `ip netns` keeps its namespaces' bind mounts.
const NETNS_RUN_DIR: &str = "/var/run/netns";

/// Results kept per interval: one per (namespace, peer) of the unbound UDP flows seen.
const MAX_SOURCES: usize = 65_536;
/// Namespaces whose probe sockets are held at once during an interval (two descriptors each).
const MAX_PROBES: usize = 64;
/// Namespace files remembered from a scan.
const MAX_NETNS_FILES: usize = 4096;

/// Any port: a UDP connect() only routes, and needs one.
const PROBE_PORT: u16 = 9;

/// Source addresses by (network namespace, peer), as each namespace's routing picks them.
pub(crate) struct LocalAddresses {
    proc_root: PathBuf,
    /// The daemon's own namespace: entered without a thread.
    own_netns: Option<u32>,
    /// Namespace inode -> a file that refers to it, from the last scan (may have gone stale).
    netns_files: HashMap<u32, PathBuf>,
    /// A scan of /proc is paid at most once per interval.
    scanned: bool,
    sources: HashMap<(u32, IpAddr), Option<IpAddr>>,
    /// None where the namespace could not be entered this interval.
    probes: HashMap<u32, Option<Probes>>,
    /// Lookups that found no address (their rows were left out).
    unresolved: u64,
}

impl LocalAddresses {
    pub(crate) fn new(proc_root: PathBuf) -> Self {
        let own_netns = fs::metadata("/proc/self/ns/net")
            .ok()
            .and_then(|meta| u32::try_from(meta.ino()).ok());
        Self {
            proc_root,
            own_netns,
            netns_files: HashMap::new(),
            scanned: false,
            sources: HashMap::new(),
            probes: HashMap::new(),
            unresolved: 0,
        }
    }

    /// Forgets this interval's results: routes and namespaces change.
    pub(crate) fn new_interval(&mut self) {
        self.sources.clear();
        self.probes.clear();
        self.scanned = false;
    }

    /// Closes the probe sockets: each holds its namespace alive.
    pub(crate) fn release(&mut self) {
        self.probes.clear();
    }

    /// The address namespace `netns` would send from to reach `peer`; `pid` (0 if unknown) is a
    /// process that used the socket, whose namespace file is tried first.
    pub(crate) fn lookup(&mut self, netns: u32, pid: u32, peer: IpAddr) -> Option<IpAddr> {
        if let Some(&source) = self.sources.get(&(netns, peer)) {
            return source;
        }
        let source = match self.resolve(netns, pid, peer) {
            Ok(source) => Some(source),
            Err(why) => {
                self.unresolved += 1;
                debug!(
                    "netflow: no local address for UDP peer {peer} in netns {netns} (pid {pid}): \
                     {why}; its row is left out ({} so far)",
                    self.unresolved
                );
                None
            }
        };
        if self.sources.len() < MAX_SOURCES {
            self.sources.insert((netns, peer), source);
        }
        source
    }

    fn resolve(&mut self, netns: u32, pid: u32, peer: IpAddr) -> Result<IpAddr, String> {
        if !self.probes.contains_key(&netns) {
            if self.probes.len() >= MAX_PROBES {
                self.probes.clear();
            }
            let probes = self.enter(netns, pid);
            if let Err(why) = &probes {
                debug!("netflow: cannot enter netns {netns}: {why}");
            }
            self.probes.insert(netns, probes.ok());
        }
        let Some(probes) = &self.probes[&netns] else {
            return Err("cannot enter the namespace".into());
        };
        let probe = match peer {
            IpAddr::V4(_) => &probes.v4,
            IpAddr::V6(_) => &probes.v6,
        };
        let probe = probe
            .as_ref()
            .map_err(|why| format!("no probe socket: {why}"))?;
        let routed = route_source(probe, peer);
        // A connected UDP socket keeps its first source for later connects: back to unconnected
        // (which also gives back the port connect() bound) before the next peer, or a new one.
        if disconnect(probe).is_err() {
            self.probes.remove(&netns);
        }
        let source = routed.map_err(|err| format!("no route: {err}"))?;
        if source.is_unspecified() {
            return Err("the route gives no source address".into());
        }
        Ok(source)
    }

    /// Probe sockets of namespace `netns`.
    fn enter(&mut self, netns: u32, pid: u32) -> Result<Probes, String> {
        if self.own_netns == Some(netns) {
            return Ok(Probes::new());
        }
        let file = self
            .netns_file(netns, pid)
            .ok_or("no /proc/<pid>/ns/net or netns bind mount found for it")?;
        thread::Builder::new()
            .name("netflow-netns".into())
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|errno| format!("setns: {errno}"))?;
                Ok(Probes::new())
            })
            .map_err(|err| format!("spawning a thread: {err}"))?
            .join()
            .map_err(|_| "the namespace thread panicked".to_string())?
    }

    /// An open file of namespace `netns`: `pid`'s own if it is in it, else one found by a scan
    /// of the netns bind mounts and every process.
    fn netns_file(&mut self, netns: u32, pid: u32) -> Option<File> {
        if pid != 0 {
            let path = self.proc_root.join(pid.to_string()).join("ns/net");
            if let Some(file) = open_netns(&path, netns) {
                return Some(file);
            }
        }
        if let Some(path) = self.netns_files.get(&netns) {
            // A process may have exited, or its pid been reused, since the scan.
            match open_netns(path, netns) {
                Some(file) => return Some(file),
                None => {
                    self.netns_files.remove(&netns);
                }
            }
        }
        if self.scanned {
            return None;
        }
        self.scan(netns);
        open_netns(self.netns_files.get(&netns)?, netns)
    }

    /// Remembers a file of every namespace: the `ip netns` bind mounts first (they outlive
    /// processes), then each process's. `wanted` is kept whatever the bound.
    fn scan(&mut self, wanted: u32) {
        self.scanned = true;
        let bind_mounts = read_dir_paths(Path::new(NETNS_RUN_DIR));
        let processes = read_dir_paths(&self.proc_root)
            .into_iter()
            .filter(|dir| {
                dir.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|dir| dir.join("ns/net"));
        let mut found: HashMap<u32, PathBuf> = HashMap::new();
        for path in bind_mounts.into_iter().chain(processes) {
            let Some(inode) = fs::metadata(&path)
                .ok()
                .and_then(|meta| u32::try_from(meta.ino()).ok())
            else {
                continue;
            };
            if found.len() >= MAX_NETNS_FILES && inode != wanted {
                continue;
            }
            found.entry(inode).or_insert(path);
        }
        debug!(
            "netflow: {} network namespaces found (looking for {wanted})",
            found.len()
        );
        self.netns_files = found;
    }
}

/// `path` opened, if it is namespace `netns`.
fn open_netns(path: &Path, netns: u32) -> Option<File> {
    let file = File::open(path).ok()?;
    (file.metadata().ok()?.ino() == u64::from(netns)).then_some(file)
}

fn read_dir_paths(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default()
}

/// Unbound UDP sockets of one namespace, one per family.
struct Probes {
    v4: io::Result<OwnedFd>,
    v6: io::Result<OwnedFd>,
}

impl Probes {
    /// Sockets of the calling thread's namespace.
    fn new() -> Self {
        let udp = |family| {
            socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
                .map_err(io::Error::from)
        };
        Probes {
            v4: udp(AddressFamily::Inet),
            v6: udp(AddressFamily::Inet6),
        }
    }
}

/// The source address the routing of `probe`'s namespace picks for `peer`.
fn route_source(probe: &OwnedFd, peer: IpAddr) -> io::Result<IpAddr> {
    let fd = probe.as_raw_fd();
    match peer {
        IpAddr::V4(ip) => connect(fd, &SockaddrIn::from(SocketAddrV4::new(ip, PROBE_PORT)))
            .and_then(|()| getsockname::<SockaddrIn>(fd))
            .map(|local| IpAddr::V4(local.ip())),
        IpAddr::V6(ip) => connect(
            fd,
            &SockaddrIn6::from(SocketAddrV6::new(ip, PROBE_PORT, 0, 0)),
        )
        .and_then(|()| getsockname::<SockaddrIn6>(fd))
        .map(|local| IpAddr::V6(local.ip())),
    }
    .map_err(io::Error::from)
}

/// connect(AF_UNSPEC): dissolves a UDP socket's association, local address included.
fn disconnect(socket: &OwnedFd) -> io::Result<()> {
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: the address and its length describe `unspec`, which outlives the call.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, process::Command};

    use super::*;

    fn own_netns() -> u32 {
        u32::try_from(fs::metadata("/proc/self/ns/net").unwrap().ino()).unwrap()
    }

    #[test]
    fn loopback_peer_in_our_namespace() {
        let mut routes = LocalAddresses::new("/proc".into());
        let lo = IpAddr::from(Ipv4Addr::LOCALHOST);
        assert_eq!(routes.lookup(own_netns(), 0, lo), Some(lo));
        // The same again, once the socket was reused (and from the cache).
        assert_eq!(routes.lookup(own_netns(), 0, lo), Some(lo));
        routes.new_interval();
        assert_eq!(routes.lookup(own_netns(), 0, lo), Some(lo));
        assert_eq!(routes.unresolved, 0);
    }

    #[test]
    fn unknown_namespace_is_unresolved() {
        let mut routes = LocalAddresses::new("/proc".into());
        // Namespace inodes are proc inode numbers, far above 1.
        assert_eq!(routes.lookup(1, 0, IpAddr::from([10, 1, 2, 3])), None);
        assert_eq!(routes.unresolved, 1);
    }

    /// `ip netns add`, deleted on drop (also when the test fails).
    struct TestNetns(String);

    impl TestNetns {
        fn ip(&self, args: &[&str]) {
            let out = Command::new("ip")
                .args(["-n", &self.0])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }

    #[test]
    fn peer_in_another_namespace_takes_that_namespaces_route() {
        if !nix::unistd::geteuid().is_root() {
            // As the end-to-end tests do: under CI=true a missing privilege fails the test.
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "this test needs root (`ip netns add`), and CI=true forbids skipping it"
            );
            eprintln!("SKIPPED: needs root for `ip netns add`");
            return;
        }
        let name = format!("dke-route-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns add: {out:?}");
        let ns = TestNetns(name);
        // A veth pair with both ends inside (kernels without CONFIG_DUMMY have no dummy device).
        ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
        ns.ip(&["addr", "add", "10.199.77.1/24", "dev", "d0"]);
        ns.ip(&["addr", "add", "10.199.88.1/24", "dev", "d1"]);
        ns.ip(&["link", "set", "d1", "up"]);
        ns.ip(&["link", "set", "d0", "up"]);
        let inode = fs::metadata(format!("{NETNS_RUN_DIR}/{}", ns.0))
            .unwrap()
            .ino();
        let inode = u32::try_from(inode).unwrap();
        assert_ne!(inode, own_netns());

        let mut routes = LocalAddresses::new("/proc".into());
        // No process is in it: found by the scan of the bind mounts.
        let peer = IpAddr::from([10, 199, 77, 9]);
        assert_eq!(
            routes.lookup(inode, 0, peer),
            Some(IpAddr::from([10, 199, 77, 1]))
        );
        // The probe socket, reused, routes each peer afresh.
        assert_eq!(
            routes.lookup(inode, 0, IpAddr::from([10, 199, 88, 9])),
            Some(IpAddr::from([10, 199, 88, 1]))
        );
        // No route there to anywhere else (our own namespace's routes do not count).
        assert_eq!(
            routes.lookup(inode, 0, IpAddr::from([10, 199, 78, 9])),
            None
        );
        // A pid in another namespace is not taken for this one.
        routes.new_interval();
        assert_eq!(
            routes.lookup(inode, std::process::id(), peer),
            Some(IpAddr::from([10, 199, 77, 1]))
        );
        routes.release();
    }
}
