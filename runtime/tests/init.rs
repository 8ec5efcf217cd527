//! `mmctl init` against a real PostgreSQL 15: a ready node is prepared
//! (twice, idempotently); a node lacking prerequisites is refused with the
//! exact settings to change, and nothing is created.

use mm_harness::backend::local::{LocalCluster, LocalClusterConfig};
use mm_harness::pg_bin::pg_or_skip;
use mm_runtime::config::NodeConfig;
use mm_runtime::pg::init::{init_node, InitError};
use tokio_postgres::NoTls;

/// A 3-node cluster's config for node 1, whose PostgreSQL is `conninfo`.
fn config(conninfo: &str) -> NodeConfig {
    NodeConfig::parse(&format!(
        r#"
cluster_id = "init-test"
node_id = 1
secret = "s"
[listen]
mesh = "127.0.0.1:7101"
client = "127.0.0.1:6101"
[postgres]
conninfo = "{conninfo}"
[[nodes]]
id = 1
mesh = "127.0.0.1:7101"
[[nodes]]
id = 2
mesh = "127.0.0.1:7102"
[[nodes]]
id = 3
mesh = "127.0.0.1:7103"
"#
    ))
    .expect("valid config")
}

async fn client(conninfo: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c
}

#[tokio::test]
async fn init_prepares_a_ready_node_idempotently() {
    if pg_or_skip("init_prepares_a_ready_node_idempotently").is_none() {
        return;
    }
    // One PostgreSQL, configured as node 1 of a 3-node mm cluster.
    let mut cc = LocalClusterConfig::for_tests("init-ready", 1);
    cc.extra_settings = vec![("max_prepared_transactions".into(), "300".into())];
    let cluster = LocalCluster::start(cc).await.expect("start");
    let cfg = config(&cluster.conninfo(0));

    let first = init_node(&cfg).await.expect("init succeeds");
    for want in [
        "publication mm_publication",
        "slot mm_slot_for_2",
        "slot mm_slot_for_3",
        "origin mm_node_2_0",
        "origin mm_node_2_3",
        "origin mm_node_3_0",
        "origin mm_node_3_3",
    ] {
        assert!(
            // Slots also name their plugin: "slot mm_slot_for_2 (mm_output)".
            first
                .created
                .iter()
                .any(|c| c == want || c.starts_with(&format!("{want} ("))),
            "{want} created: {first:?}"
        );
    }
    let second = init_node(&cfg).await.expect("init again succeeds");
    assert!(
        second.created.is_empty(),
        "nothing new the second time: {second:?}"
    );

    let c = client(&cluster.conninfo(0)).await;
    let slots = c
        .query(
            "select slot_name::text, plugin::text, two_phase from pg_replication_slots order by 1",
            &[],
        )
        .await
        .unwrap();
    let slots: Vec<(String, String, bool)> = slots
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // mm_output where the plugin is installed (CI installs it), else pgoutput.
    let plugin = if std::env::var_os("MM_REQUIRE_PG").is_some() {
        "mm_output".to_string()
    } else {
        slots.first().map(|s| s.1.clone()).unwrap_or_default()
    };
    assert!(
        ["mm_output", "pgoutput"].contains(&plugin.as_str()),
        "{slots:?}"
    );
    assert_eq!(
        slots,
        vec![
            ("mm_slot_for_2".into(), plugin.clone(), true),
            ("mm_slot_for_3".into(), plugin, true)
        ]
    );
    let schema: i64 = c
        .query_one(
            "select count(*) from pg_namespace where nspname = 'mm'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, 1);
}

#[tokio::test]
async fn init_refuses_a_node_without_logical_wal_and_changes_nothing() {
    if pg_or_skip("init_refuses_a_node_without_logical_wal_and_changes_nothing").is_none() {
        return;
    }
    let mut cc = LocalClusterConfig::for_tests("init-unready", 1);
    cc.extra_settings = vec![
        ("wal_level".into(), "replica".into()),
        ("max_prepared_transactions".into(), "0".into()),
    ];
    let cluster = LocalCluster::start(cc).await.expect("start");
    let cfg = config(&cluster.conninfo(0));

    let err = init_node(&cfg)
        .await
        .expect_err("prerequisites are missing");
    let text = err.to_string();
    assert!(matches!(err, InitError::Prerequisites(_)), "{text}");
    assert!(
        text.contains("`wal_level = logical`"),
        "names the wal_level fix: {text}"
    );
    assert!(
        text.contains("`max_prepared_transactions = 300`"),
        "names the exact value: {text}"
    );

    let c = client(&cluster.conninfo(0)).await;
    let schema: i64 = c
        .query_one(
            "select count(*) from pg_namespace where nspname = 'mm'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let slots: i64 = c
        .query_one("select count(*) from pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((schema, slots), (0, 0), "nothing was created");
}
