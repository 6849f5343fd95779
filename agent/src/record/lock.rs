//! Shipped objects under S3 Object Lock in compliance mode: each PUT carries
//! `x-amz-object-lock-mode: COMPLIANCE`, a retain-until date `object_lock_days` from
//! now and the `Content-MD5` S3 requires with them. object_store cannot send
//! per-object headers, so these PUTs are signed here (SigV4, by rusty-s3, every
//! header in the signature) with object_store's own credentials (files, environment
//! or the instance's) and sent by phigate's own client ([`crate::outbound`]: TLS
//! verified against the system roots; plain http only to loopback, as the config
//! enforces). A store that refuses the headers fails the upload: an object is never
//! shipped without the lock that was asked for.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use base64::Engine as _;
use md5::Digest as _;
use object_store::aws::AwsCredentialProvider;
use rusty_s3::S3Action as _;

use super::config::{ShippingSection, Sse};
use crate::outbound::Outbound;
use crate::sockets::SocketFactory;
use crate::tls::UpstreamTls;

/// How long a signed request stays valid: it is sent at once.
const SIGNED_FOR: Duration = Duration::from_secs(300);
/// How much of a refusal is kept to report (S3's XML error names the reason).
const ERROR_LIMIT: usize = 8 << 10;
const TIMEOUT: Duration = Duration::from_secs(20);

/// PUTs with compliance-mode retention (and the configured encryption).
pub(crate) struct LockedPut {
    bucket: rusty_s3::Bucket,
    credentials: AwsCredentialProvider,
    client: Outbound,
    days: u32,
    sse: Option<Sse>,
}

impl LockedPut {
    /// None unless `object_lock_days` is set.
    pub(crate) fn new(
        cfg: &ShippingSection,
        credentials: AwsCredentialProvider,
        sockets: SocketFactory,
    ) -> anyhow::Result<Option<LockedPut>> {
        let Some(days) = cfg.object_lock_days else {
            return Ok(None);
        };
        let endpoint: url::Url = cfg
            .endpoint
            .parse()
            .with_context(|| format!("records.shipping.endpoint {}", cfg.endpoint))?;
        let bucket = rusty_s3::Bucket::new(
            endpoint,
            rusty_s3::UrlStyle::Path,
            cfg.bucket.clone(),
            cfg.region.clone(),
        )
        .with_context(|| format!("records.shipping: bucket {}", cfg.bucket))?;
        Ok(Some(LockedPut {
            bucket,
            credentials,
            client: Outbound {
                sockets,
                tls: Arc::new(UpstreamTls::new(None, None).context("object store trust roots")?),
                timeout: TIMEOUT,
            },
            days,
            sse: cfg.sse.clone(),
        }))
    }

    pub(crate) async fn put(&self, key: &str, body: Vec<u8>) -> anyhow::Result<()> {
        let cred = self
            .credentials
            .get_credential()
            .await
            .context("object store credentials")?;
        let creds = match &cred.token {
            Some(t) => rusty_s3::Credentials::new_with_token(
                cred.key_id.clone(),
                cred.secret_key.clone(),
                t.clone(),
            ),
            None => rusty_s3::Credentials::new(cred.key_id.clone(), cred.secret_key.clone()),
        };
        let headers = lock_headers(&body, SystemTime::now(), self.days, self.sse.as_ref());
        let mut action = self.bucket.put_object(Some(&creds), key);
        for (name, value) in &headers {
            action.headers_mut().insert(name.as_str(), value.as_str());
        }
        let url = action.sign(SIGNED_FOR);
        let (status, answer) = self
            .client
            .put(url.as_str(), &headers, body, ERROR_LIMIT)
            .await
            .map_err(anyhow::Error::msg)?;
        if status != 200 {
            anyhow::bail!(
                "the store refused an Object Lock upload: HTTP {status}{}",
                s3_error(&answer)
            );
        }
        Ok(())
    }
}

/// The headers of one locked PUT, names lower case (as SigV4 signs them).
fn lock_headers(
    body: &[u8],
    now: SystemTime,
    days: u32,
    sse: Option<&Sse>,
) -> Vec<(String, String)> {
    let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body));
    let mut h = vec![
        ("content-md5".to_owned(), md5),
        ("x-amz-object-lock-mode".to_owned(), "COMPLIANCE".to_owned()),
        (
            "x-amz-object-lock-retain-until-date".to_owned(),
            retain_until(now, days),
        ),
    ];
    if let Some(sse) = sse {
        h.push((
            "x-amz-server-side-encryption".to_owned(),
            sse.header().to_owned(),
        ));
        if let Sse::Kms { key_id: Some(k) } = sse {
            h.push((
                "x-amz-server-side-encryption-aws-kms-key-id".to_owned(),
                k.clone(),
            ));
        }
    }
    h
}

/// `now` plus `days`, RFC 3339 in UTC to the second.
fn retain_until(now: SystemTime, days: u32) -> String {
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        + u64::from(days) * 86_400;
    jiff::Timestamp::from_second(secs as i64)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// `: Code: Message` from an S3 XML error, so a report says why.
fn s3_error(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find('<')? + start;
        Some(text[start..end].chars().take(200).collect::<String>())
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!(": {c}: {m}"),
        (Some(c), None) => format!(": {c}"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_put_carries_compliance_mode_the_date_and_the_body_digest() {
        // 2026-01-01T00:00:00Z
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let h = lock_headers(b"hello", now, 3, Some(&Sse::Aes256));
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("x-amz-object-lock-mode"), Some("COMPLIANCE"));
        assert_eq!(
            get("x-amz-object-lock-retain-until-date"),
            Some("2026-01-04T00:00:00Z")
        );
        // md5("hello"), base64: RFC 1864.
        assert_eq!(get("content-md5"), Some("XUFAKrxLKna5cZ2REBfFkg=="));
        assert_eq!(get("x-amz-server-side-encryption"), Some("AES256"));
        let h = lock_headers(
            b"",
            now,
            1,
            Some(&Sse::Kms {
                key_id: Some("k1".into()),
            }),
        );
        assert!(h.contains(&(
            "x-amz-server-side-encryption-aws-kms-key-id".into(),
            "k1".into()
        )));
        assert!(lock_headers(b"", now, 1, None)
            .iter()
            .all(|(k, _)| !k.starts_with("x-amz-server-side")));
    }

    #[test]
    fn a_refusal_is_reported_with_the_stores_reason() {
        let xml = b"<?xml version=\"1.0\"?><Error><Code>InvalidRequest</Code><Message>Bucket is missing ObjectLockConfiguration</Message></Error>";
        assert_eq!(
            s3_error(xml),
            ": InvalidRequest: Bucket is missing ObjectLockConfiguration"
        );
        assert_eq!(s3_error(b""), "");
    }
}
