//! Validation of the per-node TOML config: one test per error, each checking
//! that the message names the problem.

use mm_runtime::config::{ConfigError, NodeConfig};
use std::io::Write;

const VALID: &str = r#"
cluster_id = "demo"
node_id = 1
secret = "s3cret"
[listen]
mesh = "127.0.0.1:7101"
client = "127.0.0.1:6101"
[postgres]
conninfo = "host=127.0.0.1 port=5501 user=postgres dbname=postgres"
[[nodes]]
id = 1
mesh = "127.0.0.1:7101"
[[nodes]]
id = 2
mesh = "127.0.0.1:7102"
[[nodes]]
id = 3
mesh = "127.0.0.1:7103"
[timeouts]
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 1000
"#;

fn err(text: &str) -> String {
    match NodeConfig::parse(text) {
        Ok(c) => panic!("accepted an invalid config: {c}"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
}

fn nodes(ids: &[u8]) -> String {
    ids.iter()
        .map(|i| {
            format!(
                "[[nodes]]\nid = {i}\nmesh = \"127.0.0.1:{}\"\n",
                7100 + *i as u16
            )
        })
        .collect()
}

/// VALID with its [[nodes]] replaced.
fn with_nodes(node_id: u8, ids: &[u8]) -> String {
    let head = VALID.split("[[nodes]]").next().unwrap();
    let head = head.replace("node_id = 1", &format!("node_id = {node_id}"));
    format!("{head}{}", nodes(ids))
}

#[test]
fn valid_config_parses_and_maps() {
    let c = NodeConfig::parse(VALID).unwrap();
    assert_eq!(c.cluster_id, "demo");
    assert_eq!(c.node_id, 1);
    assert_eq!(c.secret, b"s3cret");
    assert_eq!(c.listen.mesh, "127.0.0.1:7101".parse().unwrap());
    assert_eq!(c.listen.client, "127.0.0.1:6101".parse().unwrap());
    assert!(c.postgres.conninfo.contains("port=5501"));
    let peers = c.peers();
    assert_eq!(peers.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(peers[&3], "127.0.0.1:7103".parse().unwrap());

    let core = c.to_core_config();
    let dflt = mm_core::Config::new(1, 3);
    assert_eq!(core.id, 1);
    assert_eq!(core.nodes.len(), 3);
    assert_eq!(core.heartbeat_interval, mm_core::Time::from_millis(100));
    assert_eq!(core.heartbeat_timeout, mm_core::Time::from_millis(1000));
    assert_eq!(core.vote_timeout, dflt.vote_timeout);
    assert_eq!(core.tick_interval, dflt.tick_interval);

    let mesh = mm_runtime::mesh::MeshConfig::from_node_config(&c).unwrap();
    assert_eq!(mesh.peers, peers);
    assert_eq!(mesh.listen, c.listen.mesh);
    assert!(
        !format!("{mesh:?}").contains("s3cret"),
        "Debug leaks the secret"
    );
}

#[test]
fn timeouts_section_is_optional() {
    let text = VALID.split("[timeouts]").next().unwrap();
    let c = NodeConfig::parse(text).unwrap();
    assert_eq!(c.to_core_config(), mm_core::Config::new(1, 3));
}

#[test]
fn single_node_cluster_is_valid() {
    let c = NodeConfig::parse(&with_nodes(1, &[1])).unwrap();
    assert!(c.peers().is_empty());
}

#[test]
fn unknown_top_level_key_rejected() {
    let e = err(&VALID.replace("node_id = 1", "node_id = 1\nnodeid = 2"));
    assert_mentions(&e, &["unknown field", "nodeid"]);
}

#[test]
fn unknown_nested_key_rejected() {
    let e = err(&VALID.replace("heartbeat_interval_ms", "heartbeat_intervall_ms"));
    assert_mentions(&e, &["unknown field", "heartbeat_intervall_ms"]);
    let e = err(&VALID.replace("client =", "clients ="));
    assert_mentions(&e, &["unknown field", "clients"]);
}

#[test]
fn missing_key_rejected() {
    let e = err(&VALID.replace("cluster_id = \"demo\"", ""));
    assert_mentions(&e, &["missing field", "cluster_id"]);
}

#[test]
fn empty_cluster_id_rejected() {
    let e = err(&VALID.replace("cluster_id = \"demo\"", "cluster_id = \"\""));
    assert_mentions(&e, &["cluster_id", "empty"]);
}

#[test]
fn node_id_not_among_nodes() {
    let e = err(&with_nodes(4, &[1, 2, 3]));
    assert_mentions(&e, &["node_id = 4", "not among", "[[nodes]]"]);
}

#[test]
fn duplicate_node_ids() {
    let e = err(&with_nodes(1, &[1, 2, 2]));
    assert_mentions(&e, &["id 2", "more than once"]);
}

#[test]
fn node_ids_are_1_to_15_with_gaps_allowed() {
    // A dropped node leaves a gap.
    let c = NodeConfig::parse(&with_nodes(4, &[1, 2, 4])).unwrap();
    assert_eq!(c.to_core_config().nodes.len(), 3);
    assert_eq!(c.to_core_config().majority(), 2);
    let e = err(&with_nodes(1, &[0, 1]));
    assert_mentions(&e, &["id 0", "1..=15"]);
    let e = err(&with_nodes(1, &[1, 16]));
    assert_mentions(&e, &["id 16", "1..=15"]);
}

#[test]
fn cluster_size_bounds() {
    let e = err(&with_nodes(1, &[]));
    assert_mentions(&e, &["0 [[nodes]]", "1 to 15"]);
    let ids: Vec<u8> = (1..=16).collect();
    let e = err(&with_nodes(1, &ids));
    assert_mentions(&e, &["16 [[nodes]]", "1 to 15"]);
    let ids: Vec<u8> = (1..=15).collect();
    NodeConfig::parse(&with_nodes(15, &ids)).unwrap();
}

#[test]
fn missing_secret() {
    let e = err(&VALID.replace("secret = \"s3cret\"", ""));
    assert_mentions(&e, &["no secret", "`secret`", "`secret_file`"]);
}

#[test]
fn empty_secret() {
    let e = err(&VALID.replace("secret = \"s3cret\"", "secret = \"\""));
    assert_mentions(&e, &["`secret` is empty"]);
}

#[test]
fn both_secret_and_secret_file() {
    let e = err(&VALID.replace(
        "secret = \"s3cret\"",
        "secret = \"s3cret\"\nsecret_file = \"/etc/mm/secret\"",
    ));
    assert_mentions(&e, &["both", "`secret`", "`secret_file`"]);
}

#[test]
fn unreadable_secret_file_names_the_path() {
    let path = "/nonexistent/mm-test/secret-file";
    let e = err(&VALID.replace("secret = \"s3cret\"", &format!("secret_file = \"{path}\"")));
    assert_mentions(&e, &["secret_file", path]);
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mm-config-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn secret_file_is_read_and_trimmed_relative_to_the_config() {
    let dir = temp_dir("secret");
    std::fs::File::create(dir.join("secret"))
        .unwrap()
        .write_all(b"from-file\n")
        .unwrap();
    let cfg = dir.join("node.toml");
    std::fs::write(
        &cfg,
        VALID.replace("secret = \"s3cret\"", "secret_file = \"secret\""),
    )
    .unwrap();
    let c = NodeConfig::load(&cfg).unwrap();
    assert_eq!(c.secret, b"from-file");
    assert!(
        !format!("{c:?}").contains("from-file"),
        "Debug leaks the secret"
    );

    std::fs::write(dir.join("empty"), b"\n").unwrap();
    std::fs::write(
        &cfg,
        VALID.replace("secret = \"s3cret\"", "secret_file = \"empty\""),
    )
    .unwrap();
    let e = NodeConfig::load(&cfg).unwrap_err().to_string();
    assert_mentions(&e, &["secret_file", "empty"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unreadable_config_file_names_the_path() {
    let e = NodeConfig::load("/nonexistent/mm-test/node.toml").unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert_mentions(&e.to_string(), &["/nonexistent/mm-test/node.toml"]);
}

#[test]
fn bad_listen_address_names_key_and_value() {
    let e = err(&VALID.replace(
        "mesh = \"127.0.0.1:7101\"\nclient",
        "mesh = \"localhost\"\nclient",
    ));
    assert_mentions(&e, &["listen.mesh", "\"localhost\"", "socket address"]);
    let e = err(&VALID.replace("127.0.0.1:6101", "127.0.0.1:99999"));
    assert_mentions(&e, &["listen.client", "127.0.0.1:99999"]);
}

#[test]
fn bad_node_address_names_key_and_value() {
    let e = err(&VALID.replace("127.0.0.1:7103", "10.0.0.300:7103"));
    assert_mentions(&e, &["nodes[id = 3].mesh", "10.0.0.300:7103"]);
}

#[test]
fn duplicate_mesh_addresses() {
    let e = err(&VALID.replace("127.0.0.1:7103", "127.0.0.1:7102"));
    assert_mentions(&e, &["nodes 2 and 3", "127.0.0.1:7102"]);
}

#[test]
fn heartbeat_timeout_must_exceed_interval() {
    let e = err(&VALID.replace("heartbeat_timeout_ms = 1000", "heartbeat_timeout_ms = 100"));
    assert_mentions(
        &e,
        &[
            "heartbeat_timeout_ms (100)",
            "heartbeat_interval_ms (100)",
            "greater",
        ],
    );
    // Against the default interval (200 ms) when only the timeout is set.
    let e = err(&VALID
        .replace("heartbeat_interval_ms = 100\n", "")
        .replace("= 1000", "= 150"));
    assert_mentions(
        &e,
        &["heartbeat_timeout_ms (150)", "heartbeat_interval_ms (200)"],
    );
}

#[test]
fn zero_timeout_rejected() {
    let e = err(&VALID.replace(
        "heartbeat_timeout_ms = 1000",
        "heartbeat_timeout_ms = 1000\nvote_timeout_ms = 0",
    ));
    assert_mentions(&e, &["timeouts.vote_timeout_ms", "greater than 0"]);
}

#[test]
fn node_id_out_of_u8_range() {
    let e = err(&VALID.replace("node_id = 1", "node_id = 300"));
    assert_mentions(&e, &["node_id"]);
}
