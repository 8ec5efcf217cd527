//! The `docker` command line, run as a child process.
//!
//! Why not the `testcontainers` crate: every testcontainers release that
//! talks to the daemon through bollard (0.16 up to 0.28, the newest) builds its
//! client with bollard's fixed `API_DEFAULT_VERSION` (1.44 to 1.53) and never
//! negotiates, and offers no way to set the version; a Docker Engine 20.10
//! daemon (API 1.41, Debian 12's `docker.io`) answers every such request with
//! "client version 1.44 is too new. Maximum supported API version is 1.41".
//! The only release that could still talk to it, 0.15 (2023), lacks what this
//! backend needs (`--cap-add`, fixed addresses, kill, pause, network
//! connect/disconnect) and panics on errors. The docker CLI negotiates the API
//! version with any daemon and supports all of it.

use anyhow::{bail, Context, Result};
use std::time::Duration;
use tokio::process::Command;

/// How long one docker command may take before we give up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The `docker` program (`$MM_DOCKER_BIN`, else `docker` on the PATH).
#[derive(Debug, Clone)]
pub struct DockerCli {
    program: String,
}

impl Default for DockerCli {
    fn default() -> Self {
        DockerCli {
            program: std::env::var("MM_DOCKER_BIN").unwrap_or_else(|_| "docker".into()),
        }
    }
}

/// What a docker command printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl DockerCli {
    /// Runs `docker <args>`; fails with its stderr unless it exits 0.
    pub async fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args).await?;
        if !out.ok {
            bail!(
                "`docker {}` failed: {}",
                show(args),
                out.stderr.trim().lines().last().unwrap_or("(no message)")
            );
        }
        Ok(out.stdout)
    }

    /// Runs `docker <args>` and returns what it printed, whatever its status.
    pub async fn output(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(&self.program);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
            .await
            .with_context(|| format!("`docker {}` took over {COMMAND_TIMEOUT:?}", show(args)))?
            .with_context(|| format!("running `{} {}`", self.program, show(args)))?;
        Ok(Output {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Whether the CLI is installed and the daemon answers; the error says which.
    pub async fn check_daemon(&self) -> Result<String> {
        let out = self
            .output(&["version", "--format", "{{.Server.APIVersion}}"])
            .await
            .context("the docker CLI is not installed (or not runnable)")?;
        if !out.ok || out.stdout.trim().is_empty() {
            bail!(
                "the Docker daemon does not answer: {}",
                out.stderr.trim().lines().last().unwrap_or("(no message)")
            );
        }
        Ok(out.stdout.trim().to_string())
    }

    /// Whether `image` exists locally.
    pub async fn image_exists(&self, image: &str) -> Result<bool> {
        Ok(self.output(&["image", "inspect", image]).await?.ok)
    }
}

/// A command line for messages, environment values (the configs) elided.
fn show(args: &[&str]) -> String {
    args.iter()
        .map(|a| if a.contains('\n') { "<...>" } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}
