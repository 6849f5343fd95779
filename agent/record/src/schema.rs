//! The four tables and their typed columns, as auditors see them in DuckDB.
//!
//! The column list is a contract: adding a column is fine (older files read as null),
//! renaming or retyping one breaks saved queries. `schema_is_stable` pins it.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use serde::Serialize;

/// Version of the column contract, written into every manifest.
pub const SCHEMA_VERSION: u32 = 1;

/// The chain columns the writer appends to every row.
pub const CHAIN_SEQ: &str = "chain_seq";
pub const CHAIN_HASH: &str = "chain_hash";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    Requests,
    Connections,
    Approvals,
    Events,
}

impl Table {
    pub const ALL: [Table; 4] = [
        Table::Requests,
        Table::Connections,
        Table::Approvals,
        Table::Events,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Requests => "requests",
            Table::Connections => "connections",
            Table::Approvals => "approvals",
            Table::Events => "events",
        }
    }

    pub fn from_name(s: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == s)
    }

    /// The journal's one-byte tag.
    pub fn tag(self) -> u8 {
        match self {
            Table::Requests => 1,
            Table::Connections => 2,
            Table::Approvals => 3,
            Table::Events => 4,
        }
    }

    pub fn from_tag(t: u8) -> Option<Table> {
        Table::ALL.into_iter().find(|x| x.tag() == t)
    }

    /// Columns of the records as submitted (what the journal holds).
    pub fn record_schema(self) -> SchemaRef {
        let fields = match self {
            Table::Requests => requests(),
            Table::Connections => connections(),
            Table::Approvals => approvals(),
            Table::Events => events(),
        };
        Arc::new(Schema::new(fields))
    }

    /// Columns of the Parquet files: the record's, then the chain's.
    pub fn file_schema(self) -> SchemaRef {
        let mut fields: Vec<Field> = self
            .record_schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(CHAIN_SEQ, DataType::UInt64, false));
        fields.push(Field::new(CHAIN_HASH, DataType::Utf8, false));
        Arc::new(Schema::new(fields))
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn ts(name: &str) -> Field {
    Field::new(
        name,
        DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
        false,
    )
}

fn text(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true)
}

fn text_req(name: &str) -> Field {
    Field::new(name, DataType::Utf8, false)
}

fn u64_(name: &str) -> Field {
    Field::new(name, DataType::UInt64, true)
}

fn u32_(name: &str) -> Field {
    Field::new(name, DataType::UInt32, true)
}

fn f64_(name: &str) -> Field {
    Field::new(name, DataType::Float64, true)
}

fn bool_(name: &str) -> Field {
    Field::new(name, DataType::Boolean, true)
}

fn list(name: &str, item: DataType) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", item, true))),
        true,
    )
}

fn map(name: &str, value: DataType) -> Field {
    let entries = Field::new(
        "entries",
        DataType::Struct(Fields::from(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("value", value, true),
        ])),
        false,
    );
    Field::new(name, DataType::Map(Arc::new(entries), false), true)
}

fn origin() -> Vec<Field> {
    vec![text_req("host"), text_req("agent_version")]
}

/// The kernel-attested caller (the agent's `identity::Workload`).
fn workload() -> Vec<Field> {
    vec![
        u32_("pid"),
        u32_("tid"),
        u32_("uid"),
        text("user"),
        u32_("gid"),
        list("groups", DataType::UInt32),
        text("comm"),
        u64_("cgroup_id"),
        text("cgroup_path"),
        text("systemd_unit"),
        text("container_id"),
        text("container_runtime"),
        text("pod_uid"),
        text("pod_namespace"),
        text("pod_name"),
        text("container_image"),
        text("exe_path"),
        text("exe_sha256"),
        list("identity_unknown", DataType::Utf8),
    ]
}

fn requests() -> Vec<Field> {
    let mut f = vec![
        text_req("request_id"),
        text_req("connection_id"),
        ts("start_time"),
        ts("end_time"),
    ];
    f.extend(origin());
    f.extend([
        text("destination"),
        text("original_dst"),
        text("client_addr"),
    ]);
    f.extend(workload());
    f.extend([
        text("oidc_issuer"),
        text("oidc_subject"),
        list("oidc_groups", DataType::Utf8),
        Field::new(
            "oidc_expiry",
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            true,
        ),
        text("sni"),
        text("tls_version"),
        text("alpn"),
        text("http_version"),
        text("upstream_http_version"),
        text("upstream_tls_version"),
        text("upstream_cert_subject"),
        text("upstream_credential"),
        text("upstream_credential_source"),
        text_req("method"),
        text("authority"),
        text_req("path"),
        text("path_as_sent"),
        text("query"),
        map("request_headers", DataType::Utf8),
        map("response_headers", DataType::Utf8),
        text("request_body"),
        bool_("request_body_truncated"),
        text("response_body"),
        bool_("response_body_truncated"),
        list("patient_refs", DataType::Utf8),
        Field::new("status", DataType::UInt16, false),
        u64_("request_bytes"),
        u64_("response_bytes"),
        f64_("latency_ms"),
        f64_("duration_ms"),
        text_req("decision"),
        list("policy_ids", DataType::Utf8),
        text("policy_set_hash"),
        text("masking_profile"),
        map("masking_counts", DataType::Int64),
        text("masking_set_hash"),
        text("approval_id"),
        list("approvers", DataType::Utf8),
        text("approval_reason"),
        bool_("upgraded"),
        text_req("outcome"),
        text("error"),
        // Sealed originals (HPKE to a reviewer key; see `original`), nullable, added.
        text("response_original_sealed"),
        text("response_original_key_id"),
    ]);
    f
}

fn connections() -> Vec<Field> {
    let mut f = vec![text_req("connection_id"), ts("start_time"), ts("end_time")];
    f.extend(origin());
    f.extend([
        f64_("duration_ms"),
        text("destination"),
        text("protocol"),
        text("original_dst"),
        text("client_addr"),
    ]);
    f.extend(workload());
    f.extend([
        u64_("bytes_up"),
        u64_("bytes_down"),
        text("sni"),
        text("tls_version"),
        text("alpn"),
        u64_("requests"),
        text("decision"),
        list("policy_ids", DataType::Utf8),
        text("policy_set_hash"),
        text_req("outcome"),
        text("error"),
    ]);
    f
}

fn approvals() -> Vec<Field> {
    let mut f = vec![text_req("approval_id"), ts("time")];
    f.extend(origin());
    f.extend([
        text_req("state"),
        text("rule"),
        text("request_id"),
        text("request_digest"),
        text("requester"),
        text("requester_person"),
        text("reviewer"),
        text("reviewer_person"),
        text("reason"),
        text("error"),
    ]);
    f
}

fn events() -> Vec<Field> {
    let mut f = vec![text_req("event_id"), ts("time")];
    f.extend(origin());
    f.extend([
        text_req("kind"),
        text_req("outcome"),
        text("config_hash"),
        text("policy_set_hash"),
        text("table_name"),
        text("file"),
        u64_("first_chain_seq"),
        u64_("last_chain_seq"),
        text("last_hash"),
        text("message"),
    ]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Saved auditor queries depend on these names and types: changing one is a
    /// deliberate, versioned decision (bump SCHEMA_VERSION and say so in the docs).
    #[test]
    fn schema_is_stable() {
        let digest = |t: Table| {
            use sha2::Digest;
            let text: Vec<String> = t
                .file_schema()
                .fields()
                .iter()
                .map(|f| format!("{}:{}:{}", f.name(), f.data_type(), f.is_nullable()))
                .collect();
            hex::encode(sha2::Sha256::digest(text.join("\n")))[..16].to_owned()
        };
        let got: Vec<(String, String)> = Table::ALL
            .iter()
            .map(|t| (t.name().to_owned(), digest(*t)))
            .collect();
        let expected = [
            // + oidc_expiry, path_as_sent, identity_unknown (nullable, added: older
            // files read them as null through union_by_name); + container_id,
            // container_runtime, pod_uid, upstream_credential,
            // upstream_credential_source (nullable, added); + pod_namespace, pod_name,
            // container_image (nullable, added); + response_original_sealed,
            // response_original_key_id (nullable, added: sealed originals).
            ("requests", "95396ff7982c4ce0"),
            // + decision, policy_ids, policy_set_hash (nullable, added: a TCP or
            // TUNNEL passage is decided per connection); + container_id,
            // container_runtime, pod_uid (nullable, added); + pod_namespace, pod_name,
            // container_image (nullable, added).
            ("connections", "acf5b80ed7db583b"),
            // + requester_person, reviewer_person (nullable, added: self-approval
            // and quorum are decided on persons).
            ("approvals", "3b94fb8d057f8dd9"),
            ("events", "78109fc628bd5a96"),
        ];
        for ((name, d), (ename, ed)) in got.iter().zip(expected) {
            assert_eq!(name, ename);
            assert_eq!(
                d, ed,
                "the {name} schema changed (SCHEMA_VERSION {SCHEMA_VERSION})"
            );
        }
    }
}
