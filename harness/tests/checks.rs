//! The checked workloads (mm-workloads) and the consistency checks
//! (`mm_harness::checks`) against real PostgreSQL 15, without mm: the
//! workloads must see a correct server as correct, and the checks must catch
//! each kind of damage they exist for (a lost acknowledged write, diverging
//! hash sums, a leftover prepared transaction, a changed bank total).
//!
//! Skips (prints why, passes) when PostgreSQL 15 is not installed, unless
//! `MM_REQUIRE_PG` is set (CI): then a missing PostgreSQL fails the test.

use std::time::{Duration, Instant};

use mm_harness::backend::local::{LocalCluster, LocalClusterConfig};
use mm_harness::checks::{check_nodes, Expect};
use mm_harness::pg_bin::pg_or_skip;
use mm_workloads::{
    bank_seed_sql, run_bank, run_ledger, BankConfig, LedgerConfig, Stop, BANK_SCHEMA, LEDGER_SCHEMA,
};

const CREATE_MM: &str = "create table mm(id int primary key, info text, mod_time timestamp)";
const FILL_MM: &str =
    "insert into mm select g, md5(g::text), timestamp '2024-01-01' + g * interval '1 minute' \
                       from generate_series(1, 100) g";
const ACCOUNTS: i32 = 10;
const INITIAL: i64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_on_one_node_and_the_checks_catch_damage() {
    let Some(_) = pg_or_skip("workloads_on_one_node_and_the_checks_catch_damage") else {
        return;
    };
    let t0 = Instant::now();
    let cluster = LocalCluster::start(LocalClusterConfig::for_tests("checks_one_node", 1))
        .await
        .expect("start 1-node cluster");
    let conninfos = vec![cluster.conninfo(0)];
    let c = cluster.connect(0).await.unwrap();
    c.batch_execute(CREATE_MM).await.unwrap();
    c.batch_execute(FILL_MM).await.unwrap();
    c.batch_execute(BANK_SCHEMA).await.unwrap();
    c.batch_execute(&bank_seed_sql(ACCOUNTS, INITIAL))
        .await
        .unwrap();
    c.batch_execute(LEDGER_SCHEMA).await.unwrap();

    // (a) + (b): bank transfers with readers and the ledger, together for 3 s.
    let mut bank = BankConfig::new(conninfos.clone(), ACCOUNTS, INITIAL);
    bank.writers_per_node = 3;
    bank.readers_per_node = 2;
    bank.seed = 42;
    let mut ledger = LedgerConfig::new(conninfos.clone());
    ledger.seed = 42;
    let (b, l) = tokio::join!(
        run_bank(&bank, Stop::after(Duration::from_secs(3))),
        run_ledger(&ledger, Stop::after(Duration::from_secs(3))),
    );
    eprintln!("{}\n{}", b.render(), l.render());
    assert!(b.elapsed_s < 15.0, "bank did not stop: {} s", b.elapsed_s);
    assert!(b.writers.committed >= 20, "{}", b.render());
    assert_eq!(b.writers.errors, 0, "{}", b.render());
    assert_eq!(b.writers.uncertain, 0);
    assert!(b.readers.ops.committed >= 20, "{}", b.render());
    assert_eq!(b.readers.violations, 0, "{}", b.render());
    assert_eq!(
        b.readers.totals_seen.keys().copied().collect::<Vec<_>>(),
        vec![ACCOUNTS as i64 * INITIAL]
    );
    assert!(b.ok());
    assert_eq!(b.writers.latency.count(), b.writers.committed);
    let json = serde_json::to_value(&b).unwrap();
    assert_eq!(json["writers"]["committed"], b.writers.committed);

    assert!(l.acknowledged_count >= 50, "{}", l.render());
    assert_eq!(l.acknowledged.len(), l.acknowledged_count);
    assert_eq!(l.stats.errors, 0, "{}", l.render());
    assert_eq!(l.uncertain_count, 0, "{}", l.render());
    let rows: i64 = c
        .query_one("select count(*) from mm_ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows as usize, l.acknowledged_count,
        "every row was acknowledged and vice versa"
    );

    let expect = Expect {
        bank_total: Some(bank.expected_total()),
        acknowledged: Some(l.acknowledged.clone()),
    };
    let v = check_nodes(&conninfos, &expect).await;
    eprintln!("{}", v.render());
    assert!(v.consistent, "{}", v.render());
    let n = &v.nodes[0];
    assert_eq!(n.bank_total, Some(ACCOUNTS as i64 * INITIAL));
    assert_eq!(n.bank_rows, Some(ACCOUNTS as i64));
    assert_eq!(n.ledger_missing, Some(0));
    assert_eq!(n.mm_rows, Some(100));
    assert!(matches!(n.hash_sum, Some(Some(_))));
    assert_eq!(n.prepared_left, Some(0));

    // (c) A lost acknowledged write.
    let lost = l.acknowledged[l.acknowledged.len() / 2];
    let row = c
        .query_one(
            "delete from mm_ledger where id = $1 returning node, client, seq, payload",
            &[&lost],
        )
        .await
        .unwrap();
    let v = check_nodes(&conninfos, &expect).await;
    eprintln!("{}", v.render());
    assert!(!v.consistent);
    assert_eq!(v.nodes[0].ledger_missing, Some(1));
    assert_eq!(v.nodes[0].ledger_missing_ids, vec![lost]);
    let (node, client, seq, payload): (i32, i32, i64, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    c.execute(
        "insert into mm_ledger values ($1, $2, $3, $4, $5)",
        &[&lost, &node, &client, &seq, &payload],
    )
    .await
    .unwrap();
    assert!(check_nodes(&conninfos, &expect).await.consistent);

    // (c) A leftover prepared transaction.
    let p = cluster.connect(0).await.unwrap();
    p.batch_execute(
        "BEGIN; insert into mm values (-1, 'in doubt', now()); PREPARE TRANSACTION 'x'",
    )
    .await
    .unwrap();
    let v = check_nodes(&conninfos, &expect).await;
    eprintln!("{}", v.render());
    assert!(!v.consistent);
    assert_eq!(v.nodes[0].prepared_left, Some(1));
    assert_eq!(v.nodes[0].prepared_gids, vec!["x".to_string()]);
    p.batch_execute("ROLLBACK PREPARED 'x'").await.unwrap();
    assert!(check_nodes(&conninfos, &expect).await.consistent);

    // (c) A bank total changed behind the workload's back: the checker and a
    // reader both see it.
    c.batch_execute("update mm_bank set balance = balance + 1 where id = 1")
        .await
        .unwrap();
    let v = check_nodes(&conninfos, &expect).await;
    eprintln!("{}", v.render());
    assert!(!v.consistent);
    assert_eq!(v.nodes[0].bank_total, Some(ACCOUNTS as i64 * INITIAL + 1));
    assert!(
        v.problems.iter().any(|p| p.contains("expected 10000")),
        "{:?}",
        v.problems
    );
    let mut readers_only = bank.clone();
    readers_only.writers_per_node = 0;
    let r = run_bank(&readers_only, Stop::after(Duration::from_millis(300))).await;
    assert!(r.readers.violations > 0, "{}", r.render());
    assert!(r
        .readers
        .totals_seen
        .contains_key(&(ACCOUNTS as i64 * INITIAL + 1)));
    assert!(!r.ok());

    // A table the checks need is gone: an error, never a silent pass.
    c.batch_execute("drop table mm_ledger").await.unwrap();
    let v = check_nodes(&conninfos, &expect).await;
    assert!(!v.consistent);
    assert!(
        v.nodes[0].errors.iter().any(|e| e.contains("mm_ledger")),
        "{:?}",
        v.nodes[0].errors
    );
    eprintln!("one-node checks test done in {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_independent_nodes_diverge_and_the_checks_see_it() {
    let Some(_) = pg_or_skip("two_independent_nodes_diverge_and_the_checks_see_it") else {
        return;
    };
    let t0 = Instant::now();
    let cluster = LocalCluster::start(LocalClusterConfig::for_tests("checks_two_nodes", 2))
        .await
        .expect("start 2-node cluster");
    let conninfos: Vec<String> = (0..2).map(|i| cluster.conninfo(i)).collect();
    let expect = Expect::default();

    // No mm table yet: the seed's check cannot run, which is an error.
    let v = check_nodes(&conninfos, &expect).await;
    assert!(!v.consistent);
    assert!(
        v.nodes
            .iter()
            .all(|n| n.errors.iter().any(|e| e.contains("42P01"))),
        "{}",
        v.render()
    );

    let mut clients = Vec::new();
    for i in 0..2 {
        let c = cluster.connect(i).await.unwrap();
        c.batch_execute(CREATE_MM).await.unwrap();
        c.batch_execute(FILL_MM).await.unwrap();
        c.batch_execute(BANK_SCHEMA).await.unwrap();
        c.batch_execute(&bank_seed_sql(ACCOUNTS, INITIAL))
            .await
            .unwrap();
        clients.push(c);
    }
    let v = check_nodes(&conninfos, &expect).await;
    eprintln!("{}", v.render());
    assert!(v.consistent, "{}", v.render());
    assert_eq!(v.nodes[0].hash_sum, v.nodes[1].hash_sum);
    assert!(matches!(v.nodes[0].hash_sum, Some(Some(_))));
    assert_eq!(v.nodes[1].bank_total, Some(ACCOUNTS as i64 * INITIAL));

    // One row differs on node2: same counts, different hash sums.
    clients[1]
        .batch_execute("update mm set info = 'diverged' where id = 50")
        .await
        .unwrap();
    let v = check_nodes(&conninfos, &expect).await;
    eprintln!("{}", v.render());
    assert!(!v.consistent);
    assert_ne!(v.nodes[0].hash_sum, v.nodes[1].hash_sum);
    assert_eq!(v.nodes[0].mm_rows, v.nodes[1].mm_rows);
    assert!(
        v.problems.iter().any(|p| p.contains("hash sums differ")),
        "{:?}",
        v.problems
    );
    assert!(v.render().contains("INCONSISTENT"));
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["consistent"], false);

    // Repaired; then half a transfer applied on node1 only: the bank totals
    // differ across nodes (no expected total given here).
    clients[1]
        .batch_execute("update mm set info = md5('50') where id = 50")
        .await
        .unwrap();
    assert!(check_nodes(&conninfos, &expect).await.consistent);
    clients[0]
        .batch_execute("update mm_bank set balance = balance - 5 where id = 1")
        .await
        .unwrap();
    let v = check_nodes(&conninfos, &expect).await;
    assert!(!v.consistent);
    assert!(
        v.problems.iter().any(|p| p.contains("bank totals differ")),
        "{:?}",
        v.problems
    );
    eprintln!("two-node checks test done in {:?}", t0.elapsed());
}
