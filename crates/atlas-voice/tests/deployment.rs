//! The deployment files run as written: the Dockerfile's health check against a real server,
//! Fly's release command against a real database, and the docs name the same commands.

use std::path::{Path, PathBuf};
use std::process::Command;

use atlas_testkit::ServerProcess;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(file: &str) -> String {
    std::fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The image's command line as a process: `atlas-voice` is this build's binary.
fn command(argv: &[String]) -> Command {
    assert_eq!(argv[0], "atlas-voice", "{argv:?} runs the server binary");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_atlas-voice"));
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd
}

/// The exec-form command of every `HEALTHCHECK` (one for all images).
fn healthcheck() -> Vec<String> {
    let text = read("Dockerfile");
    let commands: Vec<Vec<String>> = text
        .lines()
        .filter(|l| l.starts_with("HEALTHCHECK"))
        .map(|l| {
            let json = l.split_once(" CMD ").expect("HEALTHCHECK … CMD [..]").1;
            serde_json::from_str(json.trim()).expect("exec form: a JSON array")
        })
        .collect();
    assert!(!commands.is_empty(), "the Dockerfile has a HEALTHCHECK");
    assert!(commands.windows(2).all(|w| w[0] == w[1]));
    commands[0].clone()
}

/// `[deploy] release_command` of fly.toml, split into words.
fn release_command() -> Vec<String> {
    let text = read("fly.toml");
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("release_command"))
        .expect("fly.toml has a release_command");
    let value = line.split_once('=').unwrap().1.trim();
    let value: String = serde_json::from_str(value).expect("a quoted string");
    value.split_whitespace().map(str::to_owned).collect()
}

/// `atlas-voice serve --fakes` on a loopback port.
fn serve() -> ServerProcess {
    let bin = Path::new(env!("CARGO_BIN_EXE_atlas-voice"));
    atlas_testkit::serve_with_args(bin, &["--fakes"], &[]).expect("the server starts")
}

#[test]
fn the_dockerfile_health_check_passes_against_a_running_server_and_fails_without_one() {
    let argv = healthcheck();
    let server = serve();
    // The image listens on 0.0.0.0; the check asks through loopback on the same port.
    for listen in [
        format!("0.0.0.0:{}", server.addr.port()),
        server.addr.to_string(),
    ] {
        let status = command(&argv)
            .env("ATLAS_LISTEN", &listen)
            .status()
            .unwrap();
        assert!(status.success(), "{argv:?} with ATLAS_LISTEN={listen}");
    }
    let port = server.addr.port();
    drop(server);
    let out = command(&argv)
        .env("ATLAS_LISTEN", format!("0.0.0.0:{port}"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "no server, no health");
    assert!(!out.stderr.is_empty(), "says why");
}

#[test]
fn the_fly_release_command_applies_the_embedded_migrations() {
    let argv = release_command();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/release.db", dir.path().display());
    // Run where the image runs it: no source tree around.
    let run = |argv: &[String]| {
        let out = command(argv)
            .env("DATABASE_URL", &url)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{argv:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let applied = run(&argv);
    assert!(applied.contains("applied"), "{applied}");
    let status = run(&["atlas-voice".into(), "db".into(), "status".into()]);
    assert!(status.contains(" 0 pending"), "{status}");
    // Again: nothing left to do.
    assert!(run(&argv).contains("nothing to apply"));
}

#[test]
fn the_local_image_builds_and_carries_every_engine_worker() {
    let dockerfile = read("Dockerfile");
    let build = dockerfile
        .split("RUN ")
        .find(|r| r.contains("cargo build"))
        .expect("the Dockerfile builds the binaries");
    // Every worker package of the workspace: the server starts them by name.
    let workers: Vec<String> = std::fs::read_dir(root().join("crates"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("Cargo.toml")).ok())
        .filter_map(|toml| {
            let name = toml.lines().find_map(|l| l.strip_prefix("name = "))?;
            let name = name.trim_matches('"');
            name.starts_with("atlas-voice-").then(|| name.to_owned())
        })
        .collect();
    assert!(workers.len() >= 4, "workers found: {workers:?}");
    for worker in &workers {
        assert!(
            build.contains(&format!("-p {worker} ")) || build.contains(&format!("-p {worker}\n")),
            "the image builds {worker}"
        );
        assert!(
            build.contains(&format!("target/release/{worker} ")),
            "the image copies {worker}"
        );
    }
    // The end-of-turn model is fetched beside the default set.
    assert!(dockerfile.contains("models fetch smart-turn --dir /models"));
}

#[test]
fn the_docs_name_the_commands_and_targets_the_files_use() {
    let docs = read("docs/deployment.md");
    let dockerfile = read("Dockerfile");
    let release = release_command().join(" ");
    assert!(
        docs.contains(&release),
        "docs/deployment.md names `{release}`"
    );
    let health = healthcheck().join(" ");
    assert!(
        docs.contains(&health),
        "docs/deployment.md names `{health}`"
    );
    for target in ["local", "cloud"] {
        assert!(
            dockerfile.contains(&format!(" AS {target}\n")),
            "the Dockerfile has a {target} stage"
        );
    }
    assert!(docs.contains("--target local"));
    let last_stage = dockerfile
        .lines()
        .rfind(|l| l.starts_with("FROM "))
        .unwrap();
    assert!(
        last_stage.ends_with(" AS cloud"),
        "the slim image is the default"
    );
    for needle in [
        "ATLAS_JWKS_URL",
        "supabase link",
        "ATLAS_TRUSTED_PROXIES",
        "rediss://",
    ] {
        assert!(
            docs.contains(needle),
            "docs/deployment.md mentions {needle}"
        );
    }
    // JWKS first: the legacy shared secret comes after it.
    let jwks = docs.find("ATLAS_JWKS_URL").unwrap();
    let secret = docs.find("ATLAS_JWT_SECRET").unwrap_or(usize::MAX);
    assert!(jwks < secret, "the docs lead with JWKS");
}
