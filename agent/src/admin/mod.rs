//! The admin socket: a local Unix socket, apart from the data plane, where reviewers
//! list and decide approvals with `phigate approvals`. Who is calling is what the
//! kernel says (SO_PEERCRED): the caller's login name and groups are the reviewer's
//! identity, so no password or token crosses this socket.
//!
//! Protocol: one JSON request line, one JSON response line, per connection.
#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::approval::{Approval, Approvals, Reviewer, Verdict};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    List,
    Show {
        id: String,
    },
    Approve {
        id: String,
        reason: String,
    },
    Deny {
        id: String,
        reason: String,
    },
    /// The agent's state (`phigate status`); no PHI, so anyone who may open the
    /// socket may read it.
    Status,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<Approval>,
    /// Who the agent took the caller to be.
    #[serde(default)]
    pub reviewer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<Status>>,
}

/// What `phigate status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub listeners: Vec<String>,
    pub metrics_listen: Option<String>,
    /// The cgroup whose descendants are redirected, and where the programs are pinned.
    pub cgroup: String,
    pub bpf_pin_dir: String,
    pub fail_mode: String,
    /// The redirect programs' counters and eBPF map occupancy.
    pub ebpf_counters: std::collections::BTreeMap<String, u64>,
    pub ebpf_maps: std::collections::BTreeMap<String, u64>,
    pub destinations: Vec<StatusDestination>,
    /// Network namespaces served besides the agent's own (containers).
    #[serde(default)]
    pub namespaces: Vec<StatusNamespace>,
    /// Each destination's upstream credential: kind, validity, refreshes, failures;
    /// never the secret.
    #[serde(default)]
    pub credentials: Vec<crate::credential::CredentialState>,
    pub policy_set_hash: String,
    pub policies: usize,
    pub records: crate::record::store::Progress,
    pub records_writable: bool,
    pub open_connections: usize,
    pub approvals_pending: usize,
    /// Connections by outcome and requests by decision/outcome since start.
    pub counters: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusDestination {
    pub name: String,
    pub protocol: String,
    pub addresses: Vec<String>,
    pub mask_profile: Option<String>,
}

/// A network namespace the agent holds listeners in (a container's).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusNamespace {
    /// Inode of /proc/PID/ns/net (what `lsns` and `ip netns identify` show).
    pub inode: u64,
    pub netns_cookie: u64,
    /// A protected process found in it.
    pub pid: u32,
    pub listeners: Vec<String>,
    /// The container that process runs in, when it runs in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<StatusContainer>,
}

/// A served namespace's container: from its cgroup path and its runtime's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusContainer {
    pub id: String,
    pub runtime: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// Builds the current status on request (the agent wires it to its parts).
pub type StatusSource = Arc<dyn Fn() -> Status + Send + Sync>;

/// Binds the socket (replacing a stale one), with the configured group and mode.
pub fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on the admin socket {}", path.display()))?;
    let mode = match group {
        Some(g) => {
            let gid = nix::unistd::Group::from_name(g)?
                .with_context(|| {
                    format!("[admin] socket_group: no group named `{g}` on this host")
                })?
                .gid;
            nix::unistd::chown(path, None, Some(gid))?;
            0o660
        }
        None => 0o666,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Serves the socket until the task is dropped.
pub async fn serve(listener: UnixListener, approvals: Arc<Approvals>, status: StatusSource) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let approvals = approvals.clone();
        let status = status.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, approvals, status).await {
                warn!(error = %format!("{e:#}"), "admin request failed");
            }
        });
    }
}

async fn handle(
    stream: UnixStream,
    approvals: Arc<Approvals>,
    status: StatusSource,
) -> anyhow::Result<()> {
    let cred = stream.peer_cred()?;
    let reviewer = reviewer_of(cred.uid(), cred.gid());
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(64 * 1024);
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await??;
    let resp = match serde_json::from_str::<AdminRequest>(&line) {
        Err(e) => refuse(&reviewer, format!("bad request: {e}")),
        Ok(AdminRequest::Status) => AdminResponse {
            ok: true,
            error: None,
            approvals: Vec::new(),
            reviewer: reviewer.name.clone(),
            status: Some(Box::new(
                tokio::task::spawn_blocking(move || status()).await?,
            )),
        },
        Ok(req) => answer(req, &reviewer, &approvals).await,
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

fn refuse(reviewer: &Reviewer, error: String) -> AdminResponse {
    AdminResponse {
        ok: false,
        error: Some(error),
        approvals: Vec::new(),
        reviewer: reviewer.name.clone(),
        status: None,
    }
}

async fn answer(req: AdminRequest, reviewer: &Reviewer, approvals: &Approvals) -> AdminResponse {
    // Reading the queue needs the same standing as deciding: a reviewer group of some
    // open approval (root may always look).
    let may_see = |a: &Approval| {
        reviewer.name == "root" || a.reviewers.iter().any(|g| reviewer.groups.contains(g))
    };
    let ok = |approvals: Vec<Approval>| AdminResponse {
        ok: true,
        error: None,
        approvals,
        reviewer: reviewer.name.clone(),
        status: None,
    };
    match req {
        AdminRequest::List => ok(approvals.list().into_iter().filter(may_see).collect()),
        AdminRequest::Show { id } => match approvals.get(&id) {
            Some(a) if may_see(&a) => ok(vec![a]),
            _ => refuse(reviewer, format!("no approval {id} that you may review")),
        },
        AdminRequest::Approve { id, reason } => {
            decide(approvals, reviewer, &id, Verdict::Approve, &reason).await
        }
        AdminRequest::Deny { id, reason } => {
            decide(approvals, reviewer, &id, Verdict::Deny, &reason).await
        }
        AdminRequest::Status => refuse(reviewer, "status is answered before".into()),
    }
}

async fn decide(
    approvals: &Approvals,
    reviewer: &Reviewer,
    id: &str,
    verdict: Verdict,
    reason: &str,
) -> AdminResponse {
    match approvals.decide(id, reviewer, verdict, reason).await {
        Ok(a) => {
            info!(approval = %id, reviewer = %reviewer.name, ?verdict, "decided over the admin socket");
            AdminResponse {
                ok: true,
                error: None,
                approvals: vec![a],
                reviewer: reviewer.name.clone(),
                status: None,
            }
        }
        Err(e) => refuse(reviewer, e.to_string()),
    }
}

/// The caller's login name and group names, from the host's user database.
fn reviewer_of(uid: u32, gid: u32) -> Reviewer {
    use nix::unistd::{getgrouplist, Gid, Group, Uid, User};
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    let name = user
        .as_ref()
        .map(|u| u.name.clone())
        .unwrap_or_else(|| format!("uid:{uid}"));
    let mut groups = Vec::new();
    let gids = match &user {
        Some(u) => std::ffi::CString::new(u.name.clone())
            .ok()
            .and_then(|c| getgrouplist(&c, Gid::from_raw(gid)).ok())
            .unwrap_or_else(|| vec![Gid::from_raw(gid)]),
        None => vec![Gid::from_raw(gid)],
    };
    for g in gids {
        if let Ok(Some(group)) = Group::from_gid(g) {
            if !groups.contains(&group.name) {
                groups.push(group.name);
            }
        }
    }
    Reviewer {
        name,
        groups,
        via: crate::approval::Via::Cli,
    }
}

/// The CLI side: sends one request, returns the response.
pub fn call(socket: &PathBuf, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the agent's admin socket {} (is phigate running, and may you open the socket?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut resp = String::new();
    std::io::BufReader::new(s).read_line(&mut resp)?;
    serde_json::from_str(&resp).context("the agent's answer is not JSON")
}
