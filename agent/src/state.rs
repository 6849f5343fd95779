//! What is in force: the config, the one policy cell every pipeline shares, and the
//! connections open under them. A reload replaces all of it or nothing, decides the
//! open connections again, and says what it did ([`ReloadReport`]), which is
//! recorded as `config_reload`, `policy_reload` and `connection_revoked` events.
//! Also what a config makes: the pipeline, its masking, the redirect's settings.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tracing::{error, info, warn};

use crate::approval::{Approvals, RuleSet};
use crate::config::FailMode;
use crate::http::forward::Forwarder;
use crate::pipeline::Pipeline;
use crate::proxy::live::RevokedConnection;
use crate::proxy::Proxy;
use crate::record::pseudonym::Pseudonymizer;
use crate::record::store::RecordStore;
use crate::record::{EventRecord, RecordSink};
use crate::redirect::{DestEntry, RedirectSettings, Redirector};
use crate::settings::Config;
use crate::sockets::SocketFactory;
use crate::tls::UpstreamTls;

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP (`systemctl reload`).
    Signal,
    /// A file of the policy directory changed.
    PolicyFiles,
    /// A secret, key or client certificate of an `upstream_auth` changed.
    CredentialFiles,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::PolicyFiles => "policy_files_changed",
            Trigger::CredentialFiles => "credential_files_changed",
        }
    }
}

/// What a reload did.
#[derive(Debug)]
pub struct ReloadReport {
    pub trigger: Trigger,
    /// The rejection (file, line, key), or the connections the new set closed.
    pub result: Result<Vec<RevokedConnection>, String>,
    /// The policy set in force after it (the running one when rejected is still
    /// in force; the rejected files' hash is recorded then).
    pub policy_set_hash: Option<String>,
    pub policies_dir: PathBuf,
    pub config_hash: Option<String>,
}

/// The config and policies in force, and what replaces them.
pub struct InForce {
    proxy: Arc<Proxy>,
    redirector: Arc<Redirector>,
    config_path: PathBuf,
}

impl InForce {
    pub fn new(proxy: Arc<Proxy>, redirector: Arc<Redirector>, config_path: PathBuf) -> InForce {
        InForce {
            proxy,
            redirector,
            config_path,
        }
    }

    /// Reloads the config file and the policy directory.
    pub fn reload(&self, trigger: Trigger) -> ReloadReport {
        let result = self.apply();
        let policies_dir = self.proxy.config().agent.policies_dir.clone();
        let policy_set_hash = match &result {
            Ok(_) => Some(self.proxy.gate().policies.hash().to_owned()),
            Err(_) => crate::policy::hash_dir(&policies_dir),
        };
        ReloadReport {
            trigger,
            result,
            policy_set_hash,
            policies_dir,
            config_hash: config_hash(&self.config_path),
        }
    }

    /// The whole file set is validated first; a bad one changes nothing. The error
    /// (file, line, key), or the open connections the new policy set closed.
    fn apply(&self) -> Result<Vec<RevokedConnection>, String> {
        let (proxy, redirector) = (&*self.proxy, &*self.redirector);
        let new = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "config reload rejected; the running config stays");
                return Err(e.to_string());
            }
        };
        let old = proxy.config();
        // fail_mode applies live (an eBPF setting); listeners, directories, the socket
        // mark, cgroup and CA need a restart.
        let mut next = new;
        let mut kept = old.agent.clone();
        kept.fail_mode = next.agent.fail_mode;
        let mut records = next.records.clone();
        records.patient_path_segments = old.records.patient_path_segments.clone();
        records.patient_query_params = old.records.patient_query_params.clone();
        records.headers = old.records.headers.clone();
        if next.agent != kept || next.tls != old.tls || records != old.records {
            warn!("[agent] listeners, directories, cgroup, [tls] or how [records] are written changed: they take effect at the next restart");
        }
        next.agent = kept;
        next.tls = old.tls.clone();
        records.patient_path_segments = next.records.patient_path_segments.clone();
        records.patient_query_params = next.records.patient_query_params.clone();
        records.headers = next.records.headers.clone();
        next.records = records;
        let approvals = proxy.pipeline().approvals.clone();
        let mut pipeline = match build_pipeline(
            &next,
            proxy.records.clone(),
            approvals,
            &proxy.sockets,
            proxy.metrics.clone(),
        ) {
            Ok(p) => p,
            Err(e) => {
                error!(
                    error = format!("{e:#}"),
                    "config reload rejected; the running config stays"
                );
                return Err(format!("{e:#}"));
            }
        };
        if next.agent != old.agent {
            let settings = redirect_settings(&next, redirector.cgroup().to_owned());
            if let Err(e) = redirector.update_settings(&settings) {
                error!(error = %e, "updating the redirect settings failed; the running config stays");
                return Err(format!("redirect settings: {e:#}"));
            }
        }
        if let Err(e) = redirector.set_destinations(&dest_entries(&next)) {
            error!(error = %e, "updating the redirect maps failed; the running config stays");
            return Err(format!("redirect maps: {e:#}"));
        }
        info!(destinations = next.destinations.len(), fail_mode = ?next.agent.fail_mode, "config reloaded");
        // Requests on connections opened before the reload are decided by the new set too.
        pipeline.take_over_gate(&proxy.pipeline());
        info!(policies = pipeline.gate.load().policies.len(), set = %pipeline.gate.load().policies.hash(), "policy set in force");
        pipeline
            .approvals
            .configure(pipeline.approval_rules.clone());
        proxy.replace(next, pipeline);
        // Revocation takes effect at once: open connections are decided again.
        let gate = proxy.gate();
        let revoked = proxy.live.revoke_disallowed(&gate);
        if !revoked.is_empty() {
            info!(
                revoked = revoked.len(),
                open = proxy.live.len(),
                "open connections re-checked"
            );
        }
        Ok(revoked)
    }
}

impl ReloadReport {
    /// Counts it and records it: one `config_reload` and one `policy_reload` event
    /// (one file set holds both), a `connection_revoked` event per closed connection.
    pub async fn record(&self, store: &RecordStore, metrics: &crate::metrics::Metrics) {
        let (outcome, message, revoked): (&str, Option<&String>, &[RevokedConnection]) =
            match &self.result {
                Ok(revoked) => ("ok", None, revoked),
                Err(e) => ("rejected", Some(e), &[]),
            };
        let trigger = self.trigger.as_str();
        metrics.reload("config", outcome);
        metrics.reload("policy", outcome);
        metrics.revoked.inc_by(revoked.len() as u64);
        let mut ev = EventRecord::new(store.origin(), "config_reload", outcome);
        ev.config_hash = self.config_hash.clone();
        ev.message = message.map(|m| format!("{trigger}: {m}"));
        if let Err(e) = store.event(ev).await {
            error!(error = %e, "cannot record the config reload");
        }
        let mut ev = EventRecord::new(store.origin(), "policy_reload", outcome);
        ev.config_hash = self.config_hash.clone();
        ev.policy_set_hash = self.policy_set_hash.clone();
        ev.message = Some(match message {
            None => format!(
                "{trigger}: policy set of {} in force; open connections revoked: {}",
                self.policies_dir.display(),
                revoked.len()
            ),
            Some(m) => format!("{trigger}: {m}"),
        });
        if let Err(e) = store.event(ev).await {
            error!(error = %e, "cannot record the policy reload");
        }
        for r in revoked {
            let mut ev = EventRecord::new(store.origin(), "connection_revoked", "ok");
            ev.policy_set_hash = Some(r.why.policy_set_hash.clone());
            ev.message = Some(format!(
                "connection {} to {} (pid {}, uid {}) closed: {} on a {} request",
                r.connection_id, r.destination, r.pid, r.uid, r.why, r.why.method
            ));
            if let Err(e) = store.event(ev).await {
                error!(error = %e, "cannot record a revoked connection");
            }
        }
    }
}

/// The HTTP pipeline for a config: upstream trust per destination (system roots plus
/// its `upstream_ca`, its client certificate), the upstream credentials, pools,
/// limits.
pub fn build_pipeline(
    config: &Config,
    records: Arc<dyn RecordSink>,
    approvals: Arc<Approvals>,
    sockets: &SocketFactory,
    metrics: Arc<crate::metrics::Metrics>,
) -> anyhow::Result<Pipeline> {
    let approval_rules = RuleSet::load(&config.agent.policies_dir)?;
    let tls = config
        .destinations
        .iter()
        .map(|d| {
            let client_cert = d
                .upstream_auth
                .as_ref()
                .and_then(|a| a.client_cert.as_ref());
            UpstreamTls::new(d.upstream_ca.as_deref(), client_cert)
                .map(Arc::new)
                .with_context(|| format!("destination `{}`: upstream TLS", d.name))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pseudonyms = crate::record::pseudonym::load_or_create(
        &config.agent.state_dir,
        config.records.patient_path_segments.clone(),
    )?
    .with_query_params(config.records.patient_query_params.clone());
    let pseudonyms = Arc::new(pseudonyms);
    let masking = build_masking(config, pseudonyms.clone())?;
    let gate = crate::policy::gate::Gatekeeper::from_config(
        &config.agent.policies_dir,
        &config.policy,
        &config.oidc,
        sockets,
    )?;
    check_obligations(&gate.policies, &masking.set, &approval_rules)?;
    let credentials = crate::credential::Credentials::load(&config.destinations, sockets)
        .context("upstream credentials")?;
    Ok(Pipeline {
        credentials: Arc::new(credentials),
        masking: Arc::new(masking),
        pseudonyms,
        forwarder: Forwarder::new(
            tls,
            sockets.clone(),
            config.timeouts.connect,
            config.timeouts.tls_handshake,
            metrics.clone(),
        ),
        metrics,
        records,
        approvals,
        approval_rules: Arc::new(approval_rules),
        record_headers: config.records.headers.clone(),
        limits: config.limits.clone(),
        request_timeout: config.timeouts.request,
        gate: Arc::new(ArcSwap::from_pointee(gate)),
    })
}

/// Every `@mask` names a profile and every `@approval` a rule that exists: a policy
/// set pointing at nothing is rejected with the policy's file and line, rather than
/// failing requests later.
fn check_obligations(
    policies: &crate::policy::PolicySet,
    profiles: &crate::mask::ProfileSet,
    rules: &RuleSet,
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for (id, mask, approval) in policies.obligations() {
        let at = policies
            .sources()
            .get(id)
            .map(|s| format!("{}:{}", s.file.display(), s.line))
            .unwrap_or_else(|| id.to_owned());
        if let Some(m) = mask.filter(|m| profiles.get(m).is_none()) {
            problems.push(format!(
                "{at}: policy `{id}`: @mask(\"{m}\") names no profile in profiles/ (have: {})",
                profiles.names().collect::<Vec<_>>().join(", ")
            ));
        }
        if let Some(a) = approval.filter(|a| rules.get(a).is_none()) {
            problems.push(format!(
                "{at}: policy `{id}`: @approval(\"{a}\") names no rule in {} (have: {})",
                crate::approval::rules::RULES_FILE,
                rules.rules.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    problems.sort();
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", problems.join("\n"))
    }
}

/// The masking profiles of `policies_dir` (re-read on every reload; a bad profile
/// rejects the reload) and each destination's `mask_profile`, which must exist.
/// Pseudonyms in bodies use the records' key, so they join with `patient_refs`.
pub fn build_masking(
    config: &Config,
    pseudonyms: Arc<Pseudonymizer>,
) -> anyhow::Result<crate::pipeline::Masking> {
    let set = crate::mask::ProfileSet::load(&config.agent.policies_dir)?;
    let mut by_destination = Vec::with_capacity(config.destinations.len());
    for (i, d) in config.destinations.iter().enumerate() {
        by_destination.push(match &d.mask_profile {
            None => None,
            Some(name) => Some(set.get(name).cloned().ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: destinations[{i}].mask_profile: no profile `{name}` in {}/profiles (have: {})",
                    config.source.display(),
                    config.agent.policies_dir.display(),
                    set.names().collect::<Vec<_>>().join(", ")
                )
            })?),
        });
    }
    if by_destination.iter().any(Option::is_some) {
        info!(
            profiles = set.names().count(),
            set_hash = set.hash(),
            "masking profiles loaded"
        );
    }
    let seal_by_destination = config
        .destinations
        .iter()
        .map(|d| d.seal_originals_to.clone())
        .collect();
    Ok(crate::pipeline::Masking {
        seal_by_destination,
        ctx: Arc::new(crate::mask::MaskContext::new(pseudonyms)),
        settings: config.masking.clone(),
        by_destination,
        set,
    })
}

pub fn redirect_settings(config: &Config, cgroup: PathBuf) -> RedirectSettings {
    let v4 = match config.agent.listen_v4 {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!("config validation keeps listen_v4 IPv4"),
    };
    let v6 = match config.agent.listen_v6 {
        Some(SocketAddr::V6(a)) => Some(a),
        _ => None,
    };
    RedirectSettings {
        cgroup,
        pin_dir: config.agent.bpf_pin_dir.clone(),
        listen_v4: v4,
        listen_v6: v6,
        fail_open: config.agent.fail_mode == FailMode::Open,
    }
}

pub fn dest_entries(config: &Config) -> Vec<DestEntry> {
    config
        .destinations
        .iter()
        .enumerate()
        .flat_map(|(i, d)| {
            d.addresses.iter().map(move |a| DestEntry {
                dest_id: i as u32,
                net: a.net,
                port: a.port,
            })
        })
        .collect()
}

/// SHA-256 of the config file as read now, for the events table.
pub fn config_hash(path: &std::path::Path) -> Option<String> {
    use sha2::Digest;
    std::fs::read(path)
        .ok()
        .map(|b| hex::encode(sha2::Sha256::digest(b)))
}
