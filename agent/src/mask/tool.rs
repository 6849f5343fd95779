//! `phigate mask`: masks a JSON, NDJSON or FHIR XML (`.xml`) file with a profile and
//! writes the result to stdout, to try a profile on real documents (XML goes through
//! the agent's streaming XML masker); `--engine dom` runs the serde_json
//! parse-mask-serialize peer and `--stats` reports throughput and peak memory (what
//! `cargo xtask bench mask` compares).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};

use super::{BodyKind, BodyMasker, MaskContext, ProfileSet};
use crate::config::AgentSection;
use crate::record::pseudonym::{Pseudonymizer, KEY_FILE};

pub struct Args {
    pub profile: String,
    pub policies_dir: Option<PathBuf>,
    pub config: PathBuf,
    /// `config`'s `[agent]` section, when it loads (the command line reads it).
    pub agent: Option<AgentSection>,
    pub ndjson: bool,
    pub engine: String,
    pub stats: bool,
    pub file: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let policies = match (&a.policies_dir, &a.agent) {
        (Some(d), _) => d.clone(),
        (None, Some(agent)) => agent.policies_dir.clone(),
        (None, None) => bail!(
            "cannot read {}: give --policies-dir (the directory holding profiles/)",
            a.config.display()
        ),
    };
    let set = ProfileSet::load(&policies)?;
    let profile = set.get(&a.profile).cloned().with_context(|| {
        format!(
            "no profile `{}` in {}/profiles (have: {})",
            a.profile,
            policies.display(),
            set.names().collect::<Vec<_>>().join(", ")
        )
    })?;
    // The agent's key when this host has one (pseudonyms then match the records'),
    // else a key for this run only.
    let key_file = a
        .agent
        .as_ref()
        .map(|agent| agent.state_dir.join(KEY_FILE))
        .filter(|p| p.exists());
    let pseudonyms = match key_file {
        Some(f) => {
            crate::record::pseudonym::load_or_create(f.parent().unwrap_or(Path::new(".")), vec![])?
        }
        None => {
            if !a.stats {
                eprintln!("phigate mask: no pseudonym key on this host; pseudonyms use a key for this run only");
            }
            let key: [u8; 32] = crate::record::keyfile::random32()?
                .try_into()
                .map_err(|_| anyhow::anyhow!("key length"))?;
            Pseudonymizer::with_key(key)
        }
    };
    let ctx = Arc::new(MaskContext::new(Arc::new(pseudonyms)));
    let kind = if a.file.extension().is_some_and(|e| e == "xml") {
        BodyKind::Xml
    } else if a.ndjson
        || a.file
            .extension()
            .is_some_and(|e| e == "ndjson" || e == "jsonl")
    {
        BodyKind::Ndjson
    } else {
        BodyKind::Json
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    let t = Instant::now();
    let cpu0 = cpu_seconds();
    let (bytes_in, bytes_out, counts) = match a.engine.as_str() {
        "stream" => {
            let mut f = std::fs::File::open(&a.file)
                .with_context(|| format!("cannot open {}", a.file.display()))?;
            let mut m = BodyMasker::new(profile.clone(), ctx, kind, None)?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut masked = Vec::with_capacity(300 * 1024);
            let (mut n_in, mut n_out) = (0u64, 0u64);
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                n_in += n as u64;
                masked.clear();
                m.push(&buf[..n], &mut masked)
                    .with_context(|| format!("cannot mask {}", a.file.display()))?;
                n_out += masked.len() as u64;
                out.write_all(&masked)?;
            }
            masked.clear();
            m.finish(&mut masked)
                .with_context(|| format!("cannot mask {}", a.file.display()))?;
            n_out += masked.len() as u64;
            out.write_all(&masked)?;
            (n_in, n_out, m.counts().clone())
        }
        "dom" if kind == BodyKind::Xml => bail!(
            "{}: --engine dom has no FHIR XML peer (it is serde_json); use --engine stream",
            a.file.display()
        ),
        "dom" => {
            let body = std::fs::read(&a.file)
                .with_context(|| format!("cannot read {}", a.file.display()))?;
            let (masked, counts) = super::dom::mask_document(&profile, &ctx, kind, &body)?;
            out.write_all(&masked)?;
            (body.len() as u64, masked.len() as u64, counts)
        }
        other => bail!("no engine `{other}`: stream or dom"),
    };
    out.flush()?;
    let secs = t.elapsed().as_secs_f64();
    // CPU time: "per core" throughput, less disturbed by other load on the machine.
    let cpu = cpu_seconds() - cpu0;
    if a.stats {
        let rss = std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        eprintln!(
            "engine={} bytes_in={bytes_in} bytes_out={bytes_out} seconds={secs:.4} cpu_seconds={cpu:.4} mb_per_s={:.1} mb_per_cpu_s={:.1} peak_rss_kib={rss} masked={} profile={} set_hash={}",
            a.engine,
            bytes_in as f64 / 1e6 / secs,
            bytes_in as f64 / 1e6 / cpu,
            counts.total(),
            profile.name,
            set.hash()
        );
    }
    Ok(())
}

/// User + system CPU time of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}
