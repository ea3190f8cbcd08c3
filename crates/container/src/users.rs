//! Resolving an image's `User` against the image's own /etc/passwd and /etc/group, as
//! container runtimes do.

use std::path::Path;

/// The credentials a workload runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: Option<String>,
}

fn lines(rootfs: &Path, file: &str) -> Vec<Vec<String>> {
    std::fs::read_to_string(rootfs.join(file))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect()
}

/// Resolves `user` (`""`, `name`, `uid`, `name:group`, `uid:gid`) in the rootfs.
pub fn resolve(rootfs: &Path, user: &str) -> Result<Credentials, String> {
    let passwd = lines(rootfs, "etc/passwd");
    let group = lines(rootfs, "etc/group");
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let entry = passwd
        .iter()
        .find(|f| f.len() >= 4 && (f[0] == user_part || f[2] == user_part));
    let (uid, mut gid, name, home) = match (entry, user_part.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse::<u32>()
                .map_err(|_| format!("bad uid for {user_part} in /etc/passwd"))?,
            f[3].parse::<u32>()
                .map_err(|_| format!("bad gid for {user_part} in /etc/passwd"))?,
            Some(f[0].clone()),
            f.get(5).cloned(),
        ),
        (None, Ok(uid)) => (uid, uid, None, None),
        (None, Err(_)) => {
            return Err(format!(
                "user {user_part:?} is not in the image's /etc/passwd"
            ));
        }
    };
    if let Some(group_part) = group_part {
        gid = match group
            .iter()
            .find(|f| f.len() >= 3 && (f[0] == group_part || f[2] == group_part))
        {
            Some(f) => f[2]
                .parse()
                .map_err(|_| format!("bad gid for {group_part} in /etc/group"))?,
            None => group_part
                .parse()
                .map_err(|_| format!("group {group_part:?} is not in the image's /etc/group"))?,
        };
    }
    let mut groups = vec![gid];
    if let Some(name) = &name {
        for f in &group {
            if f.len() >= 4
                && f[3].split(',').any(|m| m == name)
                && let Ok(g) = f[2].parse()
                && !groups.contains(&g)
            {
                groups.push(g);
            }
        }
    }
    Ok(Credentials {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_groups() {
        let dir = tempfile_dir();
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("etc/group"),
            "root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
        )
        .unwrap();
        assert_eq!(resolve(&dir, "").unwrap().uid, 0);
        let app = resolve(&dir, "app").unwrap();
        assert_eq!(
            (app.uid, app.gid, app.groups.clone()),
            (1000, 1000, vec![1000, 50])
        );
        assert_eq!(app.home.as_deref(), Some("/home/app"));
        assert_eq!(resolve(&dir, "app:staff").unwrap().gid, 50);
        assert_eq!(
            resolve(&dir, "4242:4343").unwrap(),
            Credentials {
                uid: 4242,
                gid: 4343,
                groups: vec![4343],
                home: None
            }
        );
        assert!(resolve(&dir, "ghost").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("lazylayer-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
