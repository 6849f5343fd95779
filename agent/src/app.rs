//! Wiring: config -> preflight -> listeners -> eBPF redirect -> data plane, then
//! signals (SIGHUP reload, SIGTERM drain).

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::approval::notify::Notifier;
use crate::approval::Approvals;
use crate::identity::IdentityResolver;
use crate::outbound::Outbound;
use crate::preflight;
use crate::proxy::namespaces::Namespaces;
use crate::proxy::Proxy;
use crate::record::otlp::OtlpTarget;
use crate::record::siem::SiemTarget;
use crate::record::store::{RecordStore, StoreConfig};
use crate::record::{EventRecord, Origin, RecordSink};
use crate::redirect::Redirector;
use crate::settings::Config;
use crate::sockets::SocketFactory;
use crate::state::{build_pipeline, dest_entries, redirect_settings, InForce, Trigger};
use crate::tls::{CertAuthority, LeafMinter, UpstreamTls};

/// Runs the agent until SIGTERM/SIGINT. Returns after open connections drained.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let cgroup = prepare_host(&config)?;
    // Listen before attaching: the redirect must never point at a port we do not hold.
    let mut listeners = vec![bind(config.agent.listen_v4)?];
    if let Some(v6) = config.agent.listen_v6 {
        listeners.push(bind(v6)?);
    }
    let (redirector, sockets) = attach_redirect(&config, cgroup, &listeners)?;

    // Counted by every part that does the work; served on metrics_listen.
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let (store, approvals, pipeline) = open_records(&config, &sockets, &metrics).await?;
    let records: Arc<dyn RecordSink> = store.clone();
    let admin = crate::admin::bind(&config.admin.socket, config.admin.socket_group.as_deref())?;
    info!(socket = %config.admin.socket.display(), "admin socket");
    let ca = Arc::new(load_ca(&config)?);
    let minter = Arc::new(LeafMinter::new(ca, config.tls.leaf_cache_size)?);
    start_console(&config, &approvals, &minter)?;
    let policy_changes = watch_policies(&config.agent.policies_dir);
    let cgroup_root = crate::redirect::cgroup2_root()?;
    let config_path = config.source.clone();
    let drain = config.timeouts.drain;
    let proxy = Arc::new(Proxy::new(
        config,
        pipeline,
        redirector.clone(),
        IdentityResolver::new(cgroup_root),
        records,
        minter,
        sockets,
        metrics.clone(),
    ));
    let namespaces = Arc::new(Namespaces::new(proxy.clone(), redirector.clone())?);
    let agent = Agent {
        proxy,
        redirector,
        namespaces,
        store,
        approvals,
        metrics,
    };

    let credential_changes = watch_credential_files(agent.proxy.clone());
    agent.serve_admin(admin)?;
    let in_force = InForce::new(agent.proxy.clone(), agent.redirector.clone(), config_path);
    let serving = agent.serve(listeners)?;
    // Containers already running are served before "ready"; later ones as they come.
    agent.namespaces.reconcile();
    agent.namespaces.spawn();
    // Redirect attached, destinations loaded, listeners served: protected connects
    // from now on reach this agent.
    info!("ready");
    systemd::ready();
    systemd::spawn_watchdog();

    agent
        .run_until_stopped(&in_force, policy_changes, credential_changes)
        .await?;
    agent.stop(serving, drain).await;
    Ok(())
}

/// The running agent's parts that serving, reloads, status and the stop share.
struct Agent {
    proxy: Arc<Proxy>,
    redirector: Arc<Redirector>,
    /// The other network namespaces served (containers').
    namespaces: Arc<Namespaces>,
    store: Arc<RecordStore>,
    approvals: Arc<Approvals>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// Checks the host (capabilities, open files, the cgroup) and makes the agent's
/// directories; returns the protected cgroup.
fn prepare_host(config: &Config) -> anyhow::Result<std::path::PathBuf> {
    preflight::check_capabilities()?;
    raise_open_files_limit();
    let cgroup = preflight::resolve_cgroup(config.agent.cgroup.as_deref())?;

    make_private_dir(&config.agent.state_dir)?;
    make_private_dir(&config.agent.records_dir)?;
    Ok(cgroup)
}

/// Attaches the redirect to the cgroup, toward `listeners`, for the configured
/// destinations; the agent's own sockets are exempt from it.
fn attach_redirect(
    config: &Config,
    cgroup: std::path::PathBuf,
    listeners: &[TcpListener],
) -> anyhow::Result<(Arc<Redirector>, SocketFactory)> {
    let settings = redirect_settings(config, cgroup.clone());
    let redirector = Arc::new(Redirector::attach(&settings)?);
    // Only these very sockets receive redirected connects; registered before any
    // destination is protected.
    redirector.register_listeners(&listeners[0], listeners.get(1))?;
    redirector.set_destinations(&dest_entries(config))?;
    let sockets = SocketFactory::new(
        config.agent.mark,
        Some(redirector.clone() as Arc<dyn crate::sockets::Exemptions>),
    );
    info!(
        cgroup = %cgroup.display(),
        fail_mode = ?config.agent.fail_mode,
        destinations = config.destinations.len(),
        "redirect attached"
    );
    Ok((redirector, sockets))
}

/// Opens the record store and the approvals, builds the pipeline from the policies
/// and records the agent's start.
async fn open_records(
    config: &Config,
    sockets: &SocketFactory,
    metrics: &Arc<crate::metrics::Metrics>,
) -> anyhow::Result<(Arc<RecordStore>, Arc<Approvals>, crate::pipeline::Pipeline)> {
    let (store, replay) = open_store(config, metrics.clone(), sockets)?;
    let store = Arc::new(store);
    report_start_anchor(config, &store).await?;
    let records: Arc<dyn RecordSink> = store.clone();
    let approvals = Arc::new(
        Approvals::open(
            &config.agent.state_dir,
            records.clone(),
            Notifier {
                client: Some(Outbound {
                    sockets: sockets.clone(),
                    tls: Arc::new(UpstreamTls::new(None, None).context("webhook trust roots")?),
                    timeout: std::time::Duration::from_secs(10),
                }),
                console_url: config.admin.console_url.clone(),
            },
            metrics.clone(),
        )
        .await
        .context("approvals")?,
    );
    // Policies are validated before anything is served: a bad set stops the start.
    let pipeline = build_pipeline(
        config,
        records.clone(),
        approvals.clone(),
        sockets,
        metrics.clone(),
    )?;
    approvals.configure(pipeline.approval_rules.clone());
    let mut start = EventRecord::new(store.origin(), "agent_start", "ok");
    start.config_hash = crate::state::config_hash(&config.source);
    start.policy_set_hash = Some(pipeline.gate.load().policies.hash().to_owned());
    start.message = Some(format!(
        "journal entries replayed: {}; torn journal tails: {}",
        replay.replayed, replay.torn_tails
    ));
    store
        .event(start)
        .await
        .context("cannot record the agent start: records are not writable")?;
    if let Some(every) = config.records.verify_every {
        tokio::spawn(verify_periodically(store.clone(), every));
    }
    crate::approval::spawn_sweeper(&approvals);
    Ok((store, approvals, pipeline))
}

/// Reports what the start found against the off-host anchor (log, `events` row
/// `anchor`; `status` and the metric read it from the store). Records here behind
/// what was shipped stop the start unless `anchor_at_start = "warn"` (fail closed);
/// a store that cannot be read is no rollback: the start goes on.
async fn report_start_anchor(config: &Config, store: &Arc<RecordStore>) -> anyhow::Result<()> {
    use crate::record::config::AnchorAtStart;
    use crate::record::ship::StartAnchor;
    let (Some(sc), Some(found)) = (&config.records.shipping, store.start_anchor()) else {
        return Ok(());
    };
    let summary = found.summary();
    let outcome = match &found {
        StartAnchor::Matches | StartAnchor::NothingShipped => "ok",
        StartAnchor::Unreachable(_) => {
            warn!(error = %summary, "records shipping: the off-host anchor could not be read at start; starting without that check");
            "unchecked"
        }
        StartAnchor::Behind(_) => {
            warn!(problems = %summary, "records: the records here are behind what was shipped off the host (deleted or rolled back)");
            "failed"
        }
    };
    let mut ev = EventRecord::new(store.origin(), "anchor", outcome);
    ev.message = Some(summary.clone());
    let recorded = store.event(ev).await;
    if matches!(found, StartAnchor::Behind(_)) && sc.anchor_at_start == AnchorAtStart::Refuse {
        let s = store.clone();
        let _ = tokio::task::spawn_blocking(move || s.close()).await;
        anyhow::bail!(
            "records in {} are {summary}. Deleted or rolled-back records look like this: restore them from the store (`phigate audit pull`), or set records.shipping.anchor_at_start = \"warn\" in {} to start anyway",
            config.agent.records_dir.display(),
            config.source.display()
        );
    }
    recorded.context("cannot record the anchor check: records are not writable")?;
    Ok(())
}

impl Agent {
    /// The admin socket (and the metrics endpoint, when configured) on their own
    /// tasks.
    fn serve_admin(&self, admin: tokio::net::UnixListener) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let status: crate::admin::StatusSource = {
            let (proxy, redirector, namespaces, store, approvals) = (
                self.proxy.clone(),
                self.redirector.clone(),
                self.namespaces.clone(),
                self.store.clone(),
                self.approvals.clone(),
            );
            Arc::new(move || {
                let mut s = status(&proxy, &redirector, &store, &approvals, started);
                s.namespaces = served_namespaces(&namespaces);
                s
            })
        };
        tokio::spawn(crate::admin::serve(
            admin,
            self.approvals.clone(),
            status.clone(),
        ));
        if let Some(addr) = self.proxy.config().admin.metrics_listen {
            self.metrics
                .set_sampler(Box::new(move |m| sample(m, &status())));
            crate::metrics::serve(addr, self.metrics.clone())?;
        }
        Ok(())
    }

    /// Accepts on every listener, each on its own task.
    fn serve(
        &self,
        listeners: Vec<TcpListener>,
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
        let mut serving = Vec::new();
        for l in listeners {
            info!(addr = %l.local_addr()?, "listening");
            serving.push(tokio::spawn(Arc::clone(&self.proxy).serve(l)));
        }
        Ok(serving)
    }

    /// Reloads on SIGHUP and on policy file changes until SIGTERM or SIGINT.
    async fn run_until_stopped(
        &self,
        in_force: &InForce,
        mut policy_changes: tokio::sync::mpsc::UnboundedReceiver<()>,
        mut credential_changes: tokio::sync::mpsc::UnboundedReceiver<()>,
    ) -> anyhow::Result<()> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                trigger = async {
                    tokio::select! {
                        _ = hup.recv() => Trigger::Signal,
                        Some(()) = policy_changes.recv() => {
                            // Editors write in several steps: let the directory settle.
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            while policy_changes.try_recv().is_ok() {}
                            Trigger::PolicyFiles
                        }
                        Some(()) = credential_changes.recv() => {
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            while credential_changes.try_recv().is_ok() {}
                            Trigger::CredentialFiles
                        }
                    }
                } => {
                    systemd::reloading();
                    let report = in_force.reload(trigger);
                    systemd::ready();
                    report.record(&self.store, &self.metrics).await;
                }
            }
        }
        Ok(())
    }

    /// Stops accepting, drains open connections (closing them after `drain`),
    /// records the stop and closes the store.
    async fn stop(self, serving: Vec<tokio::task::JoinHandle<()>>, drain: std::time::Duration) {
        let proxy = &self.proxy;
        systemd::stopping();
        info!(drain = ?drain, "stopping: no new connections, draining open ones");
        // The listeners leave the redirect before they close. A connect the programs
        // checked against a registered listener that then closed before its SYN
        // arrived was refused by the kernel (ECONNREFUSED) rather than by phigate's
        // decision at the hook; with the entry gone first, new connects get the
        // stopped agent's answer at the hook and those already past it still find a
        // listener that accepts.
        self.redirector
            .forget_netns_listeners(self.redirector.home_netns());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        proxy.stop_accepting.cancel();
        for s in serving {
            let _ = s.await;
        }
        proxy.tasks.close();
        if tokio::time::timeout(drain, proxy.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                open = proxy.tasks.len(),
                "drain bound reached; closing open connections"
            );
            proxy.force_close.cancel();
            // Closing is prompt; the bound only guards against a stuck record write.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), proxy.tasks.wait()).await;
        }
        let stop = EventRecord::new(self.store.origin(), "agent_stop", "ok");
        if let Err(e) = self.store.event(stop).await {
            error!(error = %e, "cannot record the agent stop");
        }
        // Sync the journal and write every buffered row to Parquet.
        let closing = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || closing.close()).await;
        info!("stopped; redirect stays attached (fail_mode decides what protected connects get)");
    }
}

/// The reviewer console, when `[admin]` configures one: its accounts are read and
/// its port bound now (an error stops the start), then it serves on its own task.
fn start_console(
    config: &Config,
    approvals: &Arc<Approvals>,
    minter: &Arc<LeafMinter>,
) -> anyhow::Result<()> {
    let (Some(addr), Some(accounts)) =
        (config.admin.console_listen, &config.admin.console_accounts)
    else {
        return Ok(());
    };
    let accounts = crate::console::accounts::Accounts::load(accounts)?;
    let listener = bind(addr)?;
    let name = match &config.admin.console_name {
        Some(n) => crate::tls::LeafName::Dns(n.clone()),
        None => crate::tls::LeafName::Ip(addr.ip()),
    };
    let origin = config.admin.console_url.clone().unwrap_or_default();
    let console = Arc::new(crate::console::Console::new(
        approvals.clone(),
        accounts,
        origin,
    ));
    let minter = minter.clone();
    tokio::spawn(async move {
        if let Err(e) = console.serve(listener, minter, name).await {
            error!(error = %format!("{e:#}"), "reviewer console stopped");
        }
    });
    Ok(())
}

/// Every proxied connection holds two sockets (client and upstream): the soft limit
/// on open files is raised to the hard one, so a default of 1024 does not cap the
/// agent near 500 clients.
fn raise_open_files_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            let before = r.rlim_cur;
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) == 0 {
                info!(from = before, to = r.rlim_max, "open files limit raised");
            }
        }
    }
}

/// What `phigate status` shows, read from the running parts.
fn served_namespaces(namespaces: &Namespaces) -> Vec<crate::admin::StatusNamespace> {
    namespaces
        .served()
        .into_iter()
        .map(|n| crate::admin::StatusNamespace {
            inode: n.inode,
            netns_cookie: n.cookie,
            pid: n.pid,
            listeners: n.listeners.iter().map(ToString::to_string).collect(),
            container: n.container.map(|(c, f)| crate::admin::StatusContainer {
                id: c.id,
                runtime: c.runtime.to_owned(),
                pod_uid: c.pod_uid,
                pod_namespace: f.pod_namespace,
                pod_name: f.pod_name,
                image: f.image,
            }),
        })
        .collect()
}

fn status(
    proxy: &Proxy,
    redirector: &Redirector,
    store: &RecordStore,
    approvals: &Approvals,
    started: std::time::Instant,
) -> crate::admin::Status {
    let config = proxy.config();
    let gate = proxy.gate();
    let mut listeners = vec![config.agent.listen_v4.to_string()];
    listeners.extend(config.agent.listen_v6.map(|a| a.to_string()));
    crate::admin::Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        uptime_secs: started.elapsed().as_secs(),
        listeners,
        metrics_listen: config.admin.metrics_listen.map(|a| a.to_string()),
        cgroup: redirector.cgroup().display().to_string(),
        bpf_pin_dir: redirector.pin_path().display().to_string(),
        fail_mode: format!("{:?}", config.agent.fail_mode).to_lowercase(),
        ebpf_counters: redirector
            .counters()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        ebpf_maps: redirector
            .map_occupancy()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v as u64))
            .collect(),
        destinations: config
            .destinations
            .iter()
            .map(|d| crate::admin::StatusDestination {
                name: d.name.clone(),
                protocol: d.protocol.as_str().to_owned(),
                addresses: d.addresses.iter().map(ToString::to_string).collect(),
                mask_profile: d.mask_profile.clone(),
            })
            .collect(),
        namespaces: Vec::new(),
        credentials: proxy.pipeline().credentials.states(),
        policy_set_hash: gate.policies.hash().to_owned(),
        policies: gate.policies.len(),
        records: store.progress(),
        records_writable: proxy.records.writable(),
        open_connections: proxy.live.len(),
        approvals_pending: approvals.list().len(),
        counters: proxy.metrics.totals(),
    }
}

/// The scrape-time gauges, from a fresh status.
fn sample(m: &crate::metrics::Metrics, s: &crate::admin::Status) {
    use crate::metrics::{NameLabels, PolicySetLabels, StateLabels};
    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    m.open_connections.set(gauge(s.open_connections as u64));
    m.approvals
        .get_or_create(&StateLabels {
            state: "pending".into(),
        })
        .set(gauge(s.approvals_pending as u64));
    m.journal_entries.set(gauge(s.records.journal_entries));
    m.journal_bytes.set(gauge(s.records.journal_bytes));
    m.parquet_rows.set(gauge(s.records.parquet_rows));
    m.journal_lag.set(gauge(s.records.lag_entries));
    m.journal_held.set(gauge(s.records.held_entries));
    if let Some(sh) = &s.records.shipping {
        m.shipped_files.set(gauge(sh.shipped_files));
        m.unshipped_files.set(gauge(sh.unshipped_files));
        m.ship_failures.set(gauge(sh.failures));
        m.ship_lag.set(gauge(sh.lag_secs));
        m.anchor_behind.set(i64::from(sh.anchor_behind));
    }
    if let Some(si) = &s.records.siem {
        m.siem_sent.set(gauge(si.sent));
        m.siem_buffered.set(gauge(si.buffered));
        m.siem_dropped.set(gauge(si.dropped));
        m.siem_failures.set(gauge(si.failures));
        m.siem_connected.set(i64::from(si.connected));
    }
    if let Some(o) = &s.records.otlp {
        m.otlp_sent.set(gauge(o.sent));
        m.otlp_buffered.set(gauge(o.buffered));
        m.otlp_dropped.set(gauge(o.dropped));
        m.otlp_failures.set(gauge(o.failures));
        m.otlp_rejected.set(gauge(o.rejected));
        m.otlp_up.set(i64::from(o.connected));
    }
    m.records_writable.set(i64::from(s.records_writable));
    for (name, v) in &s.ebpf_maps {
        m.ebpf_map_entries
            .get_or_create(&NameLabels { name: name.clone() })
            .set(gauge(*v));
    }
    for (name, v) in &s.ebpf_counters {
        m.ebpf_counters
            .get_or_create(&NameLabels { name: name.clone() })
            .set(gauge(*v));
    }
    // Only the set in force is reported.
    m.policy_set.clear();
    m.policy_set
        .get_or_create(&PolicySetLabels {
            hash: s.policy_set_hash.clone(),
        })
        .set(1);
    m.policies.set(gauge(s.policies as u64));
}

/// Verifies the records every `every` and records each outcome in `events`, so a
/// tampered file is noticed on the host without waiting for an auditor.
async fn verify_periodically(store: Arc<RecordStore>, every: std::time::Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = store.clone();
        let report = match tokio::task::spawn_blocking(move || s.verify()).await {
            Ok(r) => r,
            Err(_) => return, // shutting down
        };
        let mut ev = EventRecord::new(store.origin(), "verify", "ok");
        match report {
            Ok(r) if r.ok() => {
                let rows: u64 = r.tables.values().map(|t| t.rows).sum();
                let files: usize = r.tables.values().map(|t| t.files).sum();
                info!(files, rows, "records verified");
                ev.message = Some(format!("{files} files, {rows} rows verified"));
            }
            Ok(r) => {
                ev.outcome = "failed";
                for p in &r.problems {
                    error!(problem = %p, "records verification failed");
                }
                let shown: Vec<String> =
                    r.problems.iter().take(20).map(|p| p.to_string()).collect();
                ev.message = Some(format!(
                    "{} problem(s): {}",
                    r.problems.len(),
                    shown.join("; ")
                ));
            }
            Err(e) => {
                ev.outcome = "failed";
                error!(error = %format!("{e:#}"), "records verification could not run");
                ev.message = Some(format!("could not run: {e:#}"));
            }
        }
        if store.event(ev).await.is_err() {
            return; // the store is closed
        }
    }
}

/// Opens the record store for a config: replays the journal, recovers heads.
pub fn open_store(
    config: &Config,
    metrics: Arc<crate::metrics::Metrics>,
    sockets: &SocketFactory,
) -> anyhow::Result<(RecordStore, crate::record::store::Replay)> {
    let r = &config.records;
    let durability = r.durability;
    RecordStore::open(
        StoreConfig {
            records_dir: config.agent.records_dir.clone(),
            state_dir: config.agent.state_dir.clone(),
            durability,
            rotate_rows: r.rotate_rows,
            rotate_bytes: r.rotate_bytes,
            rotate_age: r.rotate_age,
            row_group_rows: r.row_group_rows,
            retention_days: r.retention_days,
            metrics: metrics.clone(),
            shipping: r.shipping.clone(),
            ship_sockets: Some(sockets.clone()),
            siem: r.siem.clone().map(|section| SiemTarget {
                section,
                sockets: sockets.clone(),
            }),
            otlp: r.otlp.clone().map(|section| OtlpTarget {
                section,
                sockets: sockets.clone(),
            }),
        },
        Origin::this_host(),
    )
    .with_context(|| format!("records in {}", config.agent.records_dir.display()))
}

/// The operator's CA when configured, else phigate's own in state_dir (created once).
pub fn load_ca(config: &Config) -> anyhow::Result<CertAuthority> {
    let supplied = config
        .tls
        .ca
        .as_ref()
        .map(|(c, k)| (c.as_path(), k.as_path()));
    Ok(CertAuthority::load_or_create(
        &config.agent.state_dir,
        supplied,
    )?)
}

/// Reports changes in the policy directory (inotify); each triggers a reload. The
/// watcher lives as long as the agent.
fn watch_policies(dir: &Path) -> tokio::sync::mpsc::UnboundedReceiver<()> {
    watch(&[dir.to_owned()], |_| true, "the policy directory")
}

/// The files of every destination's `upstream_auth` (secrets, keys, certificates).
fn credential_files(config: &Config) -> Vec<PathBuf> {
    config
        .destinations
        .iter()
        .filter_map(|d| d.upstream_auth.as_ref())
        .flat_map(|a| a.files())
        .collect()
}

/// Reports changes of the upstream credentials' files in force, each watched through
/// its directory so that a file replaced by a rename is seen too; each triggers a
/// reload. The directories are those at start (a file a reload puts in another
/// directory is watched from the next start; SIGHUP reloads it meanwhile).
fn watch_credential_files(proxy: Arc<Proxy>) -> tokio::sync::mpsc::UnboundedReceiver<()> {
    let mut dirs: Vec<PathBuf> = credential_files(&proxy.config())
        .iter()
        .filter_map(|f| f.parent().map(Path::to_owned))
        .collect();
    dirs.sort();
    dirs.dedup();
    watch(
        &dirs,
        move |changed| {
            let files = credential_files(&proxy.config());
            changed.iter().any(|p| files.contains(p))
        },
        "the upstream credential files",
    )
}

/// One message per change `relevant` accepts in `dirs`; the watcher lives as long as
/// the agent.
fn watch(
    dirs: &[PathBuf],
    relevant: impl Fn(&[PathBuf]) -> bool + Send + 'static,
    what: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<()> {
    use notify::Watcher as _;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    if dirs.is_empty() {
        return rx;
    }
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok_and(|e| !e.kind.is_access() && relevant(&e.paths)) {
            let _ = tx.send(());
        }
    });
    let mut w = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch {what}; reload with SIGHUP");
            return rx;
        }
    };
    for dir in dirs {
        if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
            warn!(dir = %dir.display(), error = %e, "cannot watch {what}; reload with SIGHUP");
        }
    }
    // Kept for the life of the process; dropping it stops the watch.
    std::mem::forget(w);
    rx
}

fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = crate::sockets::listen_in(None, addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("cannot listen on {addr}: address already in use; another phigate or another service holds it (see `ss -ltnp 'sport = :{}'`); stop it or change [agent] listen", addr.port())
        } else if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            anyhow::anyhow!("cannot listen on {addr}: address not available on this host (is the loopback interface up, and IPv6 enabled for [::1]?)")
        } else {
            anyhow::anyhow!("cannot listen on {addr}: {e}")
        }
    })?;
    Ok(TcpListener::from_std(socket)?)
}

fn make_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))
}

/// sd_notify(3) for `Type=notify`: readiness once protected connects reach the agent,
/// reload and stop phases, and the watchdog. Outside systemd these do nothing.
mod systemd {
    use sd_notify::NotifyState;

    pub fn ready() {
        let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    }

    pub fn reloading() {
        // systemd 253+ wants the monotonic time with RELOADING=1.
        let mut states = vec![NotifyState::Reloading];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        let _ = sd_notify::notify(false, &states);
    }

    pub fn stopping() {
        let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    }

    /// Pings at half the unit's WatchdogSec from the runtime: a wedged runtime stops
    /// the pings and systemd restarts the agent.
    pub fn spawn_watchdog() {
        let mut usec = 0u64;
        if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
            return;
        }
        let every = std::time::Duration::from_micros(usec / 2);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
            }
        });
    }
}
