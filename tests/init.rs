//! `pgkeep init` and `show` against real clusters.

use crate::harness::{Cluster, ClusterOptions};

#[test]
fn init_then_show_json_is_an_empty_list() {
    let cluster = Cluster::new();
    let run = cluster.pgkeep_ok(&["show", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["backups"], serde_json::json!([]));
    // Repository directories are private to the cluster's owner.
    let mode = std::fs::metadata(&cluster.repo).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o700
    );
}

#[test]
fn init_again_on_the_same_cluster_is_accepted() {
    let cluster = Cluster::new();
    let run = cluster.pgkeep_ok(&["init"]);
    assert!(run.stdout.contains("already initialised"), "{run:?}");
}

#[test]
fn repository_of_one_cluster_refuses_another() {
    let first = Cluster::new();
    let second = Cluster::with(ClusterOptions {
        init_repo: false,
        ..Default::default()
    });
    // Point the second cluster's config at the first cluster's repository.
    let text = std::fs::read_to_string(&second.config).unwrap().replace(
        &second.repo.display().to_string(),
        &first.repo.display().to_string(),
    );
    std::fs::write(&second.config, text).unwrap();
    let run = second.pgkeep(&["init"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    let first_id = first.query_text("SELECT system_identifier::text FROM pg_control_system()");
    let second_id = second.query_text("SELECT system_identifier::text FROM pg_control_system()");
    assert_ne!(first_id, second_id);
    assert!(
        run.stderr.contains(&first_id) && run.stderr.contains(&second_id),
        "{run:?}"
    );
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
}

#[test]
fn init_refuses_a_config_whose_data_dir_is_not_the_servers() {
    let cluster = Cluster::with(ClusterOptions {
        init_repo: false,
        ..Default::default()
    });
    let text = std::fs::read_to_string(&cluster.config).unwrap().replace(
        &format!("data = \"{}\"", cluster.data.display()),
        "data = \"/tmp/elsewhere\"",
    );
    std::fs::write(&cluster.config, text).unwrap();
    let run = cluster.pgkeep(&["init"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("/tmp/elsewhere"), "{run:?}");
    assert!(!cluster.repo.exists());
}

#[test]
fn show_of_an_unknown_label_is_an_error() {
    let cluster = Cluster::new();
    let run = cluster.pgkeep(&["show", "20990101-000000F"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("20990101-000000F"), "{run:?}");
}

#[test]
fn a_repository_refuses_a_cluster_of_another_major_and_says_to_init_a_new_one() {
    let cluster = Cluster::new();
    // What pg_upgrade leaves: the same data directory path, a new major and system identifier.
    let major = crate::harness::server_major();
    let db = rusqlite::Connection::open(cluster.repo.join("catalog.db")).unwrap();
    db.execute(
        "UPDATE repo_identity SET pg_major = ?1, system_identifier = system_identifier + 1",
        [major - 1],
    )
    .unwrap();
    drop(db);
    crate::harness::give_catalog_to_postgres(&cluster.repo);
    for args in [&["backup", "--type", "full"][..], &["init"][..]] {
        let run = cluster.pgkeep(args);
        assert_eq!(run.code, Some(1), "{args:?}: {run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
        for needle in [
            format!("PostgreSQL {}", major - 1),
            format!("PostgreSQL {major}"),
            "pgkeep init".to_string(),
        ] {
            assert!(run.stderr.contains(&needle), "{needle}: {run:?}");
        }
    }
}
