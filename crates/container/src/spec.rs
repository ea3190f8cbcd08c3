//! What to run and where: the container's rootfs layers, its command, environment, working
//! directory and user, resolved from the image config and the command line.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the container helper needs; passed to it as JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Overlay lower directories, the top layer first.
    pub lowers: Vec<PathBuf>,
    /// Writable upper directory.
    pub upper: PathBuf,
    /// overlayfs work directory.
    pub work: PathBuf,
    /// Where the rootfs is mounted (inside the container's own mount namespace).
    pub rootfs: PathBuf,
    /// The command and its arguments.
    pub args: Vec<String>,
    /// `NAME=VALUE` environment.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    /// The image's `User` (`name`, `uid`, `name:group`, `uid:gid`), empty for root.
    pub user: String,
    /// Host name inside the container.
    pub hostname: String,
}

/// The parts of an image config `run` uses (`config` in the OCI image config).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ImageRuntimeConfig {
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

impl ImageRuntimeConfig {
    /// Reads `config` from an image config document.
    pub fn from_image_config(config: &serde_json::Value) -> Self {
        serde_json::from_value(config["config"].clone()).unwrap_or_default()
    }

    /// The command as `docker run` builds it: the entrypoint, then the command line's arguments
    /// if given, else the image's Cmd.
    pub fn command(&self, overrides: &[String]) -> Vec<String> {
        let mut args = self.entrypoint.clone().unwrap_or_default();
        if overrides.is_empty() {
            args.extend(self.cmd.clone().unwrap_or_default());
        } else {
            args.extend(overrides.iter().cloned());
        }
        args
    }

    /// The image's environment, with a default PATH when it has none.
    pub fn environment(&self, hostname: &str) -> Vec<String> {
        let mut env = self.env.clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
            env.push(format!("HOSTNAME={hostname}"));
        }
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            env.push("HOME=/root".into());
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entrypoint_cmd_and_overrides() {
        let config = ImageRuntimeConfig {
            entrypoint: Some(vec!["/entry".into(), "-x".into()]),
            cmd: Some(vec!["default".into()]),
            ..Default::default()
        };
        assert_eq!(config.command(&[]), ["/entry", "-x", "default"]);
        assert_eq!(config.command(&["given".into()]), ["/entry", "-x", "given"]);
        let plain = ImageRuntimeConfig {
            cmd: Some(vec!["/bin/sh".into()]),
            ..Default::default()
        };
        assert_eq!(plain.command(&["/bin/true".into()]), ["/bin/true"]);
        let env = plain.environment("box");
        assert!(env.iter().any(|e| e.starts_with("PATH=/usr/local/sbin")));
        assert!(env.contains(&"HOSTNAME=box".to_string()));
    }

    #[test]
    fn reads_the_config_section() {
        let doc = serde_json::json!({"config": {"Env": ["A=1"], "User": "nobody", "WorkingDir": "/srv", "Cmd": ["x"]}});
        let config = ImageRuntimeConfig::from_image_config(&doc);
        assert_eq!(config.user.as_deref(), Some("nobody"));
        assert_eq!(config.working_dir.as_deref(), Some("/srv"));
        assert_eq!(config.env.unwrap(), ["A=1"]);
    }
}
