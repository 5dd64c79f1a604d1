//! Resolving the `User` of an image in the guest's own account files.
//!
//! The agent is linked statically, so it cannot use the C library's name
//! service; it reads `/etc/passwd` and `/etc/group` directly, which is what
//! container runtimes do too.

use std::fs;

/// Who a command runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: Option<String>,
}

impl Identity {
    pub fn root() -> Self {
        Self {
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: Some("/root".into()),
        }
    }
}

/// Resolves `user`, `uid`, `user:group` or `uid:gid`.
pub fn resolve(spec: &str) -> Result<Identity, String> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_in(spec, &passwd, &group)
}

fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<Identity, String> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let entry = passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.len() >= 4 && (fields[0] == user_part || fields[2] == user_part));
    let (uid, mut gid, name, home) = match (&entry, user_part.parse::<u32>()) {
        (Some(fields), _) => (
            fields[2]
                .parse()
                .map_err(|_| format!("invalid uid in /etc/passwd for {user_part}"))?,
            fields[3]
                .parse()
                .map_err(|_| format!("invalid gid in /etc/passwd for {user_part}"))?,
            Some(fields[0].to_string()),
            fields.get(5).map(|home| home.to_string()),
        ),
        (None, Ok(uid)) => (uid, uid, None, None),
        (None, Err(_)) => {
            return Err(format!(
                "user '{user_part}' not found in the image's /etc/passwd"
            ))
        }
    };

    if let Some(group_part) = group_part {
        gid = match group_part.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_id(group, group_part)
                .ok_or_else(|| format!("group '{group_part}' not found in /etc/group"))?,
        };
    }

    let mut groups = vec![gid];
    if let Some(name) = &name {
        for line in group.lines() {
            let fields: Vec<_> = line.split(':').collect();
            if fields.len() >= 4 && fields[3].split(',').any(|member| member == name) {
                if let Ok(id) = fields[2].parse() {
                    if !groups.contains(&id) {
                        groups.push(id);
                    }
                }
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        home,
    })
}

fn group_id(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|line| {
        let fields: Vec<_> = line.split(':').collect();
        (fields.len() >= 3 && fields[0] == name)
            .then(|| fields[2].parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1000::/home/bob:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nbob:x:1000:\ndocker:x:998:bob,alice\nstaff:x:50:\n";

    #[test]
    fn name_with_supplementary_groups() {
        let id = resolve_in("bob", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 1000));
        assert_eq!(id.groups, vec![1000, 998]);
        assert_eq!(id.home.as_deref(), Some("/home/bob"));
    }

    #[test]
    fn numeric_uid_without_entry() {
        let id = resolve_in("4242", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid), (4242, 4242));
    }

    #[test]
    fn user_and_group_names() {
        let id = resolve_in("bob:staff", PASSWD, GROUP).unwrap();
        assert_eq!(id.gid, 50);
    }

    #[test]
    fn unknown_user_is_an_error() {
        let err = resolve_in("mallory", PASSWD, GROUP).unwrap_err();
        assert!(err.contains("mallory"), "{err}");
    }
}
