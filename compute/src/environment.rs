//! Environments: where a worker runs (the host, or a container image under a runtime), and the
//! commands that start a worker there.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A container runtime, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// A plain process on the endpoint's machine.
    Host,
    /// `docker run`.
    Docker,
    /// `podman run` (the same command line as docker).
    Podman,
    /// `apptainer exec` (images are `.sif` files or `docker://` references).
    Apptainer,
}

impl Runtime {
    /// Name as written in configuration and function records.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Host => "host",
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
            Runtime::Apptainer => "apptainer",
        }
    }

    /// Parses a runtime name.
    pub fn parse(s: &str) -> Result<Runtime, String> {
        match s {
            "host" => Ok(Runtime::Host),
            "docker" => Ok(Runtime::Docker),
            "podman" => Ok(Runtime::Podman),
            "apptainer" | "singularity" => Ok(Runtime::Apptainer),
            other => Err(format!(
                "runtime `{other}` is not one of host, docker, podman, apptainer"
            )),
        }
    }
}

/// Where a worker runs: the host, or an image under a container runtime. Workers are pooled per
/// environment; a *warm* worker is one already running in the environment a task needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Environment {
    /// The runtime.
    pub runtime: Runtime,
    /// The image, for containers.
    pub image: Option<String>,
}

impl Environment {
    /// The host.
    pub fn host() -> Environment {
        Environment {
            runtime: Runtime::Host,
            image: None,
        }
    }

    /// The environment a function asks for.
    pub fn of(container: Option<&crdt_registry::record::Container>) -> Result<Environment, String> {
        match container {
            None => Ok(Environment::host()),
            Some(c) => Environment::parse(&format!("{}:{}", c.runtime, c.image)),
        }
    }

    /// Parses `host` or `<runtime>:<image>`.
    pub fn parse(s: &str) -> Result<Environment, String> {
        if s == "host" {
            return Ok(Environment::host());
        }
        let Some((runtime, image)) = s.split_once(':') else {
            return Err(format!(
                "environment `{s}` is neither `host` nor `<runtime>:<image>`"
            ));
        };
        let runtime = Runtime::parse(runtime)?;
        if runtime == Runtime::Host {
            return Err("the host environment takes no image".into());
        }
        if image.is_empty()
            || image.len() > 512
            || image.starts_with('-')
            || image.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!("`{image}` is not a container image reference"));
        }
        Ok(Environment {
            runtime,
            image: Some(image.to_owned()),
        })
    }

    /// A container (anything but the host).
    pub fn is_container(&self) -> bool {
        self.runtime != Runtime::Host
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.image {
            None => f.write_str(self.runtime.as_str()),
            Some(image) => write!(f, "{}:{image}", self.runtime.as_str()),
        }
    }
}

impl TryFrom<String> for Environment {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Environment::parse(&s)
    }
}

impl From<Environment> for String {
    fn from(e: Environment) -> String {
        e.to_string()
    }
}

/// Where the worker script is mounted inside containers.
pub const WORKER_IN_CONTAINER: &str = "/opt/funcmesh/worker.py";

/// Where the `funcmesh` binary appears inside a container, for the shell worker.
pub const SHELL_WORKER_IN_CONTAINER: &str = "/opt/funcmesh/funcmesh";

/// Starts the Python worker when the environment has the interpreter, and the shell worker
/// otherwise: `sh -c LAUNCH funcmesh-worker <python> <worker.py> <funcmesh>`.
const LAUNCH: &str =
    r#"if command -v "$1" >/dev/null 2>&1; then exec "$1" -u "$2"; fi; exec "$3" shell-worker"#;

/// How containers are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sandbox {
    /// Give the container a network.
    pub network: bool,
    /// Most processes in it.
    pub pids: u32,
    /// The tasks' memory limit, MiB (0: none); the container gets room for the interpreter
    /// on top.
    pub memory_mb: u64,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            network: false,
            pids: 512,
            memory_mb: 0,
        }
    }
}

/// The command line (program, arguments) that starts a worker in `env`. `name` names the
/// container, so that it can be killed by name. With `shell_worker` (the `funcmesh` binary), a
/// small `sh` launcher picks the worker inside the environment: the Python worker where
/// `python` runs there, the shell worker (`funcmesh shell-worker`, bind-mounted into containers)
/// where it does not; without it, the Python worker always.
pub fn worker_command(
    env: &Environment,
    python: &str,
    worker_py: &Path,
    shell_worker: Option<&Path>,
    name: &str,
    labels: &[(String, String)],
    sandbox: &Sandbox,
) -> (String, Vec<String>) {
    let memory_mb = sandbox.memory_mb;
    let script = worker_py.display().to_string();
    let image = env.image.clone().unwrap_or_default();
    // The worker's own command line, inside the environment.
    let inner = |python: &str, script: &str, funcmesh: &str| -> Vec<String> {
        match shell_worker {
            None => vec![python.into(), "-u".into(), script.into()],
            Some(_) => vec![
                "/bin/sh".into(),
                "-c".into(),
                LAUNCH.into(),
                "funcmesh-worker".into(),
                python.into(),
                script.into(),
                funcmesh.into(),
            ],
        }
    };
    match env.runtime {
        Runtime::Host => {
            let funcmesh = shell_worker
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let mut cmd = inner(python, &script, &funcmesh);
            let program = cmd.remove(0);
            (program, cmd)
        }
        Runtime::Docker | Runtime::Podman => {
            let mut args = vec![
                "run".into(),
                "-i".into(),
                "--rm".into(),
                "--name".into(),
                name.to_owned(),
                "--log-driver".into(),
                "none".into(),
                // Hardened: only local images, an unprivileged user without capabilities, no
                // privilege gain, bounded processes, a read-only root with a private /tmp as
                // the only writable place (and the working directory), no network unless the
                // endpoint allows it.
                "--pull".into(),
                "never".into(),
                "--user".into(),
                "65534:65534".into(),
                "--cap-drop".into(),
                "ALL".into(),
                "--security-opt".into(),
                "no-new-privileges".into(),
                "--pids-limit".into(),
                sandbox.pids.max(16).to_string(),
                "--read-only".into(),
                "--tmpfs".into(),
                "/tmp:rw,nosuid,nodev,mode=1777".into(),
                "--workdir".into(),
                "/tmp".into(),
                "--env".into(),
                "HOME=/tmp".into(),
                "-v".into(),
                format!("{script}:{WORKER_IN_CONTAINER}:ro"),
            ];
            if !sandbox.network {
                args.push("--network".into());
                args.push("none".into());
            }
            if let Some(p) = shell_worker {
                args.push("-v".into());
                args.push(format!("{}:{SHELL_WORKER_IN_CONTAINER}:ro", p.display()));
            }
            for (k, v) in labels {
                args.push("--label".into());
                args.push(format!("{k}={v}"));
            }
            if memory_mb > 0 {
                // The task's own limit is enforced inside (RLIMIT_AS); the container's cap is a
                // backstop with room for the interpreter.
                args.push("--memory".into());
                args.push(format!("{}m", memory_mb + 256));
            }
            args.extend(["--".into(), image]);
            args.extend(inner(
                "python3",
                WORKER_IN_CONTAINER,
                SHELL_WORKER_IN_CONTAINER,
            ));
            (env.runtime.as_str().to_owned(), args)
        }
        Runtime::Apptainer => {
            // Contained: its own PID and IPC namespaces, no host home, /tmp or environment
            // (`--containall`), no privileges even for root (`--no-privs`), and no network
            // unless the endpoint allows it. (Apptainer is not installed where funcmesh's tests
            // run: these flags are checked as arguments only.)
            let mut args = vec![
                "exec".into(),
                "--containall".into(),
                "--no-privs".into(),
                "--bind".into(),
                format!("{script}:{WORKER_IN_CONTAINER}:ro"),
            ];
            if !sandbox.network {
                args.extend(["--net".into(), "--network".into(), "none".into()]);
            }
            if let Some(p) = shell_worker {
                args.push("--bind".into());
                args.push(format!("{}:{SHELL_WORKER_IN_CONTAINER}:ro", p.display()));
            }
            args.push(image);
            args.extend(inner(
                "python3",
                WORKER_IN_CONTAINER,
                SHELL_WORKER_IN_CONTAINER,
            ));
            ("apptainer".into(), args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environments_parse_and_print_back() {
        for s in [
            "host",
            "docker:funcmesh/python:bookworm",
            "apptainer:/images/x.sif",
        ] {
            assert_eq!(Environment::parse(s).unwrap().to_string(), s);
        }
        assert!(Environment::parse("docker:").is_err());
        assert!(Environment::parse("docker:--privileged").is_err());
        assert!(Environment::parse("lxc:x").is_err());
        assert!(Environment::parse("nothing").is_err());
    }

    #[test]
    fn with_the_shell_worker_a_launcher_picks_the_worker_inside_the_environment() {
        let fm = Path::new("/usr/bin/funcmesh");
        let (program, args) = worker_command(
            &Environment::host(),
            "python3",
            Path::new("/w.py"),
            Some(fm),
            "n",
            &[],
            &Sandbox::default(),
        );
        assert_eq!(program, "/bin/sh");
        assert_eq!(args[..2], ["-c".to_string(), LAUNCH.to_string()]);
        assert_eq!(args[3..], ["python3", "/w.py", "/usr/bin/funcmesh"]);
        let env = Environment::parse("docker:img:1").unwrap();
        let (_, args) = worker_command(
            &env,
            "python3",
            Path::new("/w.py"),
            Some(fm),
            "n",
            &[],
            &Sandbox::default(),
        );
        assert!(args.contains(&format!("/usr/bin/funcmesh:{SHELL_WORKER_IN_CONTAINER}:ro")));
        let image = args.iter().position(|a| a == "img:1").unwrap();
        assert_eq!(args[image - 1], "--");
        assert_eq!(args[image + 1], "/bin/sh");
        assert_eq!(
            args[image + 5..],
            ["python3", WORKER_IN_CONTAINER, SHELL_WORKER_IN_CONTAINER]
        );
    }

    #[test]
    fn an_image_can_never_become_an_option_of_docker_run() {
        let env = Environment::parse("docker:img:1").unwrap();
        let (_, args) = worker_command(
            &env,
            "python3",
            Path::new("/w.py"),
            None,
            "n",
            &[],
            &Sandbox::default(),
        );
        let dashdash = args.iter().position(|a| a == "--").unwrap();
        assert_eq!(args[dashdash + 1], "img:1");
    }

    /// Issue 17: containers run hardened unless the endpoint says otherwise.
    #[test]
    fn containers_run_without_network_root_capabilities_or_a_writable_root() {
        let env = Environment::parse("docker:img:1").unwrap();
        let run = |sandbox: &Sandbox| {
            let (_, args) =
                worker_command(&env, "python3", Path::new("/w.py"), None, "n", &[], sandbox);
            let dashdash = args.iter().position(|a| a == "--").unwrap();
            args[..dashdash].join(" ")
        };
        let line = run(&Sandbox::default());
        for part in [
            "--pull never",
            "--user 65534:65534",
            "--cap-drop ALL",
            "--security-opt no-new-privileges",
            "--pids-limit 512",
            "--read-only",
            "--tmpfs /tmp:",
            "--network none",
        ] {
            assert!(line.contains(part), "`{part}` missing from: {line}");
        }
        let open = run(&Sandbox {
            network: true,
            pids: 64,
            memory_mb: 0,
        });
        assert!(!open.contains("--network none") && open.contains("--pids-limit 64"));
        let env = Environment::parse("apptainer:/img.sif").unwrap();
        let (program, args) = worker_command(
            &env,
            "python3",
            Path::new("/w.py"),
            None,
            "n",
            &[],
            &Sandbox::default(),
        );
        assert_eq!(program, "apptainer");
        let line = args.join(" ");
        for part in ["--containall", "--no-privs", "--net --network none"] {
            assert!(line.contains(part), "`{part}` missing from: {line}");
        }
    }
}
