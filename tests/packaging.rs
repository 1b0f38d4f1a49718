//! docker/: no Docker engine runs here, so what can be checked is checked: the compose file
//! parses (python3-yaml, installed by scripts/clusters.sh) and tells the demo's story, and the
//! Dockerfile is multi-stage, runs pgtide as a non-root user with the work dir as a volume, and
//! copies the files the build needs.

use std::path::Path;
use std::process::Command;

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn compose_file_parses_and_wires_source_target_and_pgtide() {
    let script = r#"
import json, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
print(json.dumps(doc))
"#;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/compose.yml");
    let out = Command::new("python3")
        .args(["-c", script, path.to_str().unwrap()])
        .output()
        .expect("python3 runs (scripts/clusters.sh installs python3-yaml)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = &doc["services"];
    let source_command = services["source"]["command"].to_string();
    assert!(
        source_command.contains("wal_level=logical"),
        "{source_command}"
    );
    assert!(services["target"].is_object());
    let pgtide = &services["pgtide"];
    assert_eq!(pgtide["build"]["dockerfile"], "docker/Dockerfile");
    let command = pgtide["command"].to_string();
    assert!(
        command.contains("clone") && command.contains("--follow"),
        "{command}"
    );
    assert!(command.contains("--metrics-addr"), "{command}");
    assert!(pgtide["ports"].to_string().contains("9187:9187"));
    assert!(pgtide["volumes"].to_string().contains(":/work"));
    let env = pgtide["environment"].to_string();
    assert!(env.contains("PGTIDE_SOURCE_PGURI") && env.contains("PGTIDE_TARGET_PGURI"));
    // No password inside a connection string.
    for uri in ["PGTIDE_SOURCE_PGURI", "PGTIDE_TARGET_PGURI"] {
        let value = pgtide["environment"][uri].as_str().unwrap();
        let userinfo = value
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .map(|(user, _)| user)
            .unwrap_or("");
        assert!(!userinfo.contains(':'), "a password in {uri}: {value}");
    }
    // The seed files it mounts exist.
    for mounted in services["source"]["volumes"].as_array().unwrap() {
        let host = mounted.as_str().unwrap().split(':').next().unwrap();
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("docker")
                .join(host)
                .exists(),
            "{host} is mounted but missing"
        );
    }
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_a_work_volume() {
    let dockerfile = repo("docker/Dockerfile");
    let froms = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert_eq!(froms, 2, "a builder stage and a runtime stage");
    assert!(dockerfile.contains("USER pgtide"));
    assert!(dockerfile.contains("VOLUME [\"/work\"]"));
    assert!(dockerfile.contains("ENTRYPOINT [\"pgtide\"]"));
    assert!(dockerfile.contains("postgresql-client-"));
    // Every path the build stage copies exists in the repository.
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            assert!(
                Path::new(env!("CARGO_MANIFEST_DIR")).join(source).exists(),
                "{source} is copied but missing"
            );
        }
    }
    // The binary the runtime stage takes is the one cargo builds.
    assert!(dockerfile.contains("/src/target/release/pgtide"));
    let manifest = repo("Cargo.toml");
    assert!(manifest.contains("name = \"pgtide\""));
}
